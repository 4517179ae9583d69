"""
The TCP relay over real loopback sockets, in the test's reactor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from zope.interface import implementer

from goma_twisted import ending, tcp, tcpfactory

from .support import (
    Echo,
    FakeResolver,
    Recorder,
    ResolvingReactor,
    bound_port,
    captured_logs,
    connect,
    finished,
    forward,
    listen_tcp,
    start_service,
)


@pytest_twisted.ensureDeferred
async def test_roundtrip_and_end_event(
    reactor: Any, echo: Any, services: list[Any], read_path: str
) -> None:
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    client = Recorder(send=b"hello goma", halfClose=True)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        assert await finished(reactor, client.lost) == b"hello goma"
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_CLOSED
    assert end["bytesToTarget"] == 10
    assert end["bytesToClient"] == 10
    assert end["targetAddress"] == f"127.0.0.1:{echo.getHost().port}"
    assert end["client"].startswith("127.0.0.1:")
    assert end["duration"] >= 0


class Sink(protocol.Protocol):
    """Hashes everything it receives; answers with the digest at EOF."""

    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(f"{self.count} {self.digest.hexdigest()}".encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


implementer(IHalfCloseableProtocol)(Sink)


class Source(Recorder):
    """
    Sends C{size} random bytes through a pull producer (so it never buffers
    more than one chunk), then half-closes or closes, and records what it
    receives meanwhile.
    """

    def __init__(self, size: int, halfClose: bool = False) -> None:
        super().__init__(halfClose=halfClose)
        self.remaining = size
        self.digest = hashlib.sha256()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if self.remaining <= 0:
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            if self.halfClose:
                self.transport.loseWriteConnection()  # type: ignore[union-attr]
            else:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        chunk = os.urandom(min(self.remaining, 256 * 1024))
        self.remaining -= len(chunk)
        self.digest.update(chunk)
        self.transport.write(chunk)  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.remaining = 0


class Hasher(Recorder):
    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)


FIFTY_MB = 50 * 1024 * 1024


@pytest.fixture
def fifty_mb_target(reactor: Any) -> Any:
    """A target that sends each client 50 MB; the Sources it made, to check them."""
    sources: list[Source] = []

    def build() -> Source:
        sources.append(Source(FIFTY_MB))
        return sources[-1]

    factory = protocol.Factory()
    factory.protocol = build
    target = listen_tcp(reactor, factory)
    yield target, sources
    target.stopListening()


@pytest_twisted.ensureDeferred
async def test_50_mb_client_to_target_intact(
    reactor: Any, services: list[Any], read_path: str
) -> None:
    target = listen_tcp(reactor, protocol.Factory.forProtocol(Sink))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    source = Source(FIFTY_MB, halfClose=True)
    connect(reactor, bound_port(service), source)
    received = await finished(reactor, source.lost, 60)
    target.stopListening()
    assert received == f"{FIFTY_MB} {source.digest.hexdigest()}".encode()


@pytest_twisted.ensureDeferred
async def test_50_mb_target_to_client_intact(
    reactor: Any, services: list[Any], fifty_mb_target: tuple[Any, list[Source]], read_path: str
) -> None:
    target, sources = fifty_mb_target
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    client = Hasher()
    connect(reactor, bound_port(service), client)
    await finished(reactor, client.lost, 60)
    assert client.count == FIFTY_MB
    assert client.digest.hexdigest() == sources[0].digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_bytes_sent_before_the_target_connects_arrive(
    reactor: Any, services: list[Any]
) -> None:
    # The target is a hostname that takes 0.3 s to resolve: the client has
    # sent everything and half-closed long before the target is connected.
    target = listen_tcp(reactor, protocol.Factory.forProtocol(Sink))
    resolver = FakeResolver(reactor, {"backend.test": ["127.0.0.1"]}, delay=0.3)
    proxied = ResolvingReactor(reactor, resolver)
    service = start_service(
        forward(target=("backend.test", target.getHost().port)), reactor=proxied
    )
    services.append(service)
    payload = os.urandom(300_000)
    client = Recorder(send=payload, halfClose=True)
    connect(reactor, bound_port(service), client)
    received = await finished(reactor, client.lost)
    target.stopListening()
    assert received == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    assert resolver.lookups == ["backend.test"]


class TCPStringTransport(StringTransport):
    keepAlive = noDelay = False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepAlive = enabled

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled


def test_client_is_paused_until_the_target_connects() -> None:
    reactor = MemoryReactorClock()
    factory = tcpfactory.TCPForwardFactory(forward(target=("127.0.0.1", 9)), reactor)
    client = factory.buildProtocol(None)
    assert client is not None
    client_transport = TCPStringTransport()
    client.makeConnection(client_transport)
    assert client_transport.producerState == "paused"
    [(host, port, target_factory, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("127.0.0.1", 9, 10.0)
    target = target_factory.buildProtocol(None)
    assert target is not None
    target_transport = TCPStringTransport()
    target.makeConnection(target_transport)
    assert client_transport.producerState == "producing"
    assert client_transport.producer is target_transport
    assert target_transport.producer is client_transport
    client.dataReceived(b"early")
    assert target_transport.value() == b"early"
    assert client_transport.keepAlive and target_transport.keepAlive
    assert client_transport.noDelay and target_transport.noDelay


class AnswerAfterEOF(protocol.Protocol):
    """Reads a request until EOF, then answers in full and closes."""

    def connectionMade(self) -> None:
        self.request = b""

    def dataReceived(self, data: bytes) -> None:
        self.request += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"answer to " + self.request + b"." * 100_000)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


implementer(IHalfCloseableProtocol)(AnswerAfterEOF)


@pytest_twisted.ensureDeferred
async def test_client_half_close_still_gets_the_full_answer(
    reactor: Any, services: list[Any], read_path: str
) -> None:
    target = listen_tcp(reactor, protocol.Factory.forProtocol(AnswerAfterEOF))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    client = Recorder(send=b"question", halfClose=True)
    connect(reactor, bound_port(service), client)
    received = await finished(reactor, client.lost)
    target.stopListening()
    assert received == b"answer to question" + b"." * 100_000


class GreetThenListen(protocol.Protocol):
    """Sends a greeting and half-closes, then still reads until the client's EOF."""

    instances: list[GreetThenListen] = []

    def connectionMade(self) -> None:
        GreetThenListen.instances.append(self)
        self.received = b""
        self.eof: Deferred[bytes] = Deferred()
        self.transport.write(b"greeting")  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof.callback(self.received)

    def writeConnectionLost(self) -> None:
        pass


implementer(IHalfCloseableProtocol)(GreetThenListen)


class ReplyAfterEOF(Recorder):
    """A client that, once the server's side is closed, still sends its reply."""

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.transport.write(b"reply after your FIN")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_target_half_close_lets_the_client_keep_sending(
    reactor: Any, services: list[Any], read_path: str
) -> None:
    GreetThenListen.instances.clear()
    target = listen_tcp(reactor, protocol.Factory.forProtocol(GreetThenListen))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    client = ReplyAfterEOF()
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        received = await finished(reactor, client.lost)
        [server] = GreetThenListen.instances
        assert await finished(reactor, server.eof) == b"reply after your FIN"
        await deferLater(reactor, 0.05)
    target.stopListening()
    assert received == b"greeting"
    assert client.readClosed
    [end] = logs.ends()
    assert end["reason"] == ending.TARGET_CLOSED
    assert (end["bytesToTarget"], end["bytesToClient"]) == (20, 8)


@pytest_twisted.ensureDeferred
async def test_refused_target_closes_the_client_promptly(
    reactor: Any, services: list[Any]
) -> None:
    closed = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    dead_port = closed.getHost().port
    await closed.stopListening()
    service = start_service(forward(target=("127.0.0.1", dead_port)))
    services.append(service)
    clients = [Recorder(send=b"anyone there?") for _ in range(3)]
    with captured_logs() as logs:
        for client in clients:
            connect(reactor, bound_port(service), client)
            assert await finished(reactor, client.lost, 5) == b""
        await deferLater(reactor, 0.05)
    ends = logs.ends()
    assert [end["reason"] for end in ends] == [ending.CONNECT_REFUSED] * 3
    assert "refused" in ends[0]["detail"].lower()
    # The operator hears of it once, as a warning naming the target (the
    # next ones within 10 s are counted, not logged).
    [warning] = [e for e in logs.events if e.get("log_level") == LogLevel.warn]
    assert (warning["target"], warning["refusal"]) == (f"127.0.0.1:{dead_port}", "connect refused")


@pytest_twisted.ensureDeferred
async def test_unresolvable_target_closes_the_client_promptly(
    reactor: Any, services: list[Any]
) -> None:
    resolver = FakeResolver(reactor, {})
    service = start_service(
        forward(target=("no-such-host.test", 22)), reactor=ResolvingReactor(reactor, resolver)
    )
    services.append(service)
    client = Recorder(send=b"hello")
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        assert await finished(reactor, client.lost, 5) == b""
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    assert end["reason"] == ending.RESOLVE_FAILED
    assert end["target"] == "no-such-host.test:22"


@pytest.fixture
def full_backlog() -> Any:
    """
    A loopback listener whose accept queue is full: further connection
    attempts never complete their handshake, as with a hung backend.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    yield listener.getsockname()[1]
    for s in [*fillers, listener]:
        s.close()


@pytest_twisted.ensureDeferred
async def test_connect_timeout(reactor: Any, services: list[Any], full_backlog: int) -> None:
    service = start_service(forward(target=("127.0.0.1", full_backlog), connect_timeout=0.5))
    services.append(service)
    client = Recorder(send=b"hello")
    with captured_logs() as logs:
        started = reactor.seconds()
        connect(reactor, bound_port(service), client)
        assert await finished(reactor, client.lost, 10) == b""
        waited = reactor.seconds() - started
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    assert end["reason"] == ending.CONNECT_TIMEOUT
    assert 0.4 <= waited < 5


@pytest_twisted.ensureDeferred
async def test_idle_timeout_counts_from_the_last_byte(
    reactor: Any, echo: Any, services: list[Any], read_path: str
) -> None:
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", echo.getHost().port), idle_timeout=30.0), clock=clock
    )
    services.append(service)
    client = Recorder(send=b"ping")
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        await finished(reactor, client.connected_d)
        while client.received != b"ping":
            await deferLater(reactor, 0.01)
        clock.advance(20)
        client.transport.write(b"pong")  # type: ignore[union-attr]
        while client.received != b"pingpong":
            await deferLater(reactor, 0.01)
        clock.advance(20)  # 40 s since connecting, 20 s since the last byte
        await deferLater(reactor, 0.05)
        assert not client.lost.called
        clock.advance(10)
        assert await finished(reactor, client.lost, 5) == b"pingpong"
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    assert end["reason"] == ending.IDLE_TIMEOUT
    assert end["duration"] == 50
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_stop_closes_live_connections_and_leaves_no_timers(reactor: Any, echo: Any) -> None:
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", echo.getHost().port), idle_timeout=60.0), clock=clock
    )
    port = bound_port(service)
    clients = [Recorder(send=b"x") for _ in range(3)]
    with captured_logs() as logs:
        for client in clients:
            connect(reactor, port, client)
        for client in clients:
            await finished(reactor, client.connected_d)
        while any(c.received != b"x" for c in clients):
            await deferLater(reactor, 0.01)
        assert len(clock.getDelayedCalls()) == 3
        await finished(reactor, service.stopService())
        for client in clients:
            await finished(reactor, client.lost, 5)
    assert [e["reason"] for e in logs.ends()] == [ending.SHUTDOWN] * 3
    assert clock.getDelayedCalls() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest_twisted.ensureDeferred
async def test_ipv6_listen_and_target(reactor: Any, services: list[Any]) -> None:
    target = listen_tcp(reactor, protocol.Factory.forProtocol(Echo), interface="::1")
    service = start_service(forward(target=("::1", target.getHost().port), address="::1"))
    services.append(service)
    client = Recorder(send=b"over IPv6", halfClose=True)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client, host="::1")
        assert await finished(reactor, client.lost) == b"over IPv6"
        await deferLater(reactor, 0.05)
    target.stopListening()
    [end] = logs.ends()
    assert end["targetAddress"] == f"[::1]:{target.getHost().port}"
    assert end["client"].startswith("[::1]:")


@pytest.mark.parametrize(
    ("exception", "reason"),
    [
        ("ConnectionRefusedError", ending.CONNECT_REFUSED),
        ("TimeoutError", ending.CONNECT_TIMEOUT),
        ("TCPTimedOutError", ending.CONNECT_TIMEOUT),
        ("DNSLookupError", ending.RESOLVE_FAILED),
        ("NoRouteError", ending.CONNECT_FAILED),
    ],
)
def test_connect_failure_reasons(exception: str, reason: str) -> None:
    from twisted.internet import error
    from twisted.python.failure import Failure

    assert ending.connect_failure_reason(Failure(getattr(error, exception)())) == reason


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_after_the_close_grace(
    reactor: Any, fifty_mb_target: tuple[Any, list[Source]], read_path: str
) -> None:
    target, sources = fifty_mb_target
    clock = Clock()
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)), clock=clock)
    client = Hasher()
    connect(reactor, bound_port(service), client)
    await finished(reactor, client.connected_d)
    client.transport.pauseProducing()  # type: ignore[union-attr]
    while not sources or sources[0].remaining == FIFTY_MB:
        await deferLater(reactor, 0.01)
    await deferLater(reactor, 0.2)  # the buffers on the way fill up
    stopped = service.stopService()
    await deferLater(reactor, 0.1)
    assert not stopped.called  # the relay cannot flush to a client that does not read
    clock.advance(tcp.CLOSE_GRACE)
    await finished(reactor, stopped, 5)
    client.transport.resumeProducing()  # type: ignore[union-attr]
    await finished(reactor, client.lost, 5)
    assert client.count < FIFTY_MB
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_client_reset_is_reported_with_exact_counts(
    reactor: Any, echo: Any, services: list[Any], read_path: str
) -> None:
    # An RST makes relayRead's recv fail: the relay ends as "client reset".
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    client = Recorder(send=b"hello", halfClose=False)
    [listener] = service.listeners
    factory = listener.factory  # type: ignore[union-attr]
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        for _ in range(500):
            if client.received:
                break
            await deferLater(reactor, 0.01)
        [relay] = factory.relays
        sock = client.transport.socket  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()  # type: ignore[union-attr]
        await finished(reactor, relay.done)
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_RESET
    assert (end["bytesToTarget"], end["bytesToClient"]) == (5, 5)


def test_end_event_labels_follow_a_reload_for_new_connections_only() -> None:
    factory = tcpfactory.TCPForwardFactory(forward(target=("192.0.2.1", 80)), MemoryReactorClock())
    before = tcp.Relay(factory)
    factory.reconfigure(forward(target=("192.0.2.2", 8080)))
    after = tcp.Relay(factory)
    assert before.labels == ("tcp 127.0.0.1:0", "192.0.2.1:80")
    assert after.labels == ("tcp 127.0.0.1:0", "192.0.2.2:8080")
