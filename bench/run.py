"""goma-pt benchmark: goma-pt against its peers, interleaved round by round, loopback only.

One command, from the repository root:

    python bench/run.py                 # full run: 3 rounds, about 22 minutes
    python bench/run.py --quick         # smoke run: 1 round, short workloads
    python bench/run.py --rounds 5 --peers goma-pt nginx haproxy --workloads bulk_up tcp_rr
    python bench/run.py --publish       # also refresh docs/bench/latest.* and docs/benchmarks.md
    python bench/run.py --procs 2       # 2 goma-pt processes (reusePort), nginx 2 workers,
                                        # HAProxy 2 threads; without the memory workloads
    python bench/run.py --old-tree ../old --peers goma-pt goma-pt-old
                                        # this goma-pt against another tree's, paired

Each round runs every workload on every forwarder in turn (the peer order rotates per round),
each forwarder freshly started with its own config in a temp dir on ports picked at run time.
Before each measurement a shorter run of the same workload warms the forwarder up (not
counted; PyPy's JIT needs it). It prints medians and ratios goma-pt / peer and
goma-pt-pypy / peer, and writes bench/results/<stamp>.json and .png.
Needs the peers and load tools of bench/install.sh; a missing one is reported, not dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import backends, procs, profiles, report
from bench import peers as peers_mod
from bench import workloads as wl_mod

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = BENCH_DIR.parent / "docs"
TABLE = ("<!-- bench:table:start -->", "<!-- bench:table:end -->")
PROCS_TABLE = ("<!-- bench:procs-table:start -->", "<!-- bench:procs-table:end -->")
MACHINE = ("<!-- bench:machine:start -->", "<!-- bench:machine:end -->")

VERSION_COMMANDS: dict[str, list[str]] = {
    "nginx": ["nginx", "-v"],
    "haproxy": ["haproxy", "-v"],
    "socat": ["socat", "-V"],
    "iperf3": ["iperf3", "-v"],
    "redis-server": ["redis-server", "--version"],
    "nsd": ["nsd", "-v"],
    "dnsperf": ["dnsperf", "-h"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--peers", nargs="+", help="subset of forwarders to run")
    parser.add_argument("--workloads", nargs="+", help="subset of workloads to run")
    parser.add_argument("--idle-connections", type=int, help="idle_mem connection count")
    parser.add_argument("--out", type=Path, help="result JSON path")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="copy the result to docs/bench/latest.{json,png}, update the table",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with all logs")
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        metavar="N",
        help="N goma-pt processes sharing each port (reusePort), nginx N workers (reuseport), "
        "HAProxy nbthread N, N-way load clients; socat and portforward are skipped",
    )
    parser.add_argument(
        "--pypy",
        type=Path,
        default=peers_mod.PYPY_VENV,
        metavar="VENV",
        help="the PyPy venv that runs goma-pt-pypy (default %(default)s, made by "
        "bench/install.sh); without it that peer is reported missing",
    )
    parser.add_argument(
        "--old-tree",
        type=Path,
        metavar="DIR",
        help=f"another goma-pt tree (e.g. an older commit checked out apart), run as the peer "
        f"{peers_mod.GOMA_OLD} with its own code and twistd plugin on PYTHONPATH",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="measure each forwarder straight after its start, without the unmeasured "
        "warm-up run of the same workload (PyPy's JIT then counts its compile time)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="attach py-spy to goma-pt in each of its cells, profiles in DIR",
    )
    return parser.parse_args(argv)


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    text = (done.stdout + done.stderr).decode(errors="replace")
    match = re.search(r"\d+\.\d+[\w.+~-]*", text)
    return match.group(0) if match else text.strip().splitlines()[-1][:60]


def tree_commit(tree: Path = BENCH_DIR.parent) -> str:
    """The commit of a goma-pt tree, by default the one under test (`+dirty` when it has
    uncommitted changes)."""
    git = ["git", "-C", str(tree)]
    try:
        head = (
            subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, timeout=10, check=True
            )
            .stdout.decode()
            .strip()
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "goma_twisted"],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


PYPY_VERSION = (
    "import platform, sys, twisted; v = sys.pypy_version_info; "
    "print(f'{v.major}.{v.minor}.{v.micro}', platform.python_version(), twisted.__version__)"
)


def pypy_info(venv: Path) -> dict[str, str]:
    """PyPy's own version, its Python version and its Twisted, or why there are none."""
    python = peers_mod.pypy_python(venv)
    if not python.exists():
        return {"missing": f"{python} not found"}
    done = subprocess.run(
        [str(python), "-c", PYPY_VERSION], capture_output=True, timeout=60, check=False
    )
    words = done.stdout.decode(errors="replace").split()
    if done.returncode != 0 or len(words) != 3:
        return {"missing": done.stderr.decode(errors="replace").strip()[-200:]}
    return dict(zip(("pypy", "python", "twisted"), words))


def machine_info(pypy: Path | None = None) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import twisted

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "nofile_hard_limit": procs.nofile_hard_limit(),
        "versions": {name: _version(cmd) for name, cmd in VERSION_COMMANDS.items()},
        **({"pypy": pypy_info(pypy)} if pypy is not None else {}),
    }


def run_cell(
    peer: peers_mod.Peer,
    wl: wl_mod.Workload,
    params: wl_mod.Params,
    workdir: Path,
    profile_stem: Path | None = None,
) -> wl_mod.Measurement:
    """Start the backend and the forwarder, measure, and always stop both."""
    workdir.mkdir(parents=True)
    backend = wl.start_backend(workdir, params)
    try:
        fwd = peers_mod.Forward(
            wl.proto,
            procs.free_port(),
            backend.port,
            wl.one_response,
            peer.procs or params.clients,
        )
        running = peers_mod.start_forwarder(peer, fwd, workdir)
        spies = []
        try:
            warm = warm_up(wl, running, backend, params)
            if profile_stem is not None and peer.name == peers_mod.GOMA and running.proc:
                spies = profiles.start(running.proc.pid, profile_stem)
            before = cpu_snapshot(running)
            machine_before = procs.machine_cpu_seconds(backend.proc.pid)
            measured = wl.measure(running, backend, params)
            measured.detail["cpu"] = cpu_split(before, cpu_snapshot(running))
            measured.detail["machine"] = machine_split(
                machine_before, procs.machine_cpu_seconds(backend.proc.pid)
            )
            if warm is not None:
                measured.detail["warmup"] = warm
            if running.metrics_ports:
                measured.detail["processes"] = peers_mod.scrape_split(running)
            said = relay_said(running)
            if said is not None:
                measured.detail["relay"] = said
            return measured
        finally:
            peers_mod.stop_forwarder(running)
            profiles.stop(spies)
    finally:
        backend.stop()


RELAY_LINE = re.compile(r"Relay: (.+)$", re.MULTILINE)


def relay_said(running: peers_mod.Running) -> str | None:
    """Which TCP relay a goma-pt says at start that it runs (`accelerated (Twisted 26.10)`,
    `plain: asked for`), from its log; None for a forwarder or a goma-pt that says none."""
    if running.proc is None or running.peer.tree is None:
        return None
    try:
        text = running.proc.log.read_text(errors="replace")
    except OSError:
        return None
    found = RELAY_LINE.search(text)
    return found.group(1).strip() if found else None


def warm_up(
    wl: wl_mod.Workload,
    running: peers_mod.Running,
    backend: backends.Backend,
    params: wl_mod.Params,
) -> dict[str, Any] | None:
    """A shorter run of the same workload, not counted: what it did and its CPU, or None.

    Every forwarder gets it, so that PyPy's JIT has compiled the hot path before the
    measurement (goma-pt-pypy's first few thousand connections cost about twice the later
    ones) and no one is measured cold.
    """
    warm = wl_mod.warmup_params(wl, params)
    if warm is None:
        return None
    before = cpu_snapshot(running)
    done = wl.measure(running, backend, warm)
    return {"value": done.value, **done.detail, "cpu": cpu_split(before, cpu_snapshot(running))}


Snapshot = dict[tuple[int, int], float]


def cpu_snapshot(running: peers_mod.Running) -> Snapshot:
    """CPU seconds so far of every thread of the forwarder, by (pid, tid)."""
    return {
        (pid, tid): seconds
        for pid in running.pids()
        for tid, seconds in procs.task_cpu_seconds(pid).items()
    }


def cpu_split(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The forwarder's CPU during a measurement: in all, and per busy thread (busiest first).

    With several processes or threads, `tasks` shows how evenly the work was spread.
    """
    used = {key: after[key] - before.get(key, 0.0) for key in after}
    busy = sorted((v for v in used.values() if v >= 0.01), reverse=True)
    return {"seconds": round(sum(used.values()), 3), "tasks": [round(v, 3) for v in busy]}


def machine_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The whole machine's CPU during a measurement, from two `procs.machine_cpu_seconds`.

    With the clients and servers on the same cores as the forwarder, a rate can be set by
    what the whole machine spends per unit rather than by the forwarder's own share.
    """
    return {key: round(after[key] - before[key], 3) for key in after}


def skip_reason(peer: peers_mod.Peer, wl: wl_mod.Workload, procs_n: int = 1) -> str | None:
    if procs_n > 1 and peer.multi_note is None:
        return f"{NA_PREFIX}one process only"
    if wl.proto not in peer.protocols:
        return f"{NA_PREFIX}{wl.proto.upper()} not supported"
    if wl.needs_forwarder and peer.argv is None:
        return f"{NA_PREFIX}no forwarder"
    return None


NA_PREFIX = "n/a: "


def new_result(
    args: argparse.Namespace,
    params: wl_mod.Params,
    rounds: int,
    peers: list[peers_mod.Peer],
    wls: list[wl_mod.Workload],
) -> dict[str, Any]:
    return {
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": rounds,
        "commit": tree_commit(),
        **(
            {"old_tree": {"path": str(args.old_tree), "commit": tree_commit(args.old_tree)}}
            if args.old_tree is not None
            else {}
        ),
        "quick": args.quick,
        "profiled": args.profile is not None,
        "params": dataclasses.asdict(params),
        "procs": params.clients,
        "warmup": params.warmup,
        "machine": machine_info(args.pypy),
        "peers": {
            p.name: {"note": p.describe(params.clients), "missing": p.missing()} for p in peers
        },
        "workloads": {
            w.key: {
                "title": w.title,
                "unit": w.unit,
                "proto": w.proto,
                "higher_is_better": w.higher_is_better,
            }
            for w in wls
        },
        "samples": {w.key: {} for w in wls},
        "details": {w.key: {} for w in wls},
        "errors": {w.key: {} for w in wls},
        "status": {w.key: {} for w in wls},
    }


def run_rounds(
    result: dict[str, Any],
    peers: list[peers_mod.Peer],
    wls: list[wl_mod.Workload],
    params: wl_mod.Params,
    tmp: Path,
    profile_dir: Path | None = None,
) -> None:
    rounds = result["rounds"]
    for rnd in range(rounds):
        order = peers[rnd % len(peers) :] + peers[: rnd % len(peers)]
        for wl in wls:
            for peer in order:
                why = peer.missing() or skip_reason(peer, wl, params.clients)
                if why:
                    result["status"][wl.key][peer.name] = why
                    continue
                stem = profile_dir / f"{wl.key}-r{rnd + 1}" if profile_dir else None
                record(
                    result, rnd, wl, peer, params, tmp / f"r{rnd + 1}" / wl.key / peer.name, stem
                )


def record(
    result: dict[str, Any],
    rnd: int,
    wl: wl_mod.Workload,
    peer: peers_mod.Peer,
    params: wl_mod.Params,
    workdir: Path,
    profile_stem: Path | None = None,
) -> None:
    """Run one cell and store its value (None on error) for this round."""
    began = time.monotonic()
    value: float | None = None
    try:
        measured = run_cell(peer, wl, params, workdir, profile_stem)
        value = measured.value
        result["details"][wl.key].setdefault(peer.name, []).append(measured.detail)
        shown = f"{value:,.2f} {wl.unit}"
    except Exception as exc:
        message = str(exc).strip().replace("\n", " | ")[:300]
        result["errors"][wl.key].setdefault(peer.name, []).append(message)
        shown = f"ERROR {message[:120]}"
    result["samples"][wl.key].setdefault(peer.name, []).append(value)
    print(
        f"[round {rnd + 1}/{result['rounds']}] {wl.key:<11} {peer.name:<18} {shown} "
        f"({time.monotonic() - began:.1f}s)",
        flush=True,
    )


def finish(result: dict[str, Any], out: Path) -> None:
    result["medians"] = report.medians(result["samples"])
    result["ratios"] = report.ratios(result["medians"])
    result["ratios_pypy"] = report.ratios(result["medians"], peers_mod.GOMA_PYPY)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False))
    chart = report.chart(result, out.with_suffix(".png"))
    print(report.console(result))
    print(f"\nresult: {out}" + (f"\nchart:  {chart}" if chart else ""))


def publish(result: dict[str, Any], out: Path) -> None:
    """Copy the result to docs/bench/latest.* and refresh the tables in docs/benchmarks.md."""
    target = DOCS_DIR / "bench"
    target.mkdir(parents=True, exist_ok=True)
    n = result.get("procs", 1)
    stem = "latest" if n == 1 else f"latest-procs{n}"
    shutil.copy(out, target / f"{stem}.json")
    if out.with_suffix(".png").exists():
        shutil.copy(out.with_suffix(".png"), target / f"{stem}.png")
    doc = DOCS_DIR / "benchmarks.md"
    if doc.exists():
        text = doc.read_text()
        heading = f"Run of {result['started']}, {result['rounds']} rounds"
        if n == 1:
            text = _replace_block(text, MACHINE, report.machine_markdown(result))
            text = _replace_block(text, TABLE, f"{heading}.\n\n" + report.markdown(result))
        else:
            text = _replace_block(
                text,
                PROCS_TABLE,
                f"{heading}, goma-pt at {result['commit']}, {n} processes per forwarder.\n\n"
                + report.markdown(result)
                + "\n"
                + report.split_markdown(result),
            )
        doc.write_text(text)
    print(f"published to {target} and {doc}")


def _replace_block(text: str, markers: tuple[str, str], block: str) -> str:
    """Replace what stands between two marker comments (left alone if they are absent)."""
    start, end = markers
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}{end}{rest.split(end, 1)[1]}"


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # so every try/finally stops its processes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = wl_mod.QUICK if args.quick else wl_mod.Params()
    if args.idle_connections:
        params = dataclasses.replace(params, idle_connections=args.idle_connections)
    if args.procs < 1:
        raise SystemExit("--procs must be at least 1")
    params = dataclasses.replace(params, clients=args.procs, warmup=not args.no_warmup)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.old_tree is not None:
        args.old_tree = args.old_tree.resolve()
    peers = peers_mod.by_name(args.peers, args.procs, args.pypy, args.old_tree)
    wls = wl_mod.by_key(args.workloads, args.procs)
    for peer in peers:
        if peer.missing():
            print(f"peer {peer.name}: MISSING ({peer.missing()})", flush=True)
    signal.signal(signal.SIGTERM, _sigterm)
    # also when started in the background by a shell that set SIGINT to "ignore"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suffix = "" if args.procs == 1 else f"-procs{args.procs}"
    out = args.out or RESULTS_DIR / f"{stamp}{suffix}.json"
    result = new_result(args, params, rounds, peers, wls)
    tmp = Path(tempfile.mkdtemp(prefix="goma-bench-"))
    try:
        run_rounds(result, peers, wls, params, tmp, args.profile)
    except KeyboardInterrupt:
        print("interrupted: writing the partial result", flush=True)
        result["interrupted"] = True
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    finish(result, out)
    if args.publish:
        publish(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
