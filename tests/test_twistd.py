"""
goma-pt as operators run it: real twistd processes, foreground and daemon,
the .tac example, and what they print when something is wrong.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from goma_twisted import tap
from goma_twisted.config import ConfigError, load_config, parse_config
from goma_twisted.report import forwards_table
from goma_twisted.tap import Options

from .conftest import PLAIN
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


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _UDPEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(b"udp:" + data, self.client_address)


@pytest.fixture
def backend() -> Iterator[int]:
    """A TCP and a UDP echo server on one loopback port, in threads."""
    port = free_port()
    tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), _EchoHandler)
    tcp.daemon_threads = True
    udp = socketserver.UDPServer(("127.0.0.1", port), _UDPEchoHandler)
    for server in (tcp, udp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    for server in (tcp, udp):
        server.shutdown()
        server.server_close()


def tcp_roundtrip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def udp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recv(65535)


def run_twistd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twistd_command(*args),
        env=twistd_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_twistd_lists_the_plugin_and_explains_its_options() -> None:
    listing = run_twistd("--help")
    assert listing.returncode == 0
    assert "goma-pt" in listing.stdout
    help_text = run_twistd("goma-pt", "--help")
    assert help_text.returncode == 0
    assert "--config=" in help_text.stdout
    assert "passThrough" in help_text.stdout
    usage = help_text.stdout.splitlines()[0]
    for option in ("--config", "--check", "--drain", "--metrics", "--log-size", "--log-keep"):
        assert option in usage, option


def test_without_config_it_says_how_to_give_one() -> None:
    result = run_twistd("-n", "--pidfile=", "goma-pt")
    assert result.returncode != 0
    assert "no config file given; use --config FILE" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--drain", "x"],
        ["--config", "x", "-m", "9108"],
        ["--no"],
        ["--config", "x", "--log-keep", "0"],
        ["--config", "x", "--log-size", "-1"],
        ["--config", "x", "--log-size", "nan"],
        # Finite, but not as bytes (a traceback in makeService, once).
        ["--config", "x", "--log-size", "1e308"],
    ],
)
def test_a_usage_error_exits_1_whatever_twisteds_twistd_does(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # twistd before Twisted 26.10 (all that Python 3.9, so PyPy, gets)
    # prints a usage error and exits 0: goma-pt's options exit 1 themselves.
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(args)
    assert exited.value.code == 1
    assert "--config=" in capsys.readouterr().out


def test_a_broken_config_is_one_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "goma.yml"
    config.write_text(
        "gateway:\n"
        "  entryPoints:\n"
        "    passThrough:\n"
        "      forwards:\n"
        "        - protocol: tcp\n"
        "          port: 99999\n"
        "          target: backend\n"
    )
    result = run_twistd("-n", "--pidfile=", "goma-pt", "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert (
        f"{config}:6:17: forwards[0].port: got an integer ('99999'); expected 1 to 65535" in output
    )
    assert f"{config}:7:19: forwards[0].target: no port in 'backend'" in output


def test_a_port_in_use_is_one_line_and_nothing_stays_bound(tmp_path: Path) -> None:
    first, taken = free_port(), free_port()
    config = write_config(
        tmp_path / "goma.yml",
        [
            {"protocol": "tcp", "port": first, "address": "127.0.0.1", "target": "127.0.0.1:9"},
            {"protocol": "tcp", "port": taken, "address": "127.0.0.1", "target": "127.0.0.1:9"},
        ],
    )
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        result = run_twistd("-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert f"cannot start: tcp 127.0.0.1:{taken}: Address already in use" in output


@pytest.mark.parametrize("daemon", [False, True])
def test_a_logfile_that_cannot_be_opened_is_one_line(tmp_path: Path, daemon: bool) -> None:
    # twistd's own --logfile, opened by goma-pt's text log before anything
    # else: a missing directory was a traceback through twistd and Twisted.
    forward = {"protocol": "tcp", "port": free_port(), "target": "127.0.0.1:9"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    logfile, pidfile = tmp_path / "no-such-dir" / "goma-pt.log", tmp_path / "goma-pt.pid"
    result = run_twistd(
        *([] if daemon else ["-n"]),
        f"--pidfile={pidfile}",
        f"--logfile={logfile}",
        "goma-pt",
        "--config",
        str(config),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"goma-pt: cannot open --logfile {logfile}: No such file or directory"
    )
    assert not pidfile.exists()


def test_a_daemon_that_cannot_start_says_why_as_the_foreground_does(tmp_path: Path) -> None:
    # The ports are bound before twistd forks: the line reaches the terminal
    # whole, not cut to twistd's 100-byte report of the daemon's error.
    taken = free_port()
    forward = {"protocol": "tcp", "port": taken, "address": "127.0.0.1", "target": "127.0.0.1:9"}
    config = write_config(tmp_path / "goma.yml", [forward])
    pidfile, logfile = tmp_path / "goma-pt.pid", tmp_path / "goma-pt.log"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        result = run_twistd(
            f"--pidfile={pidfile}", f"--logfile={logfile}", "goma-pt", "--config", str(config)
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    why = f"goma-pt: cannot start: tcp 127.0.0.1:{taken}: Address already in use"
    assert result.stderr == f"{why}; forward to 127.0.0.1:9\n"
    assert not pidfile.exists()


@pytest.mark.parametrize(
    ("twistd", "daemonizing_reactor", "early"),
    [
        ({"nodaemon": True}, True, True),
        ({"nodaemon": False}, False, True),
        ({"nodaemon": False, "debug": True}, True, True),
        # A reactor told of the fork (kqueue's) must not watch ports across it.
        ({"nodaemon": False}, True, False),
    ],
)
def test_ports_are_bound_before_twistd_forks_unless_the_reactor_forbids(
    monkeypatch: pytest.MonkeyPatch, twistd: dict[str, Any], daemonizing_reactor: bool, early: bool
) -> None:
    import twisted.internet
    from twisted.internet.interfaces import IReactorDaemonize
    from zope.interface import directlyProvides

    class Reactor:
        pass

    reactor = Reactor()
    if daemonizing_reactor:
        directlyProvides(reactor, IReactorDaemonize)
    monkeypatch.setattr(twisted.internet, "reactor", reactor, raising=False)
    config = parse_config(
        "gateway: {entryPoints: {passThrough: {forwards: [{protocol: tcp, "
        "port: 1, target: 'a:1'}]}}}"
    )
    service = tap._TwistdService(config, twistdOptions=twistd)
    assert service._listens_early() is early


def test_foreground_forwards_tcp_and_udp_on_one_port(tmp_path: Path, backend: int) -> None:
    port = free_port()
    forward = {"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log) as proc:
        # On the interpreter running the tests (PyPy's run tests goma-pt on PyPy).
        assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath(sys.executable)
        assert tcp_roundtrip(port, b"over tcp") == b"over tcp"
        assert udp_roundtrip(port, b"over udp") == b"udp:over udp"
    text = log.read_text()
    assert f"Forwarding tcp 127.0.0.1:{port} to 127.0.0.1:{backend}" in text
    assert f"Forwarding udp 127.0.0.1:{port} to 127.0.0.1:{backend}" in text
    assert "client closed; 8 bytes sent, 8 received" in text
    assert "shutdown; 1 datagrams (8 bytes) sent, 1 (12 bytes) received" in text
    # Twisted's own "... starting on PORT" would repeat the Forwarding lines.
    assert f"starting on {port}" not in text
    if PLAIN:
        # Nothing of the accelerations: Twisted's own reactor.
        assert "Relay: plain: asked for" in text
        assert "reactor class: twisted.internet.epollreactor.EPollReactor" in text
    else:
        assert re.search(r"Relay: accelerated \(Twisted \d+\.\d+\)", text)
        assert "reactor class: goma_twisted.accel.reactor.EPollReactor" in text


def test_a_reactor_chosen_with_twistd_is_kept(tmp_path: Path, backend: int) -> None:
    port = free_port()
    forward = {"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log, twistd=("--reactor=poll",)):
        assert tcp_roundtrip(port, b"over tcp") == b"over tcp"
        assert udp_roundtrip(port, b"over udp") == b"udp:over udp"
    assert "reactor class: twisted.internet.pollreactor.PollReactor" in log.read_text()


def test_daemon_with_pidfile_starts_forwards_and_stops_on_sigterm(
    tmp_path: Path, backend: int
) -> None:
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    config = write_config(
        tmp_path / "goma.yml",
        [
            {"protocol": "tcp", "port": tcp_port, "target": f"127.0.0.1:{backend}"},
            {"protocol": "udp", "port": udp_port, "target": f"127.0.0.1:{backend}"},
        ],
    )
    pidfile, logfile = tmp_path / "goma-pt.pid", tmp_path / "goma-pt.log"
    started = run_twistd(
        f"--pidfile={pidfile}", f"--logfile={logfile}", "goma-pt", "--config", str(config)
    )
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile"))
    try:
        wait_for(lambda: "goma-pt ready" in logfile.read_text(), what="goma-pt ready")
        assert tcp_roundtrip(tcp_port, b"daemon tcp") == b"daemon tcp"
        assert udp_roundtrip(udp_port, b"daemon udp") == b"udp:daemon udp"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), what="the daemon to exit")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not pidfile.exists()
    text = logfile.read_text()
    assert "Received SIGTERM, shutting down." in text
    assert "Server Shut Down." in text
    assert "client closed; 10 bytes sent, 10 received" in text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is done.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_tac_composes_the_service_into_an_application(tmp_path: Path, backend: int) -> None:
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward])
    log = tmp_path / "tac.log"
    env = twistd_env() | {"GOMA_PT_CONFIG": str(config)}
    command = twistd_command("-ny", str(ROOT / "etc" / "goma-pt.tac"), "--pidfile=", "--logfile=-")
    with running(command, log, env=env, cwd=tmp_path) as proc:
        wait_for(lambda: "goma-pt ready" in log.read_text(), what="goma-pt ready")
        assert tcp_roundtrip(port, b"from a tac") == b"from a tac"
        # SIGHUP reloads, as for the plugin (by default it would end twistd).
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Reloaded " in log.read_text(), what="the reload")
        assert proc.poll() is None
        assert tcp_roundtrip(port, b"after a reload") == b"after a reload"


@pytest.mark.parametrize("daemon", [False, True])
def test_a_tac_with_a_broken_config_shows_the_problems_alone(tmp_path: Path, daemon: bool) -> None:
    config = tmp_path / "goma.yml"
    config.write_text(
        "gateway: {entryPoints: {passThrough: {forwards: [{protocol: tcp, port: 99999, "
        "target: 'a:1'}, {protocol: udp, port: 5, target: nope}]}}}\n"
    )
    pidfile = tmp_path / "goma-pt.pid"
    result = subprocess.run(
        twistd_command(
            *([] if daemon else ["-n"]),
            "-y",
            str(ROOT / "etc" / "goma-pt.tac"),
            f"--pidfile={pidfile}",
            f"--logfile={tmp_path / 'goma-pt.log'}",
        ),
        env=twistd_env() | {"GOMA_PT_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert len(caught.value.problems) == 2
    assert result.stderr == f"goma-pt: {caught.value}\n"
    assert not pidfile.exists()


def test_version_is_goma_pts_and_twisteds() -> None:
    import goma_twisted
    import twisted

    result = run_twistd("goma-pt", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"goma-pt version: {goma_twisted.__version__}",
        f"Twisted version: {twisted.__version__}",
    ]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _blast(listener: socket.socket, total: int) -> None:
    """Accept one connection and send it C{total} bytes as fast as it takes them."""
    conn, _ = listener.accept()
    chunk = b"x" * (1024 * 1024)
    sent = 0
    with conn:
        while sent < total:
            conn.sendall(chunk)
            sent += len(chunk)


def test_a_slow_reader_bounds_the_forwarders_memory(tmp_path: Path) -> None:
    """512 MB from a fast target to a slow client grow goma-pt by < 64 MB."""
    total = 512 * 1024 * 1024
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    target = listener.getsockname()[1]
    threading.Thread(target=_blast, args=(listener, total), daemon=True).start()
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{target}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log = tmp_path / "goma.log"
    command = twistd_command("-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(config))
    with running(command, log, env=twistd_env()) as proc:
        wait_for(lambda: "goma-pt ready" in log.read_text(), what="goma-pt ready")
        baseline = _rss_kb(proc.pid)
        peak = baseline
        received = 0
        deadline = time.monotonic() + 120
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            while received < total and time.monotonic() < deadline:
                data = client.recv(256 * 1024)
                if not data:
                    break
                received += len(data)
                if received % (8 * 1024 * 1024) < len(data):
                    peak = max(peak, _rss_kb(proc.pid))
                    time.sleep(0.02)  # the slow part: the target is far faster
    listener.close()
    assert received == total
    assert peak - baseline < 64 * 1024, f"grew by {(peak - baseline) // 1024} MB"


def _free_privileged_port() -> int:
    for port in range(1023, 600, -1):
        try:
            with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port below 1024")


@pytest.mark.parametrize("reuse_port", [False, True])
def test_binds_a_privileged_port_then_drops_to_nobody(
    tmp_path: Path, backend: int, reuse_port: bool
) -> None:
    if os.geteuid() != 0:
        message = "binding a port below 1024 needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = _free_privileged_port()
    forward = {"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}
    forward |= {"address": "127.0.0.1", "reusePort": reuse_port}
    config = write_config(tmp_path / "goma.yml", [forward])
    log = tmp_path / "goma.log"
    with goma_pt_running(
        config,
        log,
        twistd=(
            "--uid=nobody",
            "--gid=nogroup",
        ),
    ) as proc:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == ["65534"] * 4
        assert tcp_roundtrip(port, b"low port") == b"low port"
        assert udp_roundtrip(port, b"low port") == b"udp:low port"


def _forward(port: int, target: int) -> dict[str, Any]:
    return {
        "protocol": "tcp",
        "port": port,
        "address": "127.0.0.1",
        "target": f"127.0.0.1:{target}",
    }


def _echoes(conn: socket.socket, payload: bytes) -> bool:
    conn.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    return received == payload


def test_sighup_reloads_and_a_broken_file_keeps_the_running_set(
    tmp_path: Path, backend: int
) -> None:
    kept, removed, added = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path / "goma.yml", [_forward(kept, backend), _forward(removed, backend)]
    )
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log) as proc:
        live = socket.create_connection(("127.0.0.1", kept), timeout=5)
        assert _echoes(live, b"before")
        write_config(config, [_forward(kept, backend), _forward(added, backend)])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Reloaded" in log.read_text(), what="the reload")
        assert "1 listeners added, 1 removed, 0 changed, 2 in all" in log.read_text()
        assert _echoes(live, b"across the reload")
        assert tcp_roundtrip(added, b"added") == b"added"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", removed), timeout=5)

        config.write_text("gateway: {entryPoints: {passThrough: {forwards: [{port: 1}]}}}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Reload rejected" in log.read_text(), what="the rejection")
        assert "forwards[0].protocol: missing" in log.read_text()
        assert _echoes(live, b"after a broken file")
        assert tcp_roundtrip(added, b"still added") == b"still added"
        assert proc.poll() is None
        live.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_closes_a_lingering_connection_at_the_drain_deadline(
    tmp_path: Path, backend: int
) -> None:
    port = free_port()
    config = write_config(tmp_path / "goma.yml", [_forward(port, backend)])
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log, "--drain=1.5") as proc:
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert _echoes(live, b"hello")
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        drain = "Stopping: 1 connection may finish within 1.5s"
        wait_for(lambda: drain in log.read_text(), what="the drain")
        # The listener's socket closes on the reactor turn after the log
        # line (Twisted's stopListening): soon, well before the deadline.
        wait_for(lambda: _refused(port), timeout=1.0, what="the listener to close")
        assert _echoes(live, b"still served while draining")
        assert live.recv(1) == b""  # closed at the deadline
        closed_after = time.monotonic() - stopped_at
        live.close()
        proc.wait(10)
    assert 1.3 <= closed_after < 6, closed_after
    assert "shutdown; 32 bytes sent, 32 received" in log.read_text()


def test_sigterm_exits_as_soon_as_live_connections_finish(tmp_path: Path, backend: int) -> None:
    port = free_port()
    config = write_config(tmp_path / "goma.yml", [_forward(port, backend)])
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log, "--drain=60") as proc:
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert _echoes(live, b"hello")
        proc.send_signal(signal.SIGTERM)
        drain = "Stopping: 1 connection may finish within 60s"
        wait_for(lambda: drain in log.read_text(), what="the drain")
        assert _echoes(live, b"last words")
        stopped_at = time.monotonic()
        live.close()
        proc.wait(30)
        exited_after = time.monotonic() - stopped_at
    assert exited_after < 20, exited_after
    assert "client closed; 15 bytes sent, 15 received" in log.read_text()


def test_check_prints_the_forwards_and_exits(tmp_path: Path) -> None:
    result = run_twistd("goma-pt", "--config", str(ROOT / "etc" / "goma-full.yaml"), "--check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("goma-full.yaml: OK, 3 forwards")
    assert lines[1].split() == [
        "protocol", "listen", "target", "connect", "idle", "keepalive", "udp", "idle", "max",
        "sessions",
    ]  # fmt: skip
    assert lines[2].split() == [
        "tcp", "*:61557", "srv1.example.com:22", "5s", "5s", "15s", "-", "-"
    ]  # fmt: skip
    assert lines[3].split() == [
        "tcp/udp", "*:53", "10.25.10.15:53", "10s", "none", "15s", "300s", "auto"
    ]  # fmt: skip
    broken = tmp_path / "broken.yml"
    broken.write_text("gateway: {entryPoints: {passThrough: {forwards: [{port: 1}]}}}\n")
    result = run_twistd("goma-pt", "--config", str(broken), "--check")
    assert result.returncode == 1
    assert "forwards[0].protocol: missing" in result.stderr


def test_check_shows_keepalive_and_a_backlog_set_in_the_file() -> None:
    table = forwards_table(
        parse_config(
            "gateway: {entryPoints: {passThrough: {forwards: ["
            "{protocol: tcp, port: 2222, target: 'a:22', keepalive: 60, backlog: 1024}, "
            "{protocol: tcp/udp, port: 53, target: 'b:53', keepalive: false}, "
            "{protocol: udp, port: 54, target: 'c:54'}]}}}"
        )
    )
    rows = [line.split() for line in table.splitlines()]
    assert rows[0][-1] == "backlog"
    assert rows[1] == ["tcp", "*:2222", "a:22", "10s", "none", "60s", "-", "-", "1024"]
    assert rows[2] == ["tcp/udp", "*:53", "b:53", "10s", "none", "off", "300s", "auto", "system"]
    assert rows[3] == ["udp", "*:54", "c:54", "-", "-", "-", "300s", "auto", "-"]


def test_a_privileged_port_without_privileges_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "goma.yml", [_forward(_free_privileged_port(), 9)])
    # Without CAP_NET_BIND_SERVICE, as an unprivileged user is (root keeps
    # its files, so twistd under /root still runs).
    setpriv = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_bind_service"]
    result = subprocess.run(
        [
            *setpriv,
            *twistd_command("-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(config)),
        ],
        env=twistd_env(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert "Permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE" in output


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))


def _served(s: socket.socket) -> bool:
    """Whether goma-pt relays on this connection (an echo comes back) or closed it."""
    try:
        s.sendall(b"ping")
        return s.recv(16) == b"ping"
    except OSError:
        return False


def test_descriptor_limit_sizes_the_bounds_and_a_flood_never_hits_emfile(
    tmp_path: Path, backend: int
) -> None:
    port = free_port()
    forward = {
        "protocol": "tcp/udp",
        "port": port,
        "address": "127.0.0.1",
        "target": f"127.0.0.1:{backend}",
        "deny": ["127.0.0.3"],
    }
    config = write_config(tmp_path / "goma.yml", [forward])
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log, preexec_fn=_low_fd_limit):
        text = log.read_text()
        assert "File descriptors: limit 256 (raised from 128)" in text
        found = re.search(r"(\d+) connections \(derived\); .* (\d+) sessions \(derived\)", text)
        assert found, text
        bound, sessions = int(found[1]), int(found[2])
        assert bound >= 16 and 2 * bound + sessions < 256
        clients = []
        try:
            for _ in range(bound + 30):
                s = socket.create_connection(
                    ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
                )
                s.settimeout(2)
                clients.append(s)
            assert sum(_served(s) for s in clients) == bound
            # A flood of UDP source ports, more than the session bound.
            for _ in range(sessions + 100):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.2", 0))
                    u.sendto(b"flood", ("127.0.0.1", port))
            with socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0)
            ) as denied:
                denied.settimeout(5)
                assert not _served(denied)
            # The served connections still work.
            assert all(_served(s) for s in clients[:bound])
        finally:
            for s in clients:
                s.close()
        wait_for(lambda: log.read_text().count("client closed") >= bound, what="clients closed")
    text = log.read_text()
    assert "Too many open files" not in text and "EMFILE" not in text
    assert "refused 127.0.0.3:" in text and ": denied" in text
    assert "refused 127.0.0.2:" in text and ": at bound" in text
    # The flood's sessions are never answered (nothing listens for UDP at
    # the target): at the bound, the oldest of them give way to new ones.
    assert "sessions open, the bound; ended the unanswered session" in text


class _FakePyPyJIT:
    def __init__(self) -> None:
        self.params: list[str] = []

    def set_param(self, params: str) -> None:
        self.params.append(params)


def test_on_pypy_the_jit_compiles_sooner_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from goma_twisted import tap

    jit = _FakePyPyJIT()
    monkeypatch.setitem(sys.modules, "pypyjit", jit)
    assert tap._tune_jit(["pypy3", "-c", "...", "-n", "goma-pt"])
    assert jit.params == [tap.JIT_PARAMS]
    assert not tap._tune_jit(["pypy3", "--jit", "threshold=5000", "-c", "..."])
    assert jit.params == [tap.JIT_PARAMS]


def test_on_cpython_there_is_no_jit_to_tune(monkeypatch: pytest.MonkeyPatch) -> None:
    from goma_twisted import tap

    monkeypatch.setitem(sys.modules, "pypyjit", None)  # import raises ImportError
    assert not tap._tune_jit([])


def test_a_logfile_that_cannot_rotate_after_uid_says_so(tmp_path: Path, backend: int) -> None:
    # Opened as root, the file stays writable after --uid, but renaming it
    # in a directory the new user cannot write fails, and twistd's LogFile
    # then skips the rotation silently: the file grows past --log-size
    # without end. goma-pt warns once, in that log, when it starts.
    if os.geteuid() != 0:
        message = "--uid needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    forward = {"protocol": "tcp", "port": free_port(), "address": "127.0.0.1"}
    config = write_config(tmp_path / "goma.yml", [forward | {"target": f"127.0.0.1:{backend}"}])
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    logfile = logs / "goma.log"
    twistd = ("-n", "--pidfile=", f"--logfile={logfile}", "--uid=nobody", "--gid=nogroup")
    command = twistd_command(*twistd, "goma-pt", "--config", str(config), "--log-size", "0.001")
    with running(command, tmp_path / "out", env=twistd_env()):
        wait_for(lambda: logfile.exists() and "goma-pt ready" in logfile.read_text())
        text = logfile.read_text()
    assert (
        f"--logfile {logfile} will not be rotated (at --log-size or on SIGUSR1): "
        f"user 65534 cannot write to {logs}" in text
    ), text
    assert not list(logs.glob("goma.log.*"))
