"""Socket activation's matching, on real sockets passed by descriptor number."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from goma_twisted.activation import Activation, describe


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
    # A forward without an address takes a socket bound to every address.
    assert activation.find("tcp", "", anywhere_port).fd == anywhere.fileno()  # type: ignore[union-attr]
    # No match across protocols, ports or addresses.
    assert activation.find("udp", "127.0.0.1", tcp_port) is None
    assert activation.find("tcp", "127.0.0.2", tcp_port) is None
    assert activation.find("tcp", "", tcp_port) is None
    assert activation.unmatched([("tcp", "127.0.0.1", tcp_port)]) == found[1:]
    # The descriptors stay open: describe() only looked.
    assert tcp.getsockname()[1] == tcp_port


def test_what_is_no_tcp_or_udp_socket_is_left_out(passed: list[socket.socket]) -> None:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    passed.append(unix)
    assert describe(unix.fileno()) is None
    assert describe(10_000) is None  # not open


def test_not_activated_there_is_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert Activation.fromEnvironment().sockets == []
