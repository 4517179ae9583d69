"""
allow/deny, connection and session bounds, and the PROXY protocol, over
real loopback sockets. Loopback answers on all of 127.0.0.0/8, so a client
bound to 127.0.0.2 or 127.0.0.3 is a genuinely different source address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import implementer

from goma_twisted import policy, tcpfactory
from goma_twisted.accel import io
from goma_twisted.proxyprotocol import (
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
)

from .conftest import PLAIN
from .support import (
    Recorder,
    bound_port,
    captured_logs,
    finished,
    forward,
    open_fds,
    start_service,
    udp_relay,
)


def nets(*texts: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def connect_from(
    reactor: Any, source: str, port: int, client: protocol.Protocol, host: str = "127.0.0.1"
) -> None:
    """Connect to C{host:port} from the loopback address C{source}."""
    factory = protocol.ClientFactory()
    factory.protocol = lambda: client
    reactor.connectTCP(host, port, factory, bindAddress=(source, 0))


@implementer(IHalfCloseableProtocol)
class Backend(protocol.Protocol):
    """
    A target that reads an optional PROXY header with Twisted's own
    parsers, then echoes the bytes that follow it.
    """

    def __init__(self, owner: Backends, expect_header: bool) -> None:
        self.owner = owner
        self.expect_header = expect_header
        self.buffer = b""
        self.info: Any = None
        self.received = b""
        self.headerRead: Deferred[Backend] = Deferred()

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.expect_header and self.info is None:
            self.buffer += data
            if self.buffer.startswith(b"PROXY"):
                info, rest = V1Parser().feed(self.buffer)
            elif len(self.buffer) >= 16:
                info, rest = V2Parser().feed(self.buffer)
            else:
                return
            if info is None:
                return
            self.info = info
            self.headerRead.callback(self)
            data = rest or b""
        self.received += data
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class Backends(protocol.Factory):
    def __init__(self, expect_header: bool = False) -> None:
        self.expect_header = expect_header
        self.connections: list[Backend] = []

    def buildProtocol(self, addr: Any) -> Backend:
        return Backend(self, self.expect_header)


@pytest.fixture
def cleanup() -> Any:
    """Services and ports opened by a test, stopped after it."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if hasattr(thing, "stopService"):
            pytest_twisted.blockon(thing.stopService())
        else:
            pytest_twisted.blockon(thing.stopListening())


def backend(
    reactor: Any, cleanup: list[Any], expect_header: bool = False, host: str = "127.0.0.1"
) -> Any:
    factory = Backends(expect_header)
    port = reactor.listenTCP(0, factory, interface=host)
    cleanup.append(port)
    return factory, port.getHost().port


def serve(cleanup: list[Any], *forwards: Any, **kwargs: Any) -> Any:
    service = start_service(*forwards, **kwargs)
    cleanup.append(service)
    return service


async def roundtrip(
    reactor: Any, source: str, port: int, payload: bytes, host: str = "127.0.0.1"
) -> bytes:
    client = Recorder(send=payload, halfClose=True)
    connect_from(reactor, source, port, client, host)
    return bytes(await finished(reactor, client.lost))


def refusals(logs: Any) -> list[Any]:
    return [e for e in logs.events if "refusal" in e]


# allow / deny


@pytest_twisted.ensureDeferred
async def test_tcp_allow_and_deny_from_several_sources(reactor: Any, cleanup: list[Any]) -> None:
    target, target_port = backend(reactor, cleanup)
    service = serve(
        cleanup,
        forward(
            target=("127.0.0.1", target_port),
            allow=nets("127.0.0.0/29"),
            deny=nets("127.0.0.3/32"),
        ),
    )
    port = bound_port(service)
    with captured_logs() as logs:
        assert await roundtrip(reactor, "127.0.0.2", port, b"allowed") == b"allowed"
        assert await roundtrip(reactor, "127.0.0.3", port, b"denied") == b""
        assert await roundtrip(reactor, "127.0.0.4", port, b"allowed too") == b"allowed too"
        assert await roundtrip(reactor, "127.0.0.9", port, b"not listed") == b""
        await deferLater(reactor, 0.05)
    # Denied clients never cost a connection to the target.
    assert len(target.connections) == 2
    factory = service.listeners[0].factory
    assert factory.refusedCounts == {policy.DENIED: 2}
    # Logged rate-limited: the first denial now, the next within 10 s only counted.
    [first] = refusals(logs)
    assert first["client"].startswith("127.0.0.3:") and first["refusal"] == policy.DENIED
    # Refused clients make no end-of-connection event; served ones do.
    assert sorted(e["client"].split(":")[0] for e in logs.ends()) == ["127.0.0.2", "127.0.0.4"]
    assert factory.bounds.open == 0


@pytest_twisted.ensureDeferred
async def test_dual_stack_listener_matches_ipv4_clients_as_ipv4(
    reactor: Any, cleanup: list[Any]
) -> None:
    _, target_port = backend(reactor, cleanup)
    service = serve(
        cleanup,
        forward(target=("127.0.0.1", target_port), address="::", allow=nets("127.0.0.2/32")),
    )
    port = bound_port(service)
    assert await roundtrip(reactor, "127.0.0.2", port, b"v4 via ::") == b"v4 via ::"
    assert await roundtrip(reactor, "127.0.0.3", port, b"v4 via ::") == b""
    assert await roundtrip(reactor, "::1", port, b"v6", host="::1") == b""


class UDPClient(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.replies.append(data)


class UDPEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)  # type: ignore[union-attr]


def udp_echo(reactor: Any, cleanup: list[Any]) -> int:
    port = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
    cleanup.append(port)
    return int(port.getHost().port)


def udp_client(reactor: Any, cleanup: list[Any], source: str) -> Any:
    client = UDPClient()
    port = reactor.listenUDP(0, client, interface=source)
    cleanup.append(port)
    return client


async def until(reactor: Any, predicate: Any, timeout: float = 5.0) -> None:
    """Yield to the reactor until C{predicate()} holds (bounded in time)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"timed out waiting for {predicate}")


@pytest_twisted.ensureDeferred
async def test_udp_allow_and_deny(reactor: Any, cleanup: list[Any]) -> None:
    target_port = udp_echo(reactor, cleanup)
    service = serve(
        cleanup, forward(("udp",), ("127.0.0.1", target_port), deny=nets("127.0.0.3/32"))
    )
    listen = bound_port(service, "udp")
    allowed = udp_client(reactor, cleanup, "127.0.0.2")
    denied = udp_client(reactor, cleanup, "127.0.0.3")
    with captured_logs() as logs:
        for _ in range(5):
            denied.transport.write(b"let me in", ("127.0.0.1", listen))
        allowed.transport.write(b"hello", ("127.0.0.1", listen))
        await until(reactor, lambda: allowed.replies)
        await deferLater(reactor, 0.1)
    assert allowed.replies == [b"hello"]
    assert denied.replies == []
    relay = udp_relay(service)
    assert [addr[0] for addr in relay.sessions] == ["127.0.0.2"]
    assert relay.refusedCounts == {policy.DENIED: 5}
    # Five refusals, one log event: the rest are counted, not logged.
    assert len(refusals(logs)) == 1


@pytest_twisted.ensureDeferred
async def test_udp_dual_stack_listener_matches_ipv4_clients_as_ipv4(
    reactor: Any, cleanup: list[Any]
) -> None:
    target_port = udp_echo(reactor, cleanup)
    service = serve(
        cleanup,
        forward(("udp",), ("127.0.0.1", target_port), address="::", deny=nets("127.0.0.3/32")),
    )
    listen = bound_port(service, "udp")
    allowed = udp_client(reactor, cleanup, "127.0.0.2")
    denied = udp_client(reactor, cleanup, "127.0.0.3")
    denied.transport.write(b"no", ("127.0.0.1", listen))
    allowed.transport.write(b"yes", ("127.0.0.1", listen))
    await until(reactor, lambda: allowed.replies)
    await deferLater(reactor, 0.1)
    assert (allowed.replies, denied.replies) == ([b"yes"], [])
    relay = udp_relay(service)
    assert [addr[0] for addr in relay.sessions] == ["::ffff:127.0.0.2"]
    assert relay.refusedCounts == {policy.DENIED: 1}


# Connection and session bounds


@pytest_twisted.ensureDeferred
async def test_tcp_bound_plus_50_serves_exactly_the_bound(
    reactor: Any, cleanup: list[Any]
) -> None:
    bound = 20
    target, target_port = backend(reactor, cleanup)
    service = serve(cleanup, forward(target=("127.0.0.1", target_port), max_connections=bound))
    port = bound_port(service)
    factory = service.listeners[0].factory
    assert factory.bounds.total == bound
    clients = [Recorder() for _ in range(bound + 50)]
    with captured_logs() as logs:
        for client in clients:
            connect_from(reactor, "127.0.0.2", port, client)
        for client in clients:
            await finished(reactor, client.connected_d)
        await until(reactor, lambda: sum(c.lost.called for c in clients) == 50)
        await deferLater(reactor, 0.2)
    served = [c for c in clients if not c.lost.called]
    assert len(served) == bound
    assert len(target.connections) == bound
    assert factory.refusedCounts == {policy.AT_BOUND: 50}
    assert len(refusals(logs)) == 1
    # The served ones keep working, and a slot freed is a slot reused.
    for index, client in enumerate(served):
        client.transport.write(b"still here %d" % index)  # type: ignore[union-attr]
    await until(reactor, lambda: all(c.received for c in served))
    assert [c.received for c in served] == [b"still here %d" % i for i in range(bound)]
    served[0].transport.loseConnection()  # type: ignore[union-attr]
    await finished(reactor, served[0].lost)
    await until(reactor, lambda: factory.bounds.open == bound - 1)
    assert await roundtrip(reactor, "127.0.0.3", port, b"my turn") == b"my turn"


@pytest_twisted.ensureDeferred
async def test_tcp_bound_per_client_address(reactor: Any, cleanup: list[Any]) -> None:
    _, target_port = backend(reactor, cleanup)
    service = serve(cleanup, forward(target=("127.0.0.1", target_port), max_connections_per_ip=2))
    port = bound_port(service)
    greedy = [Recorder() for _ in range(5)]
    for client in greedy:
        connect_from(reactor, "127.0.0.2", port, client)
    await until(reactor, lambda: sum(c.lost.called for c in greedy) == 3)
    # Another address is not held back by the greedy one.
    assert await roundtrip(reactor, "127.0.0.3", port, b"other") == b"other"
    factory = service.listeners[0].factory
    assert factory.refusedCounts == {policy.AT_BOUND_PER_IP: 3}
    assert factory.bounds.by_ip == {"127.0.0.2": 2}
    for client in greedy:
        if not client.lost.called:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await finished(reactor, client.lost)
    await until(reactor, lambda: factory.bounds.by_ip == {})
    assert await roundtrip(reactor, "127.0.0.2", port, b"again") == b"again"


@pytest_twisted.ensureDeferred
async def test_udp_sessions_per_client_address(reactor: Any, cleanup: list[Any]) -> None:
    target_port = udp_echo(reactor, cleanup)
    service = serve(cleanup, forward(("udp",), ("127.0.0.1", target_port), max_sessions_per_ip=2))
    listen = bound_port(service, "udp")
    clients = [udp_client(reactor, cleanup, "127.0.0.2") for _ in range(4)]
    other = udp_client(reactor, cleanup, "127.0.0.3")
    for c in [*clients, other]:
        c.transport.write(b"hi", ("127.0.0.1", listen))
    await until(
        reactor,
        lambda: len(other.replies) == 1 and sum(map(len, (c.replies for c in clients))) == 2,
    )
    await deferLater(reactor, 0.1)
    assert sorted(len(c.replies) for c in clients) == [0, 0, 1, 1]
    relay = udp_relay(service)
    assert relay.refusedCounts == {policy.AT_BOUND_PER_IP: 2}
    assert relay.bounds.by_ip == {"127.0.0.2": 2, "127.0.0.3": 1}


@pytest_twisted.ensureDeferred
async def test_udp_flood_of_source_addresses_keeps_fds_bounded(
    reactor: Any, cleanup: list[Any]
) -> None:
    bound = 50
    target_port = udp_echo(reactor, cleanup)
    service = serve(cleanup, forward(("udp",), ("127.0.0.1", target_port), max_sessions=bound))
    listen = bound_port(service, "udp")
    relay = udp_relay(service)
    inside = [udp_client(reactor, cleanup, f"127.0.1.{i + 1}") for i in range(10)]
    for c in inside:
        c.transport.write(b"first", ("127.0.0.1", listen))
    await until(reactor, lambda: all(c.replies for c in inside))
    before = open_fds()
    peak = before
    pairs = 3000
    with captured_logs():
        for batch in range(pairs // 100):
            for i in range(100):
                # A new source address and port each time: a fresh socket.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((f"127.0.{2 + (batch % 50)}.{1 + i}", 0))
                    s.sendto(b"flood", ("127.0.0.1", listen))
            await deferLater(reactor, 0.01)
            peak = max(peak, open_fds())
        await deferLater(reactor, 0.2)
    # The 40 free places filled, and not one socket more.
    assert len(relay.sessions) == bound
    assert peak <= before + bound - len(inside)
    assert relay.refusedAtBound > 0
    assert relay.refusedAtBound + len(relay.sessions) - len(inside) <= pairs
    for c in inside:
        c.transport.write(b"still answered?", ("127.0.0.1", listen))
    await until(reactor, lambda: all(len(c.replies) == 2 for c in inside))
    assert {c.replies[1] for c in inside} == {b"still answered?"}


@pytest_twisted.ensureDeferred
async def test_default_bounds_come_from_the_descriptor_limit(
    reactor: Any, cleanup: list[Any]
) -> None:
    with captured_logs() as logs:
        service = serve(cleanup, forward(("tcp", "udp"), ("127.0.0.1", 9)))
    [budget] = [e for e in logs.events if "File descriptors" in e["log_format"]]
    assert service.budget is not None and not service.budget.overcommitted
    tcp_bound = service.listeners[0].factory.bounds.total
    udp_bound = udp_relay(service).max_sessions
    assert tcp_bound == service.budget.tcp[0][0] >= policy.MIN_DEFAULT_BOUND
    assert udp_bound == service.budget.udp[0][0] >= policy.MIN_DEFAULT_BOUND
    assert 2 * tcp_bound + udp_bound <= service.budget.usable
    assert f"{tcp_bound} connections (derived)" in budget["shares"]


@pytest.mark.parametrize("splice_after", [None, 0])
def test_the_splice_pipes_descriptors_are_kept_aside_only_where_relays_splice(
    cleanup: list[Any], monkeypatch: pytest.MonkeyPatch, splice_after: int | None
) -> None:
    monkeypatch.setattr(io, "SPLICE_AFTER", splice_after)
    with captured_logs() as logs:
        service = serve(cleanup, forward(("tcp",), ("127.0.0.1", 9)))
    [budget] = [e for e in logs.events if "File descriptors" in e["log_format"]]
    assert service.budget is not None
    assert service.budget.reserved == budget["reserved"]
    splicing = splice_after == 0 and not PLAIN and io.SPLICE is not None
    assert service.budget.reserved == policy.PROCESS_FDS + (
        2 * policy.SPLICE_PIPES if splicing else 0
    )


# PROXY protocol toward the target


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    ("source", "listen", "host"),
    [
        ("127.0.0.2", "127.0.0.1", "127.0.0.1"),
        ("::1", "::1", "::1"),
        # A dual-stack listener sees ::ffff:127.0.0.2; the header says IPv4.
        ("127.0.0.2", "::", "127.0.0.1"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_proxy_header_sent_to_the_target(
    reactor: Any, cleanup: list[Any], version: int, source: str, listen: str, host: str
) -> None:
    target, target_port = backend(reactor, cleanup, expect_header=True)
    service = serve(
        cleanup, forward(target=("127.0.0.1", target_port), address=listen, proxy_protocol=version)
    )
    port = bound_port(service)
    client = Recorder(send=b"first bytes", halfClose=True)
    connect_from(reactor, source, port, client, host=host)
    await finished(reactor, client.connected_d)
    client_port = client.transport.getHost().port  # type: ignore[union-attr]
    assert await finished(reactor, client.lost) == b"first bytes"
    [conn] = target.connections
    info = conn.info
    assert (ipaddress.ip_address(info.source.host), info.source.port) == (
        ipaddress.ip_address(source),
        client_port,
    )
    assert (ipaddress.ip_address(info.destination.host), info.destination.port) == (
        ipaddress.ip_address(host),
        port,
    )
    family = ipaddress.ip_address(host).version
    assert info.header.startswith(
        f"PROXY TCP{family} ".encode() if version == 1 else V2_SIGNATURE + b"\x21"
    )
    if version == 2:
        assert info.header[13] == (0x11 if family == 4 else 0x21)
    assert conn.received == b"first bytes"


# PROXY protocol from a trusted load balancer


@pytest_twisted.ensureDeferred
async def test_accepted_proxy_header_names_the_client(reactor: Any, cleanup: list[Any]) -> None:
    target, target_port = backend(reactor, cleanup, expect_header=True)
    service = serve(
        cleanup,
        forward(
            target=("127.0.0.1", target_port),
            accept_proxy_protocol=nets("127.0.0.2/32"),
            proxy_protocol=2,
        ),
    )
    port = bound_port(service)
    header = encode_v1(("203.0.113.7", 5555), ("198.51.100.1", 443))
    client = Recorder()
    with captured_logs() as logs:
        connect_from(reactor, "127.0.0.2", port, client)
        await finished(reactor, client.connected_d)
        # The header split across writes, client data right behind it.
        client.transport.write(header[:9])  # type: ignore[union-attr]
        await deferLater(reactor, 0.05)
        client.transport.write(header[9:] + b"payload ")  # type: ignore[union-attr]
        await deferLater(reactor, 0.05)
        client.transport.write(b"and more")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        assert await finished(reactor, client.lost) == b"payload and more"
        await deferLater(reactor, 0.05)
    [conn] = target.connections
    assert (conn.info.source.host, conn.info.source.port) == ("203.0.113.7", 5555)
    assert (conn.info.destination.host, conn.info.destination.port) == ("198.51.100.1", 443)
    [end] = logs.ends()
    assert end["client"] == "203.0.113.7:5555"
    assert end["proxiedBy"].startswith("127.0.0.2:")
    assert end["bytesToTarget"] == len(b"payload and more")


@pytest_twisted.ensureDeferred
async def test_real_client_from_the_header_feeds_deny_and_bounds(
    reactor: Any, cleanup: list[Any]
) -> None:
    target, target_port = backend(reactor, cleanup)
    service = serve(
        cleanup,
        forward(
            target=("127.0.0.1", target_port),
            accept_proxy_protocol=nets("127.0.0.0/8"),
            deny=nets("203.0.113.0/24"),
            max_connections_per_ip=1,
        ),
    )
    port = bound_port(service)
    denied = encode_v2(("203.0.113.7", 1), ("127.0.0.1", port))
    assert await roundtrip(reactor, "127.0.0.2", port, denied + b"x") == b""
    allowed = encode_v2(("198.51.100.7", 1), ("127.0.0.1", port))
    first = Recorder(send=allowed + b"one")
    connect_from(reactor, "127.0.0.2", port, first)
    await until(reactor, lambda: first.received == b"one")
    # The same real client through another balancer is at its bound.
    assert await roundtrip(reactor, "127.0.0.3", port, allowed + b"two") == b""
    factory = service.listeners[0].factory
    assert factory.refusedCounts == {policy.DENIED: 1, policy.AT_BOUND_PER_IP: 1}
    assert factory.bounds.by_ip == {"198.51.100.7": 1}
    assert len(target.connections) == 1
    first.transport.loseConnection()  # type: ignore[union-attr]
    await finished(reactor, first.lost)
    await until(reactor, lambda: factory.bounds.open == 0)


@pytest.mark.parametrize(
    ("source", "stream", "refusal"),
    [
        ("127.0.0.3", encode_v1(("203.0.113.7", 1), ("127.0.0.1", 2)), policy.UNTRUSTED),
        ("127.0.0.2", b"GET / HTTP/1.0\r\n\r\n", policy.BAD_HEADER),
        ("127.0.0.2", b"PROXY TCP4 203.0.113.999 127.0.0.1 1 2\r\n", policy.BAD_HEADER),
        ("127.0.0.2", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x02\x00\x00", policy.BAD_HEADER),
    ],
)
@pytest_twisted.ensureDeferred
async def test_untrusted_or_malformed_headers_are_refused(
    reactor: Any, cleanup: list[Any], source: str, stream: bytes, refusal: str
) -> None:
    target, target_port = backend(reactor, cleanup)
    service = serve(
        cleanup,
        forward(target=("127.0.0.1", target_port), accept_proxy_protocol=nets("127.0.0.2/32")),
    )
    port = bound_port(service)
    with captured_logs() as logs:
        assert await roundtrip(reactor, source, port, stream + b"data") == b""
        await deferLater(reactor, 0.05)
    assert target.connections == []
    factory = service.listeners[0].factory
    assert factory.refusedCounts == {refusal: 1}
    [event] = refusals(logs)
    assert event["refusal"] == refusal
    assert event["client"].startswith(f"{source}:")
    assert bool(event["detail"]) is (refusal == policy.BAD_HEADER)
    assert logs.ends() == [] and factory.bounds.open == 0


@pytest_twisted.ensureDeferred
async def test_a_header_that_never_comes_times_out(reactor: Any, cleanup: list[Any]) -> None:
    clock = Clock()
    target, target_port = backend(reactor, cleanup)
    service = serve(
        cleanup,
        forward(
            target=("127.0.0.1", target_port),
            accept_proxy_protocol=nets("127.0.0.2/32"),
            connect_timeout=5.0,
        ),
        clock=clock,
    )
    client = Recorder(send=b"PROXY TCP4")
    connect_from(reactor, "127.0.0.2", bound_port(service), client)
    await finished(reactor, client.connected_d)
    await deferLater(reactor, 0.05)
    clock.advance(4)
    await deferLater(reactor, 0.05)
    assert not client.lost.called
    clock.advance(1)
    assert await finished(reactor, client.lost, 5) == b""
    assert target.connections == []
    assert clock.getDelayedCalls() == []
    assert service.listeners[0].factory.refusedCounts == {policy.BAD_HEADER: 1}


@pytest_twisted.ensureDeferred
async def test_a_bare_health_check_is_no_refusal(reactor: Any, cleanup: list[Any]) -> None:
    target, target_port = backend(reactor, cleanup)
    service = serve(
        cleanup,
        forward(target=("127.0.0.1", target_port), accept_proxy_protocol=nets("127.0.0.2/32")),
    )
    with captured_logs() as logs:
        assert await roundtrip(reactor, "127.0.0.2", bound_port(service), b"") == b""
        await deferLater(reactor, 0.05)
    assert logs.events == [] and target.connections == []
    assert service.listeners[0].factory.bounds.open == 0


@pytest_twisted.ensureDeferred
async def test_stop_ends_connections_still_reading_their_header(
    reactor: Any, cleanup: list[Any]
) -> None:
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", 9), accept_proxy_protocol=nets("127.0.0.2/32")), clock=clock
    )
    client = Recorder(send=b"PROXY ")
    connect_from(reactor, "127.0.0.2", bound_port(service), client)
    await finished(reactor, client.connected_d)
    await until(reactor, lambda: clock.getDelayedCalls())
    await finished(reactor, service.stopService())
    await finished(reactor, client.lost, 5)
    assert clock.getDelayedCalls() == []


class TCPStringTransport(StringTransport):
    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


endpoints = st.tuples(st.ip_addresses().map(str), st.integers(0, 65535))
valid_streams = st.builds(
    lambda version, src, dst, payload: (
        (encode_v1 if version == 1 else encode_v2)(src, dst) + payload
    ),
    st.sampled_from([1, 2]),
    endpoints,
    endpoints,
    st.binary(max_size=100),
)


def damage(stream: bytes, position: int, value: int) -> bytes:
    damaged = bytearray(stream)
    damaged[position % len(damaged)] = value
    return bytes(damaged)


streams = st.one_of(
    valid_streams,
    st.builds(damage, valid_streams, st.integers(0, 60), st.integers(0, 255)),
    st.binary(max_size=200),
)


@settings(max_examples=300, deadline=None)
@given(streams, st.data())
def test_fuzzed_header_path_refuses_or_relays_intact(stream: bytes, data: Any) -> None:
    """
    Arbitrary first bytes from a trusted balancer, split anyhow: either the
    connection is closed with nothing sent upstream, or exactly one target
    connection gets the bytes after the header, intact and in order.
    """
    clock = MemoryReactorClock()
    config = forward(target=("127.0.0.1", 9), accept_proxy_protocol=nets("127.0.0.2/32"))
    factory = tcpfactory.TCPForwardFactory(config, clock)
    factory.bounds.total = 10
    client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 40000))
    assert client is not None
    transport = TCPStringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8000),
        peerAddress=IPv4Address("TCP", "127.0.0.2", 40000),
    )
    client.makeConnection(transport)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=6))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    pieces = [p for p in pieces if p]
    # The transport delivers while it is reading, as a socket would.
    delivered = 0
    while delivered < len(pieces) and transport.producerState == "producing":
        if transport.disconnecting:
            break
        client.dataReceived(pieces[delivered])
        delivered += 1
    try:
        expected = HeaderReader().feed(stream)
    except ProxyHeaderError:
        expected = None
        assert transport.disconnecting
    if transport.disconnecting:
        assert clock.tcpClients == []
        assert sum(factory.refusedCounts.values()) == 1
        client.connectionLost(Failure(ConnectionDone()))
        assert factory.bounds.open == 0 and factory.relays == set()
        return
    if transport.producerState != "paused":
        # Still waiting for the rest of a header: the timer ends the wait.
        assert expected is None and clock.tcpClients == []
        clock.advance(config.connect_timeout)
        assert transport.disconnecting
        return
    assert expected is not None
    [(_, _, target_factory, _, _)] = clock.tcpClients
    target = target_factory.buildProtocol(None)
    assert target is not None
    target_transport = TCPStringTransport()
    target.makeConnection(target_transport)
    assert transport.producerState == "producing"
    for piece in pieces[delivered:]:
        client.dataReceived(piece)
    assert target_transport.value() == expected[1]
