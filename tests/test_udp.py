"""
The UDP relay over real loopback sockets, with a Clock for session expiry.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from goma_twisted import udp
from goma_twisted.udp_readers import Readers
from goma_twisted.udp_sweep import IdleSweep
from goma_twisted.udp_table import SessionTable, expiry

from .support import (
    FakeResolver,
    ResolvingReactor,
    UDPEcho,
    bound_port,
    captured_logs,
    forward,
    open_fds,
    start_service,
    udp_relay,
    unreachable_udp_port,
)


class UDPClient(protocol.DatagramProtocol):
    """Sends datagrams to one address and queues what comes back."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, Any]] = []
        self._waiting: list[Deferred[bytes]] = []

    def send(self, data: bytes, port: int, host: str = "127.0.0.1") -> None:
        self.transport.write(data, (host, port))  # type: ignore[union-attr]

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.replies.append((data, addr))
        if self._waiting:
            self._waiting.pop(0).callback(data)

    async def reply(self, reactor: Any, timeout: float = 5) -> bytes:
        if len(self.replies) > self._consumed:
            self._consumed += 1
            return self.replies[self._consumed - 1][0]
        d: Deferred[bytes] = Deferred()
        self._waiting.append(d)
        data = await d.addTimeout(timeout, reactor)
        self._consumed += 1
        return data

    _consumed = 0


@pytest.fixture
def ports(reactor: Any) -> Any:
    """Listening ports opened by a test, closed after it."""
    opened: list[Any] = []
    yield opened
    for port in opened:
        port.stopListening()


@pytest.fixture
def services() -> Any:
    started: list[Any] = []
    yield started
    for service in started:
        pytest_twisted.blockon(service.stopService())


def client(reactor: Any, ports: list[Any], interface: str = "127.0.0.1") -> UDPClient:
    c = UDPClient()
    ports.append(reactor.listenUDP(0, c, interface=interface, maxPacketSize=65535))
    return c


def echo(reactor: Any, ports: list[Any], prefix: bytes = b"", interface: str = "127.0.0.1") -> Any:
    backend = UDPEcho(prefix)
    port = reactor.listenUDP(0, backend, interface=interface, maxPacketSize=65535)
    ports.append(port)
    return backend, port.getHost().port


@pytest_twisted.ensureDeferred
async def test_roundtrip(reactor: Any, ports: list[Any], services: list[Any]) -> None:
    backend, backend_port = echo(reactor, ports, prefix=b"echo:")
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port)))
    services.append(service)
    c = client(reactor, ports)
    listen = bound_port(service, "udp")
    c.send(b"one", listen)
    assert await c.reply(reactor) == b"echo:one"
    c.send(b"two", listen)
    assert await c.reply(reactor) == b"echo:two"
    # Replies come from the listening port, and one session served both.
    assert {addr[1] for _, addr in c.replies} == {listen}
    assert len({addr for _, addr in backend.received}) == 1
    relay = udp_relay(service)
    assert len(relay.sessions) == 1


@pytest_twisted.ensureDeferred
async def test_many_peers_each_get_their_own_replies(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    backend, backend_port = echo(reactor, ports)
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port)))
    services.append(service)
    listen = bound_port(service, "udp")
    clients = [client(reactor, ports) for _ in range(40)]
    for i, c in enumerate(clients):
        for j in range(3):
            c.send(f"client {i} message {j}".encode(), listen)
    for i, c in enumerate(clients):
        got = sorted([await c.reply(reactor) for _ in range(3)])
        assert got == [f"client {i} message {j}".encode() for j in range(3)]
    # One session socket per client toward the backend.
    assert len({addr for _, addr in backend.received}) == 40


@pytest_twisted.ensureDeferred
async def test_largest_datagram_passes_intact(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports)
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port)))
    services.append(service)
    c = client(reactor, ports)
    payload = os.urandom(65_507)
    c.send(payload, bound_port(service, "udp"))
    assert await c.reply(reactor) == payload


@pytest_twisted.ensureDeferred
async def test_idle_sessions_expire_and_free_their_sockets(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports)
    clock = Clock()
    service = start_service(
        forward(("udp",), ("127.0.0.1", backend_port), udp_idle_timeout=60.0), clock=clock
    )
    services.append(service)
    listen = bound_port(service, "udp")
    clients = [client(reactor, ports) for _ in range(20)]
    before = open_fds()
    with captured_logs() as logs:
        for c in clients:
            c.send(b"hi", listen)
        for c in clients:
            await c.reply(reactor)
        assert open_fds() == before + 20
        clock.advance(30)
        clients[0].send(b"still here", listen)
        assert await clients[0].reply(reactor) == b"still here"
        clock.advance(30)  # 60 s idle for 19 sessions, 30 s for the first
        await deferLater(reactor, 0.05)
        assert open_fds() == before + 1
        clock.advance(30)
        await deferLater(reactor, 0.05)
    assert open_fds() == before
    assert clock.getDelayedCalls() == []
    ends = logs.ends()
    assert len(ends) == 20
    assert {e["reason"] for e in ends} == {udp.IDLE_TIMEOUT}
    first = [e for e in ends if e["datagramsToTarget"] == 2]
    assert len(first) == 1 and first[0]["duration"] == 90
    assert first[0]["bytesToTarget"] == first[0]["bytesToClient"] == len(b"histill here")


@pytest_twisted.ensureDeferred
async def test_session_bound_refuses_new_clients_only(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports)
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port), max_sessions=3))
    services.append(service)
    listen = bound_port(service, "udp")
    relay = udp_relay(service)
    assert relay.max_sessions == 3
    inside = [client(reactor, ports) for _ in range(3)]
    for c in inside:
        c.send(b"in", listen)
        assert await c.reply(reactor) == b"in"
    with captured_logs() as logs:
        outside = client(reactor, ports)
        for _ in range(5):
            outside.send(b"let me in", listen)
        for c in inside:
            c.send(b"again", listen)
            assert await c.reply(reactor) == b"again"
    assert outside.replies == []
    assert relay.refusedAtBound == 5
    assert len(relay.sessions) == 3
    warnings = [e for e in logs.events if "bound" in e["log_format"]]
    assert len(warnings) == 1


@pytest_twisted.ensureDeferred
async def test_icmp_refused_keeps_the_forward_and_the_session(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    # A target port nobody listens on yet: the kernel answers with ICMP
    # port unreachable, which the session socket reports as refused.
    with unreachable_udp_port() as target_port:
        service = start_service(forward(("udp",), ("127.0.0.1", target_port)))
        services.append(service)
        listen = bound_port(service, "udp")
        c = client(reactor, ports)
        for _ in range(3):
            c.send(b"hello?", listen)
            await deferLater(reactor, 0.05)
        relay = udp_relay(service)
        [session] = relay.sessions.values()
        assert session.refusals >= 1
    backend = UDPEcho(b"up:")
    ports.append(reactor.listenUDP(target_port, backend, interface="127.0.0.1"))
    c.send(b"now?", listen)
    assert await c.reply(reactor) == b"up:now?"
    assert list(relay.sessions.values()) == [session]


@pytest_twisted.ensureDeferred
async def test_hostname_target_resolved_when_a_session_starts(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports, prefix=b"resolved:")
    resolver = FakeResolver(reactor, {"dns.test": ["127.0.0.1"]}, delay=0.1)
    service = start_service(
        forward(("udp",), ("dns.test", backend_port)), reactor=ResolvingReactor(reactor, resolver)
    )
    services.append(service)
    listen = bound_port(service, "udp")
    first, second = client(reactor, ports), client(reactor, ports)
    first.send(b"a", listen)
    first.send(b"b", listen)  # queued while the name resolves
    assert sorted([await first.reply(reactor), await first.reply(reactor)]) == [
        b"resolved:a",
        b"resolved:b",
    ]
    second.send(b"c", listen)
    assert await second.reply(reactor) == b"resolved:c"
    assert resolver.lookups == ["dns.test", "dns.test"]


@pytest_twisted.ensureDeferred
async def test_unresolvable_target_ends_the_session(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    resolver = FakeResolver(reactor, {})
    service = start_service(
        forward(("udp",), ("nowhere.test", 53)), reactor=ResolvingReactor(reactor, resolver)
    )
    services.append(service)
    c = client(reactor, ports)
    with captured_logs() as logs:
        c.send(b"q", bound_port(service, "udp"))
        await deferLater(reactor, 0.1)
    [end] = logs.ends()
    assert end["reason"] == udp.RESOLVE_FAILED
    relay = udp_relay(service)
    assert relay.sessions == {}


@pytest_twisted.ensureDeferred
async def test_ipv6(reactor: Any, ports: list[Any], services: list[Any]) -> None:
    _, backend_port = echo(reactor, ports, prefix=b"v6:", interface="::1")
    service = start_service(forward(("udp",), ("::1", backend_port), address="::1"))
    services.append(service)
    c = client(reactor, ports, interface="::1")
    c.send(b"hello", bound_port(service, "udp"), host="::1")
    assert await c.reply(reactor) == b"v6:hello"


@pytest_twisted.ensureDeferred
async def test_stop_ends_sessions_and_leaves_no_timers(reactor: Any, ports: list[Any]) -> None:
    _, backend_port = echo(reactor, ports)
    clock = Clock()
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port)), clock=clock)
    listen = bound_port(service, "udp")
    clients = [client(reactor, ports) for _ in range(5)]
    for c in clients:
        c.send(b"x", listen)
        await c.reply(reactor)
    before = open_fds()
    with captured_logs() as logs:
        await service.stopService()
        await deferLater(reactor, 0.05)
    assert [e["reason"] for e in logs.ends()] == [udp.SHUTDOWN] * 5
    assert clock.getDelayedCalls() == []
    assert open_fds() == before - 6  # five sessions and the listener


@pytest_twisted.ensureDeferred
async def test_udp_responses_ends_a_session_once_answered(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports, prefix=b"answer:")
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port), udp_responses=1))
    services.append(service)
    listen = bound_port(service, "udp")
    c = client(reactor, ports)
    before = open_fds()
    with captured_logs() as logs:
        for query in (b"q1", b"q2"):
            c.send(query, listen)
            assert await c.reply(reactor) == b"answer:" + query
            await deferLater(reactor, 0.05)
            assert udp_relay(service).sessions == {}
            assert open_fds() == before
    ends = logs.ends()
    assert [e["reason"] for e in ends] == [udp.ANSWERED, udp.ANSWERED]
    assert [(e["datagramsToTarget"], e["datagramsToClient"]) for e in ends] == [(1, 1), (1, 1)]


class FailingSocket:
    """A socket whose every send fails with C{error}."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def send(self, data: bytes) -> int:
        raise self.error

    def sendto(self, data: bytes, address: Any) -> int:
        raise self.error


class FailingTransport:
    def __init__(self, error: OSError) -> None:
        self.socket = FailingSocket(error)


@pytest.mark.parametrize(
    "error", [BlockingIOError(), OSError(90, "Message too long"), ConnectionRefusedError()]
)
def test_a_failed_reply_or_send_is_dropped_and_counted(error: OSError) -> None:
    # Replies and sends go to the socket directly: its errors are drops
    # counted by reason, never exceptions out of the reactor's read loop.
    relay = udp.UDPForward(forward(("udp",)), 10, reactor=Clock())
    relay.transport = FailingTransport(error)  # type: ignore[assignment]
    session = udp.UDPSession(relay, ("127.0.0.1", 5353))
    session.datagramReceived(b"answer")
    assert relay.stats.dropped[udp.REPLY_FAILED] == 1
    assert session.datagramsToClient == relay.stats.datagrams_to_client == 0
    assert session.answers == 1  # it came, even if it could not be passed on
    session.state = udp.State.OPEN
    session.socket = FailingSocket(error)  # type: ignore[assignment]
    session.send(b"query")
    assert relay.stats.dropped[udp.SEND_FAILED] == 1
    assert session.datagramsToTarget == 0
    assert session.refusals == (1 if isinstance(error, ConnectionRefusedError) else 0)


@pytest_twisted.ensureDeferred
async def test_icmp_error_reported_by_epoll_keeps_the_session_reading(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    # The ICMP error arrives while nothing is sent: epoll reports the socket
    # in error with nothing to read, the reactor drops it as lost, and the
    # session counts the refusal and reads the socket again.
    with unreachable_udp_port() as target_port:
        service = start_service(forward(("udp",), ("127.0.0.1", target_port)))
        services.append(service)
        relay = udp_relay(service)
        c = client(reactor, ports)
        before = open_fds()
        c.send(b"anyone?", bound_port(service, "udp"))
        for _ in range(50):
            await deferLater(reactor, 0.01)
            if relay.stats.unreachable:
                break
        [session] = relay.sessions.values()
        assert session.refusals == relay.stats.unreachable == 1
        assert session in reactor.getReaders()
        assert open_fds() == before + 1
    ports.append(reactor.listenUDP(target_port, UDPEcho(b"back:"), interface="127.0.0.1"))
    c.send(b"again", bound_port(service, "udp"))
    assert await c.reply(reactor) == b"back:again"
    assert relay.stats.datagrams_to_client == 1


class FanOut(protocol.DatagramProtocol):
    """Answers each datagram with C{count} numbered datagrams."""

    def __init__(self, count: int) -> None:
        self.count = count

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        for i in range(self.count):
            self.transport.write(b"%d" % i, addr)  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_burst_larger_than_one_read_event_arrives_whole(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    count = udp.READS_PER_EVENT * 3 + 5
    port = reactor.listenUDP(0, FanOut(count), interface="127.0.0.1")
    ports.append(port)
    service = start_service(forward(("udp",), ("127.0.0.1", port.getHost().port)))
    services.append(service)
    c = client(reactor, ports)
    c.send(b"go", bound_port(service, "udp"))
    got = [await c.reply(reactor) for _ in range(count)]
    assert sorted(got) == sorted(b"%d" % i for i in range(count))
    [session] = udp_relay(service).sessions.values()
    assert session.datagramsToClient == count


class EndlessSocket:
    """A connected socket with always one more datagram to read."""

    def __init__(self) -> None:
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return b"more"


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, address: Any) -> int:
        self.sent.append((data, address))
        return len(data)


class RecordingTransport:
    def __init__(self) -> None:
        self.socket = RecordingSocket()


def test_one_read_event_reads_a_bounded_number_of_datagrams() -> None:
    relay = udp.UDPForward(forward(("udp",)), 10, reactor=Clock())
    relay.transport = RecordingTransport()  # type: ignore[assignment]
    session = udp.UDPSession(relay, ("127.0.0.1", 5353))
    session.socket = EndlessSocket()  # type: ignore[assignment]
    session.doRead()
    assert session.socket.reads == udp.READS_PER_EVENT  # type: ignore[attr-defined]
    assert session.datagramsToClient == udp.READS_PER_EVENT
    assert relay.stats.datagrams_to_client == udp.READS_PER_EVENT


@pytest_twisted.ensureDeferred
async def test_churn_of_answered_sessions_returns_to_baseline(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    # Every query from a new source port, as the DNS churn benchmark does:
    # each session opens, is answered, and frees its socket and its timer.
    _, backend_port = echo(reactor, ports, prefix=b"a:")
    clock = Clock()
    service = start_service(
        forward(("udp",), ("127.0.0.1", backend_port), udp_responses=1), clock=clock
    )
    services.append(service)
    listen = bound_port(service, "udp")
    clients = [client(reactor, ports) for _ in range(30)]
    relay = udp_relay(service)
    before = open_fds()
    with captured_logs() as logs:
        for i, c in enumerate(clients):
            c.send(b"q%d" % i, listen)
        for i, c in enumerate(clients):
            assert await c.reply(reactor) == b"a:q%d" % i
        await deferLater(reactor, 0.05)
    assert relay.sessions == {}
    assert open_fds() == before
    # The idle sweep, timed for the first session, finds nothing and stops.
    assert len(clock.getDelayedCalls()) <= 1
    clock.advance(300)
    assert clock.getDelayedCalls() == []
    assert relay.stats.sessions_created == 30
    assert relay.stats.sessions_active == 0
    assert relay.stats.sessions_ended[udp.ANSWERED] == 30
    assert relay.stats.datagrams_to_target == relay.stats.datagrams_to_client == 30
    assert relay.stats.bytes_to_target == sum(len(b"q%d" % i) for i in range(30))
    assert [e["reason"] for e in logs.ends()] == [udp.ANSWERED] * 30
    assert {e["targetAddress"] for e in logs.ends()} == {f"127.0.0.1:{backend_port}"}


@pytest_twisted.ensureDeferred
async def test_a_socket_that_cannot_connect_ends_the_session(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    # connect() to the broadcast address without SO_BROADCAST fails (EACCES).
    service = start_service(forward(("udp",), ("255.255.255.255", 53)))
    services.append(service)
    relay = udp_relay(service)
    c = client(reactor, ports)
    before = open_fds()
    with captured_logs() as logs:
        c.send(b"q", bound_port(service, "udp"))
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    assert end["reason"] == udp.SOCKET_FAILED
    assert end["detail"]
    assert relay.sessions == {}
    assert relay.stats.dropped[udp.SOCKET_FAILED] == 1
    assert relay.stats.sessions_active == 0
    assert open_fds() == before


@pytest_twisted.ensureDeferred
async def test_a_read_error_other_than_refused_ends_the_session(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports)
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port)))
    services.append(service)
    relay = udp_relay(service)
    c = client(reactor, ports)
    c.send(b"x", bound_port(service, "udp"))
    await c.reply(reactor)
    [session] = relay.sessions.values()

    class Unreachable:
        def recv(self, size: int) -> bytes:
            raise OSError(113, "No route to host")

        def fileno(self) -> int:
            return real.fileno()

        def close(self) -> None:
            real.close()

    real = session.socket
    session.socket = Unreachable()  # type: ignore[assignment]
    with captured_logs() as logs:
        session.doRead()
    [end] = logs.ends()
    assert end["reason"] == udp.SOCKET_FAILED
    assert end["detail"] == "[Errno 113] No route to host"
    assert relay.sessions == {}
    assert session not in reactor.getReaders()


class SilentSocket:
    """A connected socket for sessions that are never read from."""

    def send(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


class NoReactor:
    """Sessions opened by hand register with nothing."""

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass


def idle_relay(clock: Clock, timeout: float) -> udp.UDPForward:
    relay = udp.UDPForward(
        forward(("udp",), udp_idle_timeout=timeout), 100, reactor=NoReactor(), clock=clock
    )
    relay.transport = RecordingTransport()  # type: ignore[assignment]
    return relay


def open_session(relay: udp.UDPForward, port: int, answered: bool = True) -> udp.UDPSession:
    """
    A session opened by hand, with a socket that is never read; answered
    (as most of these tests want) or not, as if the target had replied.
    """
    session = udp.UDPSession(relay, ("127.0.0.1", port))
    relay.table.add(("127.0.0.1", port), session)
    relay.stats.opened()
    timeout = relay.config.udp_idle_timeout
    if answered:
        session.answers = 1
        relay.table.answered(session)
    else:
        timeout = min(timeout, udp.UNANSWERED_TIMEOUT)
    relay.watch(session, session.started + timeout)
    session.state = udp.State.OPEN
    session.socket = SilentSocket()  # type: ignore[assignment]
    return session


def test_idle_sweep_ends_sessions_within_the_granularity_never_before() -> None:
    clock = Clock()
    relay = idle_relay(clock, 30.0)
    assert relay.granularity == 1.0
    clock.advance(0.25)
    early, late = open_session(relay, 1), open_session(relay, 2)
    assert len(clock.getDelayedCalls()) == 1  # one timer for the forward
    clock.advance(10)
    late.send(b"keep me")  # at 10.25: idle until 40.25
    clock.advance(20)  # 30.25: the first is due at 31 (30.25 rounded up)
    assert early.reason is None
    clock.advance(0.75)
    assert early.reason == udp.IDLE_TIMEOUT
    assert late.reason is None
    clock.advance(9.25)  # 40.25
    assert late.reason is None
    clock.advance(0.75)
    assert late.reason == udp.IDLE_TIMEOUT
    assert relay.sessions == {}
    assert relay.stats.sessions_ended[udp.IDLE_TIMEOUT] == 2
    assert clock.getDelayedCalls() == []


def test_idle_sweep_granularity_follows_short_timeouts() -> None:
    clock = Clock()
    relay = idle_relay(clock, 2.0)
    assert relay.granularity == pytest.approx(0.2)
    session = open_session(relay, 1)
    clock.advance(1.9)
    assert session.reason is None
    clock.advance(0.15)
    assert session.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_a_session_ended_before_its_sweep_leaves_it() -> None:
    clock = Clock()
    relay = idle_relay(clock, 30.0)
    sessions = [open_session(relay, port) for port in range(1, 6)]
    for session in sessions:
        session.close(udp.ANSWERED)
    # No session waits in a bucket (the last one used stays, empty, for the
    # next session, until its sweep).
    assert not any(relay.sweep._buckets.values())
    assert len(relay.sweep._buckets) <= 1
    clock.advance(30)
    assert relay.sweep._buckets == {}
    assert clock.getDelayedCalls() == []
    assert relay.stats.sessions_ended[udp.ANSWERED] == 5
    assert relay.stats.sessions_ended[udp.IDLE_TIMEOUT] == 0


def test_a_shorter_timeout_after_a_reload_moves_the_sweep_earlier() -> None:
    clock = Clock()
    relay = idle_relay(clock, 300.0)
    first = open_session(relay, 1)
    relay.reconfigure(forward(("udp",), udp_idle_timeout=5.0))
    second = open_session(relay, 2)
    clock.advance(5)
    assert second.reason == udp.IDLE_TIMEOUT
    # The open session keeps its bucket and its own timeout.
    assert first.reason is None
    clock.advance(295)
    assert first.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_an_open_session_keeps_its_idle_timeout_through_a_reload() -> None:
    # The README: new sessions get a reload's settings, live ones keep theirs.
    clock = Clock()
    relay = idle_relay(clock, 10.0)
    short = open_session(relay, 1)
    relay.reconfigure(forward(("udp",), udp_idle_timeout=600.0))
    clock.advance(11)  # past its own 10 s, rounded up to the granularity
    assert short.reason == udp.IDLE_TIMEOUT
    long = open_session(relay, 2)
    relay.reconfigure(forward(("udp",), udp_idle_timeout=5.0))
    clock.advance(500)
    long.send(b"busy")  # at 511: idle until 1111 by its own 600 s
    clock.advance(100)  # 611: its first check; 5 s would end it here
    assert long.reason is None
    clock.advance(499)
    assert long.reason is None
    clock.advance(2)
    assert long.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_an_open_session_keeps_its_udp_responses_through_a_reload() -> None:
    relay = udp.UDPForward(forward(("udp",)), 10, reactor=NoReactor(), clock=Clock())
    relay.transport = RecordingTransport()  # type: ignore[assignment]
    before = relay._newSession(("127.0.0.1", 5353))
    relay.reconfigure(forward(("udp",), udp_responses=1))
    after = relay._newSession(("127.0.0.1", 5354))
    assert before is not None and after is not None
    before.datagramReceived(b"answer")
    after.datagramReceived(b"answer")
    assert before.reason is None  # no udpResponses when it started
    assert after.reason == udp.ANSWERED
    before.close(udp.SHUTDOWN)


def test_a_session_moved_later_by_the_sweep_does_not_delay_an_earlier_bucket() -> None:
    clock = Clock()
    relay = idle_relay(clock, 10.0)
    busy = open_session(relay, 1)  # checked at 10
    clock.advance(0.5)
    quiet = open_session(relay, 2)  # idle from 10.5: checked at 11
    clock.advance(4.5)
    busy.send(b"still here")  # at 5: idle from 15
    clock.advance(5)  # 10: the sweep moves the busy one to 15
    assert busy.reason is None and quiet.reason is None
    clock.advance(1)  # 11: never later than timeout + granularity
    assert quiet.reason == udp.IDLE_TIMEOUT
    assert busy.reason is None
    clock.advance(4)
    assert busy.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_a_deadline_that_rounds_below_itself_is_checked_once_after_it() -> None:
    # 3.6 / 0.3 rounds up to 12, and 12 * 0.3 is 3.5999999999999996: a
    # bucket before the deadline, where the sweep would put the session
    # back again and again without the clock moving.
    clock = Clock()
    relay = idle_relay(clock, 3.0)
    clock.advance(0.6000000000000001)
    session = open_session(relay, 1)
    assert relay.sweep._sweepAt is not None and relay.sweep._sweepAt >= 3.6
    clock.advance(relay.sweep._sweepAt - clock.seconds())
    assert session.reason is None or clock.seconds() >= 3.6
    clock.advance(0.3)
    assert session.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_a_forward_listening_again_after_a_stop_still_sweeps() -> None:
    # A rejected reload starts the listeners it had stopped again, with
    # the same UDPForward: its sweep must not think one is still scheduled.
    clock = Clock()
    relay = idle_relay(clock, 10.0)
    open_session(relay, 1)
    relay.stopProtocol()
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    session = open_session(relay, 2)
    clock.advance(11)
    assert session.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


def test_an_open_session_keeps_its_target_through_a_reload() -> None:
    # New sessions go to a reload's new target; one already open keeps its
    # socket, and its end event names the target it used.
    old, new = 9, 10  # connected, never sent to
    relay = udp.UDPForward(
        forward(("udp",), ("127.0.0.1", old)), 10, reactor=NoReactor(), clock=Clock()
    )
    relay.transport = RecordingTransport()  # type: ignore[assignment]
    first = relay._newSession(("127.0.0.1", 5353))
    relay.reconfigure(forward(("udp",), ("127.0.0.1", new)))
    second = relay._newSession(("127.0.0.1", 5354))
    assert first is not None and second is not None
    assert first.socket is not None and second.socket is not None
    assert first.socket.getpeername() == ("127.0.0.1", old)
    assert second.socket.getpeername() == ("127.0.0.1", new)
    with captured_logs() as logs:
        first.close(udp.SHUTDOWN)
        second.close(udp.SHUTDOWN)
    ends = logs.ends()
    assert [(e["target"], e["targetAddress"]) for e in ends] == [
        (f"127.0.0.1:{old}", f"127.0.0.1:{old}"),
        (f"127.0.0.1:{new}", f"127.0.0.1:{new}"),
    ]
    assert [e["client"] for e in ends] == ["127.0.0.1:5353", "127.0.0.1:5354"]
    assert relay.sessions == {}


def test_sessions_starting_within_a_step_share_a_bucket_and_all_are_swept() -> None:
    # watch reuses the previous call's bucket for deadlines less than a
    # step before it; the sweep takes that bucket, and the next watch makes
    # a new one rather than filling the one taken.
    clock = Clock()
    relay = idle_relay(clock, 10.0)
    clock.advance(0.1)
    first = open_session(relay, 1)
    clock.advance(0.5)
    second = open_session(relay, 2)
    assert first.checkAt == second.checkAt == 11.0
    assert list(relay.sweep._buckets) == [11.0]
    clock.advance(10.4)  # 11.0: both idle since 0.1 and 0.6
    assert first.reason == second.reason == udp.IDLE_TIMEOUT
    third = open_session(relay, 3)
    assert third.checkAt == 21.0
    assert relay.sweep._buckets == {21.0: {third: None}}
    clock.advance(10)
    assert third.reason == udp.IDLE_TIMEOUT
    assert relay.sessions == {}
    assert clock.getDelayedCalls() == []


def test_a_forward_listening_again_at_once_still_sweeps_its_bucket() -> None:
    # The bucket kept for the next session is forgotten with the stop:
    # a session opened in the same step after a restart is swept.
    clock = Clock()
    relay = idle_relay(clock, 10.0)
    open_session(relay, 1).close(udp.ANSWERED)
    relay.stopProtocol()
    session = open_session(relay, 2)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(11)
    assert session.reason == udp.IDLE_TIMEOUT
    assert clock.getDelayedCalls() == []


# A full table: unanswered sessions give way; the table as pure logic.


def test_the_oldest_unanswered_session_gives_way() -> None:
    table: SessionTable[int, str] = SessionTable(3)
    for key, session in enumerate(["a", "b", "c"]):
        table.add(key, session)
    assert table.full and table.unanswered == 3
    assert table.victim() == "a"
    table.answered("a")
    assert table.victim() == "b"
    assert table.remove(1, "b")
    assert not table.full
    assert (table.victim(), table.unanswered) == ("c", 1)


def test_answered_sessions_never_give_way() -> None:
    table: SessionTable[int, str] = SessionTable(2)
    table.add(1, "a")
    table.add(2, "b")
    table.answered("a")
    table.answered("b")
    table.answered("b")  # a second answer changes nothing
    assert table.full
    assert (table.victim(), table.unanswered) == (None, 0)


def test_removing_a_session_not_at_its_key_leaves_the_one_there() -> None:
    table: SessionTable[int, str] = SessionTable(2)
    table.add(1, "a")
    assert not table.remove(1, "stale")
    assert table.sessions == {1: "a"}


@pytest.mark.parametrize(
    ("idle", "answered", "expected"),
    [
        (300.0, False, (udp.UNANSWERED_TIMEOUT, True)),
        (300.0, True, (300.0, False)),
        # A timeout shorter than the unanswered one applies as it is.
        (5.0, False, (5.0, False)),
        (udp.UNANSWERED_TIMEOUT, False, (udp.UNANSWERED_TIMEOUT, False)),
    ],
)
def test_unanswered_sessions_expire_sooner(idle: float, answered: bool, expected: Any) -> None:
    assert expiry(idle, answered) == expected


def test_the_sweep_ends_unanswered_sessions_at_the_unanswered_timeout() -> None:
    clock = Clock()
    relay = idle_relay(clock, 300.0)
    silent = open_session(relay, 1, answered=False)
    answered = open_session(relay, 2)
    late = open_session(relay, 3, answered=False)
    clock.advance(10)
    late.answers = 1  # its first answer, at 10 s
    relay.table.answered(late)
    late.lastActivity = clock.seconds()
    assert relay.table.unanswered == 1
    clock.advance(19.5)
    assert silent.reason is None
    clock.advance(1.5)  # 31: past 30, within the sweep's granularity
    assert silent.reason == udp.UNANSWERED
    assert answered.reason is late.reason is None
    clock.advance(269)  # 300: idle since 0
    assert answered.reason == udp.IDLE_TIMEOUT
    assert late.reason is None
    clock.advance(11)  # 311: idle since 10
    assert late.reason == udp.IDLE_TIMEOUT
    assert relay.stats.sessions_ended[udp.UNANSWERED] == 1
    assert relay.stats.sessions_ended[udp.IDLE_TIMEOUT] == 2
    assert relay.table.unanswered == 0


def test_an_idle_timeout_under_the_unanswered_one_is_an_idle_timeout() -> None:
    clock = Clock()
    relay = idle_relay(clock, 5.0)
    silent = open_session(relay, 1, answered=False)
    clock.advance(5.5)
    assert silent.reason == udp.IDLE_TIMEOUT


class Selective(protocol.DatagramProtocol):
    """A target that answers b"query" datagrams and drops all others."""

    def __init__(self) -> None:
        self.dropped = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if data == b"query":
            self.transport.write(b"answer", addr)  # type: ignore[union-attr]
        else:
            self.dropped += 1


@pytest_twisted.ensureDeferred
async def test_a_flood_of_unanswered_sources_gives_way_to_a_real_client(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    target = Selective()
    target_port = reactor.listenUDP(0, target, interface="127.0.0.1")
    ports.append(target_port)
    bound = 20
    service = start_service(
        forward(("udp",), ("127.0.0.1", target_port.getHost().port), max_sessions=bound)
    )
    services.append(service)
    listen = bound_port(service, "udp")
    relay = udp_relay(service)
    inside = client(reactor, ports)
    inside.send(b"query", listen)
    assert await inside.reply(reactor) == b"answer"
    [kept] = relay.sessions.values()
    # 49 one-shot sources the target never answers: 19 fill the table,
    # the next 30 each take the place of the oldest of them.
    with captured_logs() as logs:
        flood = [client(reactor, ports) for _ in range(49)]
        for c in flood:
            c.send(b"flood", listen)
        for _ in range(200):
            if target.dropped == 49:
                break
            await deferLater(reactor, 0.01)
        assert target.dropped == 49
        assert len(relay.sessions) == bound
        assert relay.table.unanswered == bound - 1
        # A real client gets its answer at once, in a full table.
        real = client(reactor, ports)
        real.send(b"query", listen)
        assert await real.reply(reactor, timeout=1) == b"answer"
    assert relay.stats.sessions_ended[udp.EVICTED] == 31
    assert relay.refusedAtBound == 0
    assert relay.sessions[("127.0.0.1", inside.transport.getHost().port)] is kept  # type: ignore[union-attr]
    assert len(relay.sessions) == bound
    evicted = [e for e in logs.ends() if e["reason"] == udp.EVICTED]
    assert len(evicted) == 31
    assert {e["datagramsToClient"] for e in evicted} == {0}
    # Logged once in the interval; the rest is counted.
    assert len([e for e in logs.events if e.get("refusal") == udp.EVICTED]) == 1
    # The oldest flood sources went first: the last 19 are still open.
    open_ports = {addr[1] for addr in relay.sessions}
    assert {c.transport.getHost().port for c in flood[-18:]} <= open_ports  # type: ignore[union-attr]


# The idle sweep as pure logic, on a Clock.


class Item:
    checkAt: float | None = None

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline


def test_the_sweep_checks_each_item_at_its_deadline_rounded_up() -> None:
    clock = Clock()
    checked: list[tuple[Item, float]] = []

    def check(item: Item, now: float) -> float | None:
        checked.append((item, now))
        return item.deadline if item.deadline > now else None

    sweep: IdleSweep[Item] = IdleSweep(clock, 1.0, check)
    early, moved, gone = Item(2.5), Item(1.2), Item(1.5)
    for item in (early, moved, gone):
        sweep.watch(item, item.deadline)
    sweep.unwatch(gone)
    assert len(clock.getDelayedCalls()) == 1
    moved.deadline = 4.0  # active meanwhile: its next check is later
    clock.advance(1.999)
    assert checked == []
    clock.advance(0.001)
    assert checked == [(moved, 2.0)]
    clock.advance(1)
    assert checked[1:] == [(early, 3.0)]
    clock.advance(1)
    assert checked[2:] == [(moved, 4.0)]
    assert (gone.checkAt, clock.getDelayedCalls()) == (None, [])


def test_a_stopped_sweep_has_no_timer_and_can_start_again() -> None:
    clock = Clock()
    sweep: IdleSweep[Item] = IdleSweep(clock, 1.0, lambda item, now: None)
    sweep.watch(Item(5), 5)
    sweep.stop()
    assert clock.getDelayedCalls() == []
    sweep.watch(Item(6), 6)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [6.0]


# A session's life as one state.


@pytest_twisted.ensureDeferred
async def test_a_sessions_state_goes_pending_open_ended(
    reactor: Any, ports: list[Any], services: list[Any]
) -> None:
    _, backend_port = echo(reactor, ports)
    resolver = FakeResolver(reactor, {"dns.test": ["127.0.0.1"]}, delay=0.1)
    service = start_service(
        forward(("udp",), ("dns.test", backend_port)), reactor=ResolvingReactor(reactor, resolver)
    )
    services.append(service)
    listen = bound_port(service, "udp")
    relay = udp_relay(service)
    c = client(reactor, ports)
    c.send(b"waits", listen)
    await deferLater(reactor, 0.01)
    [session] = relay.sessions.values()
    assert session.state is udp.State.PENDING  # the name resolves
    assert await c.reply(reactor) == b"waits"
    assert session.state is udp.State.OPEN
    session.close(udp.SHUTDOWN)
    assert (session.state, session.reason) == (udp.State.ENDED, udp.SHUTDOWN)
    session.close(udp.IDLE_TIMEOUT)  # once ended, it stays as it ended
    assert session.reason == udp.SHUTDOWN
    assert relay.stats.sessions_ended[udp.SHUTDOWN] == 1


def test_a_session_that_cannot_resolve_ends_with_what_it_held() -> None:
    relay = idle_relay(Clock(), 30.0)
    session = udp.UDPSession(relay, ("127.0.0.1", 1))
    relay.table.add(("127.0.0.1", 1), session)
    relay.stats.opened()
    for data in (b"a", b"b"):
        session.send(data)
    assert session.state is udp.State.PENDING
    session._resolveFailed(Failure(OSError("no such name")))
    assert (session.state, session.reason) == (udp.State.ENDED, udp.RESOLVE_FAILED)
    assert relay.stats.dropped[udp.RESOLVE_FAILED] == 2
    assert relay.sessions == {}


# The reactor seam: Twisted's public addReader/removeReader when the
# reactor has none of goma-pt's optional hooks.


class PublicOnly:
    """A reactor with Twisted's public reader calls only, recording sessions'."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.added: list[Any] = []
        self.removed: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.added.append(reader)
        self.reactor.addReader(reader)

    def removeReader(self, reader: Any) -> None:
        self.removed.append(reader)
        self.reactor.removeReader(reader)


def test_the_reactors_hooks_are_used_only_where_it_has_both() -> None:
    class Hooks(NoReactor):
        def addNewReader(self, reader: Any, fd: int) -> None:
            pass

        def closeSocket(self, reader: Any, skt: Any) -> None:
            pass

    hooks = Hooks()
    assert Readers(hooks).accelerated
    assert Readers(hooks).add == hooks.addNewReader
    assert not Readers(NoReactor()).accelerated


@pytest_twisted.ensureDeferred
async def test_sessions_run_on_twisteds_public_reader_calls(
    reactor: Any, ports: list[Any], services: list[Any], monkeypatch: Any
) -> None:
    backend, backend_port = echo(reactor, ports, prefix=b"back:")
    service = start_service(forward(("udp",), ("127.0.0.1", backend_port)))
    services.append(service)
    relay = udp_relay(service)
    # Whatever reactor runs the tests, the sessions see one without hooks.
    public = PublicOnly(reactor)
    monkeypatch.setattr(relay, "readers", Readers(public))
    assert not relay.readers.accelerated
    c = client(reactor, ports)
    listen = bound_port(service, "udp")
    c.send(b"there", listen)
    assert await c.reply(reactor) == b"back:there"
    c.send(b"again", listen)
    assert await c.reply(reactor) == b"back:again"
    assert [data for data, _ in backend.received] == [b"there", b"again"]
    [session] = relay.sessions.values()
    assert public.added == [session]
    assert session in reactor.getReaders()
    fd = session.fileno()
    session.close(udp.SHUTDOWN)
    assert public.removed == [session]
    assert session not in reactor.getReaders()
    with pytest.raises(OSError):
        os.fstat(fd)  # the socket is closed
