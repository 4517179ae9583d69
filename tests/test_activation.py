"""Socket activation's matching, on real sockets passed by descriptor number."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from goma_twisted.activation import Activation, describe

from .support import free_port, running, twistd_command, twistd_env, wait_for, write_config
from .test_twistd import backend, tcp_roundtrip, udp_roundtrip

__all__ = ["backend"]  # a fixture


@pytest.fixture
def passed() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for skt in made:
        skt.close()


def _listening(made: list[socket.socket], kind: int, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    skt = socket.socket(family, kind)
    skt.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        skt.listen(8)
    made.append(skt)
    return skt


def test_each_listener_finds_the_socket_of_its_protocol_port_and_address(
    passed: list[socket.socket],
) -> None:
    tcp = _listening(passed, socket.SOCK_STREAM)
    udp = _listening(passed, socket.SOCK_DGRAM)
    anywhere = _listening(passed, socket.SOCK_STREAM, "::")
    found = [describe(skt.fileno(), "dns") for skt in (tcp, udp, anywhere)]
    assert all(skt is not None for skt in found)
    activation = Activation([skt for skt in found if skt is not None])
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    anywhere_port = anywhere.getsockname()[1]
    assert activation.find("tcp", "127.0.0.1", tcp_port).fd == tcp.fileno()  # type: ignore[union-attr]
    assert activation.find("udp", "127.0.0.1", udp_port).fd == udp.fileno()  # type: ignore[union-attr]
    # A forward without an address takes the socket of its port wherever it
    # is bound (the socket unit says where); one with an address, only there.
    assert activation.find("tcp", "", anywhere_port).fd == anywhere.fileno()  # type: ignore[union-attr]
    assert activation.find("tcp", "", tcp_port).fd == tcp.fileno()  # type: ignore[union-attr]
    assert activation.find("tcp", "::", anywhere_port).fd == anywhere.fileno()  # type: ignore[union-attr]
    # No match across protocols, ports or addresses.
    assert activation.find("udp", "127.0.0.1", tcp_port) is None
    assert activation.find("tcp", "127.0.0.2", tcp_port) is None
    assert activation.find("tcp", "127.0.0.1", anywhere_port) is None
    assert activation.unmatched([("tcp", "127.0.0.1", tcp_port)]) == found[1:]
    # The descriptors stay open: describe() only looked.
    assert tcp.getsockname()[1] == tcp_port


def test_what_is_no_tcp_or_udp_socket_is_left_out(passed: list[socket.socket]) -> None:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    passed.append(unix)
    assert describe(unix.fileno()) is None
    assert describe(10_000) is None  # not open


def test_not_activated_there_is_nothing() -> None:
    assert Activation.fromEnvironment({}).sockets == []
    # Another process's sockets (a LISTEN_PID not ours) are not ours either.
    other = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}
    assert Activation.fromEnvironment(other).sockets == []


def test_sockets_without_names_are_taken_by_number(passed: list[socket.socket]) -> None:
    # Activators older than systemd 227 set no LISTEN_FDNAMES.
    first = _listening(passed, socket.SOCK_STREAM)
    assert first.fileno() >= 3
    count = first.fileno() - 3 + 1  # every descriptor from 3 up to it
    environ = {"LISTEN_FDS": str(count), "LISTEN_PID": str(os.getpid())}
    found = Activation.fromEnvironment(environ).sockets
    assert first.fileno() in [skt.fd for skt in found]


def test_systemd_socket_activate_passes_tcp_and_udp_sockets(tmp_path: Path, backend: int) -> None:
    # Debian's systemd-socket-activate passes sockets exactly as systemd does
    # (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES). One listens on TCP and, at the
    # first connection, starts the other, which listens on UDP and, at the
    # first datagram, starts goma-pt with both sockets.
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-socket-activate is required with CI set (package systemd)")
        pytest.skip("systemd-socket-activate is not installed")
    port = free_port()
    config = write_config(
        tmp_path / "goma.yml",
        [{"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}],
    )
    log = tmp_path / "goma.log"
    command = [
        activate, "-l", f"127.0.0.1:{port}", "--fdname=goma-tcp",
        activate, "-d", "-l", f"127.0.0.1:{port}", "--fdname=goma-tcp:goma-udp",
        *twistd_command("-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(config)),
    ]  # fmt: skip
    with running(command, log, env=twistd_env()):
        wait_for(lambda: _accepting(port), what="systemd-socket-activate listening on TCP")
        # Connected while only the TCP socket exists: it waits in the backlog.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        waiting.sendall(b"early")
        wait_for(lambda: _udp_bound(port), what="the UDP socket")
        assert udp_roundtrip(port, b"hello") == b"udp:hello"
        waiting.shutdown(socket.SHUT_WR)
        assert waiting.recv(100) == b"early"
        waiting.close()
        assert tcp_roundtrip(port, b"over tcp") == b"over tcp"
    text = log.read_text()
    assert text.count("(a socket passed by systemd)") == 2
    assert "passed a socket no forward listens on" not in text


def _accepting(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _udp_bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_the_example_socket_unit_listens_where_the_example_config_forwards() -> None:
    from goma_twisted.config import load_config

    from .support import ROOT

    lines = (ROOT / "etc" / "goma-pt.socket").read_text().splitlines()
    kinds = {"ListenStream": "tcp", "ListenDatagram": "udp"}
    listens = set()
    for line in lines:
        key, _, value = line.partition("=")
        if key in kinds:
            host, _, port = value.rpartition(":")
            listens.add((kinds[key], host, int(port)))
    config = load_config(str(ROOT / "etc" / "goma-pt.yaml"))
    wanted = {
        (protocol, forward.address, forward.port)
        for forward in config.forwards
        for protocol in forward.protocols
    }
    assert listens == wanted
    service = (ROOT / "etc" / "goma-pt.service").read_text()
    assert "--nodaemon" in service and "Requires=goma-pt.socket" in service
