"""
Metrics and the JSON log as operators get them: a real twistd process,
scraped with urllib, its JSON log lines parsed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from twisted.logger import eventsFromJSONLogFile, formatEvent

from .support import (
    ROOT,
    free_port,
    goma_pt_running,
    running,
    twistd_command,
    twistd_env,
    wait_for,
    write_config,
)
from .test_twistd import backend, run_twistd, tcp_roundtrip, udp_roundtrip

__all__ = ["backend"]  # the fixture, used by name

JSON_LOGGER = "goma_twisted.logs.json_observer"


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_twistd_serves_exact_metrics_after_traffic(tmp_path: Path, backend: int) -> None:
    port, metrics_port = free_port(), free_port()
    forward = {"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"):
        sizes = [3, 300, 30_000]
        for size in sizes:
            assert tcp_roundtrip(port, b"t" * size) == b"t" * size
        for payload in (b"one", b"three"):
            assert udp_roundtrip(port, payload) == b"udp:" + payload
        wait_for(lambda: log.read_text().count("client closed;") == 3, what="3 TCP ends")
        samples = scrape(metrics_port)

    def value(name: str, protocol: str, **labels: str) -> float:
        labels |= {"protocol": protocol, "address": "127.0.0.1", "port": str(port)}
        labels["target"] = f"127.0.0.1:{backend}"
        return samples[(name, frozenset(labels.items()))]

    assert value("goma_pt_tcp_connections_accepted_total", "tcp") == 3
    assert value("goma_pt_tcp_connections_active", "tcp") == 0
    assert value("goma_pt_tcp_connections_closed_total", "tcp", reason="client closed") == 3
    assert value("goma_pt_bytes_total", "tcp", direction="to_target") == sum(sizes)
    assert value("goma_pt_bytes_total", "tcp", direction="to_client") == sum(sizes)
    assert value("goma_pt_tcp_connect_seconds_count", "tcp") == 3
    # Each UDP roundtrip came from a new socket: two sessions, still open.
    assert value("goma_pt_udp_sessions_created_total", "udp") == 2
    assert value("goma_pt_udp_sessions_active", "udp") == 2
    assert value("goma_pt_udp_datagrams_total", "udp", direction="to_target") == 2
    assert value("goma_pt_bytes_total", "udp", direction="to_target") == len(b"onethree")
    assert value("goma_pt_bytes_total", "udp", direction="to_client") == len(b"udp:oneudp:three")
    assert samples[("process_open_fds", frozenset())] > 0


def test_a_bad_metrics_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "goma.yml", [{"protocol": "tcp", "port": 1, "target": "a:1"}])
    result = run_twistd("-n", "--pidfile=", "goma-pt", "--config", str(config), "-m", "9108")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert "--metrics: '9108' is not a server endpoint (Unknown endpoint type: '9108'); " in output
    assert "e.g. tcp:9108:interface=127.0.0.1" in output


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "address": "127.0.0.1", "target": "127.0.0.1:9"}
    config = write_config(tmp_path / "goma.yml", [forward])
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        result = run_twistd(
            "-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(config),
            "--metrics", f"tcp:{taken}:interface=127.0.0.1",
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert (
        f"goma-pt: cannot start: metrics tcp:{taken}:interface=127.0.0.1: Address already in use"
        in output
    )


END_FIELDS = {
    "forward", "client", "target", "targetAddress", "bytesToTarget", "bytesToClient",
    "duration", "reason", "detail",
}  # fmt: skip


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one object


def test_json_logger_writes_one_object_per_line(tmp_path: Path, backend: int) -> None:
    port = free_port()
    forward = {"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log = tmp_path / "goma.jsonl"
    command = twistd_command(
        "-n", "--pidfile=", "--logger", JSON_LOGGER, "goma-pt", "--config", str(config)
    )
    env = twistd_env()
    env.pop("GOMA_PT_JSON_LOG", None)
    with running(command, log, env=env):
        wait_for(lambda: "goma-pt ready" in log.read_text(), what="goma-pt ready")
        assert tcp_roundtrip(port, b"json please") == b"json please"
        assert udp_roundtrip(port, b"dgram") == b"udp:dgram"
        wait_for(lambda: '"client closed"' in log.read_text(), what="the TCP end")
    events = json_lines(log)
    [tcp_end] = [e for e in events if e.get("log_namespace") == "goma_pt.tcp"]
    [udp_end] = [e for e in events if e.get("log_namespace") == "goma_pt.udp"]
    assert set(tcp_end) >= END_FIELDS
    assert set(udp_end) >= END_FIELDS
    assert tcp_end["forward"] == udp_end["forward"] == f"tcp/udp 127.0.0.1:{port}"
    assert tcp_end["client"].startswith("127.0.0.1:")
    assert tcp_end["target"] == tcp_end["targetAddress"] == f"127.0.0.1:{backend}"
    assert (tcp_end["bytesToTarget"], tcp_end["bytesToClient"]) == (11, 11)
    assert tcp_end["reason"] == "client closed" and tcp_end["detail"] is None
    assert 0 <= tcp_end["connectTime"] <= tcp_end["duration"]
    assert tcp_end["log_level"]["name"] == "info"
    assert tcp_end["log_text"].startswith(f"tcp/udp 127.0.0.1:{port} {tcp_end['client']} -> ")
    assert "client closed; 11 bytes sent, 11 received, " in tcp_end["log_text"]
    assert (udp_end["reason"], udp_end["datagramsToTarget"], udp_end["bytesToClient"]) == (
        "shutdown",
        1,
        len(b"udp:dgram"),
    )
    # Twisted reads the file back into events (their formatting then
    # loses the precision specs: Twisted flattens {duration:.3f} to str).
    with open(log) as f:
        back = [e for e in eventsFromJSONLogFile(f) if e.get("log_namespace") == "goma_pt.tcp"]
    assert [(e["reason"], e["bytesToTarget"]) for e in back] == [("client closed", 11)]
    assert formatEvent(back[0]).startswith(tcp_end["log_text"].split(";")[0])


def test_json_log_file_from_the_environment_reopens_on_sigusr1(
    tmp_path: Path, backend: int
) -> None:
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    json_log, rotated = tmp_path / "goma.jsonl", tmp_path / "goma.jsonl.1"
    stdout = tmp_path / "stdout"
    command = twistd_command(
        "-n", "--pidfile=", "--logger", JSON_LOGGER, "goma-pt", "--config", str(config)
    )
    env = twistd_env() | {"GOMA_PT_JSON_LOG": str(json_log)}
    with running(command, stdout, env=env) as proc:
        wait_for(lambda: json_log.exists() and "goma-pt ready" in json_log.read_text())
        assert tcp_roundtrip(port, b"before") == b"before"
        wait_for(lambda: '"client closed"' in json_log.read_text(), what="the first end")
        os.rename(json_log, rotated)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(json_log.exists, what="the log to be reopened")
        assert tcp_roundtrip(port, b"after!") == b"after!"
        wait_for(lambda: '"client closed"' in json_log.read_text(), what="the second end")
    before = [e for e in json_lines(rotated) if e.get("log_namespace") == "goma_pt.tcp"]
    after = [e for e in json_lines(json_log) if e.get("log_namespace") == "goma_pt.tcp"]
    assert [e["bytesToTarget"] for e in before] == [6]
    assert [e["bytesToTarget"] for e in after] == [6]
    assert [e["bytesToClient"] for e in after] == [6]
    assert stdout.read_text() == ""


def test_the_plugin_help_explains_metrics() -> None:
    result = run_twistd("goma-pt", "--help")
    assert result.returncode == 0
    assert "-m, --metrics=" in result.stdout
    assert "/metrics" in result.stdout


def test_tac_serves_metrics_from_the_environment(tmp_path: Path, backend: int) -> None:
    port, metrics_port = free_port(), free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward])
    log = tmp_path / "tac.log"
    env = twistd_env() | {
        "GOMA_PT_CONFIG": str(config),
        "GOMA_PT_METRICS": f"tcp:{metrics_port}:interface=127.0.0.1",
    }
    command = twistd_command("-ny", str(ROOT / "etc" / "goma-pt.tac"), "--pidfile=", "--logfile=-")
    with running(command, log, env=env, cwd=tmp_path):
        wait_for(lambda: "goma-pt ready" in log.read_text(), what="goma-pt ready")
        assert tcp_roundtrip(port, b"from a tac") == b"from a tac"
        labels = {"protocol": "tcp", "address": "*", "port": str(port)}
        labels["target"] = f"127.0.0.1:{backend}"
        key = ("goma_pt_tcp_connections_accepted_total", frozenset(labels.items()))
        wait_for(lambda: scrape(metrics_port)[key] == 1, what="the accepted count")


def test_a_json_log_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "goma.yml", [{"protocol": "tcp", "port": 1, "target": "a:1"}])
    missing = tmp_path / "no such dir" / "goma.jsonl"
    result = subprocess.run(
        twistd_command(
            "-n", "--pidfile=", "--logger", JSON_LOGGER, "goma-pt", "--config", str(config)
        ),
        env=twistd_env() | {"GOMA_PT_JSON_LOG": str(missing)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert (
        f"goma-pt: cannot open $GOMA_PT_JSON_LOG ({missing}): No such file or directory" in output
    )
