"""The benchmark harness's config generation for several processes per forwarder (bench/)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import peers, report, run, workloads
from bench import procs as bench_procs
from goma_twisted.config import parse_config
from goma_twisted.tap import Options


def test_goma_config_shares_the_port_only_with_several_processes() -> None:
    one = parse_config(peers.goma_config(peers.Forward("udp", 5300, 5301, one_response=True)))
    two = parse_config(peers.goma_config(peers.Forward("tcp", 5300, 5301, procs=2)))
    assert [(f.reuse_port, f.udp_responses) for f in one.forwards] == [(False, 1)]
    assert [(f.reuse_port, f.port) for f in two.forwards] == [(True, 5300)]


def test_nginx_gets_a_reuseport_socket_per_worker(tmp_path: Path) -> None:
    one = peers.nginx_conf(peers.Forward("tcp", 5300, 5301), tmp_path, tuned=False)
    two = peers.nginx_conf(peers.Forward("udp", 5300, 5301, procs=2), tmp_path, tuned=False)
    assert "worker_processes 1;" in one and "listen 127.0.0.1:5300;" in one
    assert "worker_processes 2;" in two and "listen 127.0.0.1:5300 udp reuseport;" in two


def test_split_counts_sums_each_counter_over_its_series() -> None:
    page = (
        "# HELP goma_pt_bytes_total Payload bytes.\n"
        'goma_pt_bytes_total{direction="to_target",port="1"} 10.0\n'
        'goma_pt_bytes_total{direction="to_client",port="1"} 5.0\n'
        'goma_pt_tcp_connections_accepted_total{port="1"} 3.0\n'
        'goma_pt_tcp_connections_active{port="1"} 1.0\n'
    )
    assert peers.split_counts(page) == {
        "connections": 3,
        "sessions": 0,
        "datagrams": 0,
        "bytes": 15,
    }


def _result(with_pypy: bool = True) -> dict[str, Any]:
    """A small saved result: two workloads, goma-pt on CPython and PyPy, nginx, direct."""
    names = [peers.GOMA, peers.GOMA_PYPY, "nginx", peers.DIRECT]
    if not with_pypy:
        names.remove(peers.GOMA_PYPY)
    samples: dict[str, dict[str, list[float | None]]] = {
        "tcp_rr": {peers.GOMA: [20.0, 30.0, 25.0], peers.GOMA_PYPY: [40.0], "nginx": [50.0]},
        "idle_mem": {peers.GOMA: [2.0], peers.GOMA_PYPY: [1.0], "nginx": [8.0]},
    }
    cpu = {peers.GOMA: 1.5, peers.GOMA_PYPY: 1.0, "nginx": 0.5}
    details: dict[str, dict[str, Any]] = {
        "tcp_rr": {
            p: [
                {
                    "requests": 50_000,
                    "cpu": {"seconds": s, "tasks": [s]},
                    "machine": {"busy": 2 * s, "idle": 0.5, "client": s / 2, "backend": s / 4},
                }
            ]
            for p, s in cpu.items()
        },
        "idle_mem": {},
    }
    details["tcp_rr"][peers.DIRECT] = [
        {"requests": 50_000, "machine": {"busy": 1.0, "idle": 1.0, "client": 0.5, "backend": 0.4}}
    ]
    if not with_pypy:
        for per_peer in (*samples.values(), *details.values()):
            per_peer.pop(peers.GOMA_PYPY, None)
    result: dict[str, Any] = {
        "started": "2026-11-26 15:00 UTC",
        "rounds": 3,
        "procs": 1,
        "commit": "abc1234",
        "machine": {
            "nproc": 2,
            "cpu": "x",
            "kernel": "6",
            "python": "3.11.7",
            "twisted": "26.10.0",
            "nofile_hard_limit": 20000,
            "versions": {"nginx": "1.22.1"},
            "pypy": {"pypy": "7.3.11", "python": "3.9.16", "twisted": "26.4.0"},
        },
        "peers": {p: {"note": "", "missing": None} for p in names},
        "workloads": {
            "tcp_rr": {"title": "rr", "unit": "req/s", "proto": "tcp", "higher_is_better": True},
            "idle_mem": {
                "title": "idle",
                "unit": "KB/conn",
                "proto": "tcp",
                "higher_is_better": False,
            },
        },
        "samples": samples,
        "details": details,
        "errors": {"tcp_rr": {}, "idle_mem": {}},
        "status": {"tcp_rr": {peers.DIRECT: "n/a: x"}, "idle_mem": {peers.DIRECT: "n/a: x"}},
    }
    result["medians"] = report.medians(samples)
    result["ratios"] = report.ratios(result["medians"])
    return result


def test_ratios_take_either_goma_pt_as_the_reference() -> None:
    meds = report.medians(_result()["samples"])
    assert report.ratios(meds)["tcp_rr"] == {peers.GOMA_PYPY: 25 / 40, "nginx": 25 / 50}
    assert report.ratios(meds, peers.GOMA_PYPY)["tcp_rr"] == {
        peers.GOMA: 40 / 25,
        "nginx": 40 / 50,
    }
    assert report.ratios(meds, peers.GOMA_PYPY)["idle_mem"] == {peers.GOMA: 0.5, "nginx": 0.125}


def test_markdown_has_a_pypy_column_and_its_own_ratio_table() -> None:
    text = report.markdown(_result())
    medians, cpython, pypy = text.split("\n\n")[1], text.split("\n\n")[3], text.split("\n\n")[5]
    assert (
        medians.splitlines()[0] == "| workload | unit | goma-pt | goma-pt-pypy | nginx | direct |"
    )
    assert "| tcp_rr | req/s | 25.0 | 40.0 | 50.0 | n/a |" in medians
    assert "| tcp_rr | higher | 1 | 0.62 | 0.50 | - |" in cpython
    assert "| tcp_rr | higher | 1.60 | 1 | 0.80 | - |" in pypy
    assert "| idle_mem | lower | 0.50 | 1 | 0.12 | - |" in pypy
    # CPU per request: 30 us, 20 us, 10 us; ratios of both goma-pts to every peer
    assert "| tcp_rr | us/req | 30.0 | 20.0 | 10.0 |" in text
    assert "| tcp_rr | goma-pt | 1 | 1.50 | 3.00 |" in text
    assert "| tcp_rr | goma-pt-pypy | 0.67 | 1 | 2.00 |" in text


def test_markdown_shows_the_whole_machine_per_unit_and_its_idle_share() -> None:
    text = report.markdown(_result())
    # busy 3.0 / 2.0 / 1.0 / 1.0 s and idle 0.5 / 0.5 / 0.5 / 1.0 s over 50,000 requests
    assert "| tcp_rr | us/req | 60.0 / 14% | 40.0 / 20% | 20.0 / 33% | 20.0 / 50% |" in text
    # the ends: client s/2 plus backend s/4 for s = 1.5, 1.0, 0.5; direct 0.5 + 0.4
    assert "| tcp_rr | us/req | 22.5 | 15.0 | 7.50 | 18.0 |" in text
    del_machine = _result()
    for done in del_machine["details"]["tcp_rr"].values():
        done[0].pop("machine")
    assert "Whole machine" not in report.markdown(del_machine)


def test_machine_cpu_seconds_count_the_machine_the_backend_and_finished_clients() -> None:
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    backend = subprocess.Popen([sys.executable, "-c", spin + "\nimport time; time.sleep(30)"])
    try:
        time.sleep(0.1)
        before = bench_procs.machine_cpu_seconds(backend.pid)
        subprocess.run([sys.executable, "-c", spin], check=True)
        time.sleep(0.5)
        split = run.machine_split(before, bench_procs.machine_cpu_seconds(backend.pid))
    finally:
        backend.kill()
        backend.wait()
    assert set(split) == {"busy", "idle", "client", "backend"}
    assert split["client"] >= 0.28
    assert split["backend"] >= 0.1
    assert split["busy"] >= split["client"] + split["backend"] - 0.05
    assert split["idle"] >= 0.0


def test_a_result_without_pypy_renders_as_before() -> None:
    result = _result(with_pypy=False)
    del result["machine"]["pypy"]
    text = report.markdown(result)
    assert "goma-pt-pypy" not in text
    assert "Ratio goma-pt / peer" in text
    assert "goma-pt-pypy" not in report.machine_markdown(result)
    assert [ref for ref, _r, _p in report.chart_panels(result)] == [peers.GOMA]


def test_cpu_per_unit_and_console_cover_goma_pt_pypy() -> None:
    result = _result()
    assert report.cpu_per_unit(result, "tcp_rr", peers.GOMA_PYPY) == pytest.approx(20.0)
    row = next(
        line
        for line in report.console(result).splitlines()
        if line.strip().startswith("goma-pt-pypy")
    )
    # median, goma/peer, (no pypy/peer against itself), CPU per request, rounds
    assert row.split() == ["goma-pt-pypy", "40.0", "0.62", "20.0", "[40.0]"]


def test_machine_section_names_the_pypy_version() -> None:
    result = _result()
    assert "- goma-pt-pypy: PyPy 7.3.11 (Python 3.9.16), Twisted 26.4.0\n" in (
        report.machine_markdown(result)
    )
    result["machine"]["pypy"] = {"missing": "/nowhere/bin/python not found"}
    assert "goma-pt-pypy: missing (/nowhere/bin/python not found)" in (
        report.machine_markdown(result)
    )


def test_chart_draws_a_panel_per_reference(tmp_path: Path) -> None:
    result = _result()
    panels = report.chart_panels(result)
    assert [(ref, who) for ref, _r, who in panels] == [
        (peers.GOMA, [peers.GOMA_PYPY, "nginx"]),
        (peers.GOMA_PYPY, [peers.GOMA, "nginx"]),
    ]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("matplotlib is required with CI set (.ci/run installs '.[bench]')")
        pytest.skip("matplotlib is not installed (pip install '.[bench]')")
    out = report.chart(result, tmp_path / "chart.png")
    assert out is not None and out.read_bytes().startswith(b"\x89PNG")


def test_goma_pt_pypy_runs_the_same_twistd_from_its_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (pypy,) = peers.by_name([peers.GOMA_PYPY], pypy=venv)
    assert pypy.missing() == f"{venv}/bin/python not found"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    assert pypy.missing() is None
    assert pypy.argv is not None and peers.GOMA_PYPY in [p.name for p in peers.by_name(None)]
    fwd = peers.Forward("tcp", 5300, 5301)
    argv = pypy.argv(fwd, tmp_path)
    cpython = peers.PEERS[0].argv(fwd, tmp_path)  # type: ignore[misc]
    assert argv[0] == str(venv / "bin" / "python") and argv[1:] == cpython[1:]
    # a --procs N run leaves it out by default, and skips it if named
    assert peers.GOMA_PYPY not in [p.name for p in peers.by_name(None, procs=2)]
    assert run.skip_reason(pypy, workloads.by_key(["tcp_rr"])[0], 2) == "n/a: one process only"


def test_pypy_info_says_why_a_venv_is_missing(tmp_path: Path) -> None:
    assert run.pypy_info(tmp_path) == {"missing": f"{tmp_path}/bin/python not found"}


def test_every_speed_workload_gets_a_warm_up_and_the_memory_ones_none() -> None:
    p = workloads.Params()
    warm = {w.key: workloads.warmup_params(w, p) for w in workloads.WORKLOADS}
    assert warm["idle_mem"] is None and warm["slow_mem"] is None
    connect = warm["tcp_connect"]
    assert connect is not None and connect.conn_requests == p.warm_conn_requests
    assert connect.ping_requests == p.warm_ping_requests and connect.bulk_seconds == 1
    off = dataclasses.replace(p, warmup=False)
    assert all(workloads.warmup_params(w, off) is None for w in workloads.WORKLOADS)


def test_goma_pt_plain_is_goma_pt_with_relay_plain(tmp_path: Path) -> None:
    (plain,) = peers.by_name([peers.GOMA_PLAIN])
    (goma,) = peers.by_name([peers.GOMA])
    fwd = peers.Forward("tcp", 5300, 5301)
    assert plain.argv is not None and goma.argv is not None
    argv = plain.argv(fwd, tmp_path)
    assert argv == [*goma.argv(fwd, tmp_path), "--relay", "plain"]
    assert plain.tree == goma.tree == peers.REPO_ROOT and plain.missing() is None
    assert peers.goma_env(plain) == {"PYTHONPATH": str(peers.REPO_ROOT), "GOMA_PT_RELAY": ""}
    assert peers.GOMA_PLAIN in [p.name for p in peers.by_name(None)]
    # twistd's goma-pt accepts what follows the plugin's name
    options = Options()
    options.parseOptions(argv[argv.index(peers.GOMA) + 1 :])
    assert options["relay"] == "plain"


def test_goma_pt_pypy_plain_is_optional_and_asks_for_the_plain_relay(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (pypy_plain,) = peers.by_name([peers.GOMA_PYPY_PLAIN], pypy=venv)
    assert pypy_plain.argv is not None
    argv = pypy_plain.argv(peers.Forward("udp", 5300, 5301), tmp_path)
    assert argv[0] == str(venv / "bin" / "python") and argv[-2:] == ["--relay", "plain"]
    assert peers.GOMA_PYPY_PLAIN not in [p.name for p in peers.by_name(None)]


def test_goma_pt_old_runs_the_tree_it_is_given(tmp_path: Path) -> None:
    (none,) = peers.by_name([peers.GOMA_OLD])
    assert none.missing() == "no tree given (run.py --old-tree DIR)"
    assert peers.GOMA_OLD not in [p.name for p in peers.by_name(None)]
    tree = tmp_path / "old"
    (old,) = peers.by_name([peers.GOMA_OLD], old_tree=tree)
    assert old.missing() == f"{tree}/goma_twisted/tap.py not found"
    for part in ("goma_twisted/tap.py", "twisted/plugins/goma_pt.py"):
        (tree / part).parent.mkdir(parents=True, exist_ok=True)
        (tree / part).touch()
    assert old.missing() is None
    assert peers.goma_env(old) == {"PYTHONPATH": str(tree), "GOMA_PT_RELAY": ""}
    assert old.argv is not None and peers.PEERS[0].argv is not None
    fwd = peers.Forward("tcp", 5300, 5301)
    assert old.argv(fwd, tmp_path) == peers.PEERS[0].argv(fwd, tmp_path)
    assert peers.GOMA_OLD in [p.name for p in peers.by_name(None, old_tree=tree)]
    assert run.parse_args(["--old-tree", str(tree)]).old_tree == tree


def test_a_goma_pt_peer_says_which_relay_it_runs(tmp_path: Path) -> None:
    (plain,) = peers.by_name([peers.GOMA_PLAIN])
    fwd = peers.Forward("tcp", bench_procs.free_port(), bench_procs.free_port())
    running = peers.start_forwarder(plain, fwd, tmp_path)
    try:
        # said in the same turn as the listen: allow for the log to be written
        deadline = time.monotonic() + 5
        while (said := run.relay_said(running)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        peers.stop_forwarder(running)
    assert said is not None and said.startswith("plain")
