"""
The lean connection set-up (L{goma_twisted.connect}): connects over real
loopback sockets, the failures it reports as Twisted's connector does, and
a relay whose target connects late.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from goma_twisted import ending, policy, tcpfactory
from goma_twisted.accel import port as accel_port
from goma_twisted.accel import transports as connect
from goma_twisted.accel.relay import FastSide
from goma_twisted.sockopts import KEEPALIVE_SECONDS, relay_options

from .support import (
    Echo,
    FullBacklog,
    Recorder,
    accept_raw,
    bound_port,
    captured_logs,
    finished,
    forward,
    listen_tcp,
    read_to_eof,
    start_service,
)
from .support import connect as connect_client


class Attempt:
    """A L{connect.Connecting} and what became of it."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        clock: Any = None,
        loopback: bool | None = None,
        send: bytes = b"",
        timeout: float = 10.0,
    ) -> None:
        self.protocol = Recorder(send=send, halfClose=bool(send))
        self.failure: Failure | None = None
        self.failed: Deferred[None] = Deferred()
        target = connect.TargetAddress(host, port)
        if loopback is not None:
            target.loopback = loopback  # False: wait for the reactor as for a remote target
        self.connecting = connect.Connecting(
            reactor,
            clock or reactor,
            target,
            timeout,
            self.protocol,
            self._failed,
            relay_options(KEEPALIVE_SECONDS),
        )

    def _failed(self, failure: Failure) -> None:
        self.failure = failure
        self.failed.callback(None)


@pytest.fixture
def echo(reactor: Any) -> Any:
    port = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    yield port
    port.stopListening()


@pytest.fixture
def dead_port(reactor: Any) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def full_backlog() -> Any:
    backlog = FullBacklog()
    yield backlog
    backlog.close()


def sockopts(skt: socket.socket) -> tuple[int, int]:
    return (
        skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        skt.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    )


@pytest.mark.parametrize("loopback", [True, False], ids=["asked-at-once", "waited-for"])
@pytest_twisted.ensureDeferred
async def test_connects_to_an_ip_target(reactor: Any, echo: Any, loopback: bool) -> None:
    attempt = Attempt(reactor, "127.0.0.1", echo.getHost().port, loopback=loopback, send=b"hi")
    attempt.connecting.start()
    # A loopback handshake is done within connect(); otherwise it waits.
    assert attempt.connecting.done is loopback
    assert (attempt.connecting in reactor.getWriters()) is not loopback
    assert await finished(reactor, attempt.protocol.lost) == b"hi"
    transport = attempt.protocol.transport
    assert isinstance(transport, connect.RelayConnection)
    assert transport.getPeer() == IPv4Address("TCP", "127.0.0.1", echo.getHost().port)
    assert attempt.failure is None
    assert attempt.connecting not in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_the_transport_owns_the_socket_connected(reactor: Any, echo: Any) -> None:
    attempt = Attempt(reactor, "127.0.0.1", echo.getHost().port)
    attempt.connecting.start()
    await finished(reactor, attempt.protocol.connected_d)
    transport = attempt.protocol.transport
    assert isinstance(transport, connect.RelayConnection)
    assert sockopts(transport.socket) == (1, 1)
    assert transport.socket.gettimeout() == 0.0  # non-blocking, without an ioctl
    assert transport.getHost().host == "127.0.0.1"
    assert transport in reactor.getReaders()
    transport.loseConnection()
    await finished(reactor, attempt.protocol.lost)


@pytest_twisted.ensureDeferred
async def test_ipv6_target(reactor: Any) -> None:
    server = listen_tcp(reactor, protocol.Factory.forProtocol(Echo), interface="::1")
    try:
        attempt = Attempt(reactor, "::1", server.getHost().port, send=b"six")
        attempt.connecting.start()
        assert await finished(reactor, attempt.protocol.lost) == b"six"
        assert attempt.protocol.transport.getPeer() == IPv6Address(  # type: ignore[union-attr]
            "TCP", "::1", server.getHost().port
        )
    finally:
        await server.stopListening()


@pytest.mark.parametrize("loopback", [True, False], ids=["asked-at-once", "waited-for"])
@pytest_twisted.ensureDeferred
async def test_refused_as_twisted_reports_it(reactor: Any, dead_port: int, loopback: bool) -> None:
    attempt = Attempt(reactor, "127.0.0.1", dead_port, loopback=loopback)
    attempt.connecting.start()
    await finished(reactor, attempt.failed)
    failure = attempt.failure
    assert failure is not None
    assert failure.check(error.ConnectionRefusedError)
    expected = error.getConnectError((errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)))
    assert failure.getErrorMessage() == str(expected)
    assert ending.connect_failure_reason(failure) == ending.CONNECT_REFUSED
    assert attempt.connecting not in reactor.getWriters()
    assert not attempt.protocol.connected_d.called


@pytest_twisted.ensureDeferred
async def test_times_out_on_its_clock(reactor: Any, full_backlog: FullBacklog) -> None:
    clock = Clock()
    attempt = Attempt(reactor, "127.0.0.1", full_backlog.port, clock=clock, timeout=3)
    attempt.connecting.start()
    assert not attempt.connecting.done
    assert attempt.connecting in reactor.getWriters()
    clock.advance(2.9)
    await deferLater(reactor, 0.05)
    assert attempt.failure is None
    clock.advance(0.1)
    assert attempt.failure is not None
    assert attempt.failure.check(error.TimeoutError)
    assert attempt.failure.getErrorMessage() == str(error.TimeoutError())
    assert ending.connect_failure_reason(attempt.failure) == ending.CONNECT_TIMEOUT
    assert attempt.connecting not in reactor.getWriters()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_spurious_wake_up_keeps_waiting(reactor: Any, full_backlog: FullBacklog) -> None:
    clock = Clock()
    attempt = Attempt(reactor, "127.0.0.1", full_backlog.port, clock=clock)
    attempt.connecting.start()
    attempt.connecting.doWrite()
    attempt.connecting.doRead()
    assert attempt.failure is None and not attempt.connecting.done
    assert attempt.connecting in reactor.getWriters()
    attempt.connecting.stopConnecting()
    assert attempt.failure is not None and attempt.failure.check(error.UserError)
    assert attempt.failure.getErrorMessage() == str(error.UserError())
    assert attempt.connecting not in reactor.getWriters()
    assert clock.getDelayedCalls() == []
    attempt.connecting.stopConnecting()  # once only


class _NoWatches:
    """A reactor whose epoll has no room left: every registration fails."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def addWriter(self, selectable: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    addReader = addWriter

    def addNewReader(self, reader: Any, fd: int) -> None:
        self.addWriter(reader)


@pytest_twisted.ensureDeferred
async def test_a_reactor_that_cannot_watch_fails_the_attempt(
    reactor: Any, full_backlog: FullBacklog, echo: Any
) -> None:
    # Waiting for a connect, or reading a connected socket, needs an
    # epoll_ctl: when it fails the attempt fails, its socket closed, rather
    # than raising into the accept path and leaving the held client unserved.
    clock = Clock()
    waiting = Attempt(_NoWatches(reactor), "127.0.0.1", full_backlog.port, clock=clock)
    waiting.connecting.start()
    port = echo.getHost().port
    connected = Attempt(_NoWatches(reactor), "127.0.0.1", port, clock=clock, loopback=True)
    connected.connecting.start()
    for attempt in (waiting, connected):
        assert attempt.connecting.done
        assert attempt.failure is not None
        assert attempt.failure.check(error.ConnectError)
        assert os.strerror(errno.ENOSPC) in attempt.failure.getErrorMessage()
        assert ending.connect_failure_reason(attempt.failure) == ending.CONNECT_FAILED
        assert attempt.connecting.fileno() == -1
        assert attempt.protocol.transport is None
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_lost_while_waiting(reactor: Any, full_backlog: FullBacklog) -> None:
    # As when the reactor shuts down: disconnectAll() calls connectionLost.
    clock = Clock()
    attempt = Attempt(reactor, "127.0.0.1", full_backlog.port, clock=clock)
    attempt.connecting.start()
    reactor.removeWriter(attempt.connecting)
    attempt.connecting.connectionLost(Failure(error.ConnectionLost()))
    assert attempt.failure is not None
    assert ending.connect_failure_reason(attempt.failure) == ending.CONNECT_FAILED
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_relay_whose_target_connects_late(reactor: Any, full_backlog: FullBacklog) -> None:
    # The client sends everything and half-closes while the connect to
    # the target is still in progress: nothing is lost, the EOF follows.
    service = start_service(forward(target=("127.0.0.1", full_backlog.port)))
    factory = service.listeners[0].factory  # type: ignore[union-attr]
    payload = os.urandom(200_000)
    client = Recorder(send=payload, halfClose=True)
    try:
        with captured_logs() as logs:
            connect_client(reactor, bound_port(service), client)
            await finished(reactor, client.connected_d)
            while not factory.relays:
                await deferLater(reactor, 0.01)
            [relay] = factory.relays
            await deferLater(reactor, 0.2)
            assert relay.target is None
            # Waiting, the client is not read (its bytes wait in the kernel).
            assert relay.client.transport not in reactor.getReaders()  # type: ignore[union-attr]
            full_backlog.release()
            conn = await accept_raw(reactor, full_backlog.listener)
            with conn:
                received = await read_to_eof(reactor, conn)
                conn.sendall(b"got it")
            assert await finished(reactor, client.lost) == b"got it"
            await deferLater(reactor, 0.05)
    finally:
        await service.stopService()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_CLOSED
    assert end["connectTime"] > 0.2
    assert (end["bytesToTarget"], end["bytesToClient"]) == (len(payload), 6)


@pytest_twisted.ensureDeferred
async def test_a_relay_times_out_connecting_on_its_clock(
    reactor: Any, full_backlog: FullBacklog
) -> None:
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", full_backlog.port), connect_timeout=5), clock=clock
    )
    client = Recorder(send=b"hello", halfClose=True)
    try:
        with captured_logs() as logs:
            connect_client(reactor, bound_port(service), client)
            await finished(reactor, client.connected_d)
            factory = service.listeners[0].factory  # type: ignore[union-attr]
            while not factory.relays:
                await deferLater(reactor, 0.01)
            clock.advance(5)
            assert await finished(reactor, client.lost) == b""
            await deferLater(reactor, 0.05)
    finally:
        await service.stopService()
    [end] = logs.ends()
    assert end["reason"] == ending.CONNECT_TIMEOUT
    assert end["detail"] == str(error.TimeoutError())
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("reuse_port", [False, True])
@pytest_twisted.ensureDeferred
async def test_accepted_sockets_inherit_the_tcp_options(
    reactor: Any, echo: Any, reuse_port: bool
) -> None:
    service = start_service(
        forward(target=("127.0.0.1", echo.getHost().port), reuse_port=reuse_port)
    )
    factory = service.listeners[0].factory  # type: ignore[union-attr]
    client = Recorder(send=b"x")
    try:
        connect_client(reactor, bound_port(service), client)
        while client.received != b"x":
            await deferLater(reactor, 0.01)
        [relay] = factory.relays
        assert isinstance(relay.client.transport, connect.RelayConnection)  # type: ignore[union-attr]
        assert sockopts(relay.client.transport.socket) == (1, 1)  # type: ignore[union-attr]
        assert relay.target is not None
        assert isinstance(relay.target.transport, connect.RelayConnection)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await finished(reactor, client.lost)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_both_ends_of_a_relay_share_their_classes(reactor: Any, echo: Any) -> None:
    # One class for both transports and one for both sides (CPython 3.11
    # specialises the relay's attribute accesses for one class at a time),
    # each still telling its own addresses.
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    factory = service.listeners[0].factory  # type: ignore[union-attr]
    client = Recorder(send=b"x")
    try:
        connect_client(reactor, bound_port(service), client)
        while client.received != b"x":
            await deferLater(reactor, 0.01)
        [relay] = factory.relays
        assert relay.target is not None
        ours: Any = relay.client.transport  # type: ignore[union-attr]
        theirs: Any = relay.target.transport
        assert type(ours) is type(theirs) is connect.RelayConnection
        assert type(relay.client) is type(relay.target) is FastSide
        assert relay.client.fromClient and not relay.target.fromClient
        mine: Any = client.transport.getHost()  # type: ignore[union-attr]
        assert (ours.getPeer().host, ours.getPeer().port) == (mine.host, mine.port)
        assert ours.getHost() == IPv4Address("TCP", "127.0.0.1", bound_port(service))
        assert theirs.getPeer() == IPv4Address("TCP", "127.0.0.1", echo.getHost().port)
        assert theirs.getHost().port == theirs.socket.getsockname()[1]
        assert ours.logPrefix() == f"FastSide,{ours.sessionno},127.0.0.1"
        assert theirs.logPrefix() == "FastSide,client"
        assert not hasattr(relay, "__dict__")
        if connect._OWN_STATE:
            # RelayConnection.__init__'s in-line copy sets on the instance
            # every name that _OWN_STATE checked against Twisted's classes.
            for transport in (ours, theirs):
                assert set(connect._CLASS_STATE) <= set(vars(transport))
        client.transport.loseConnection()  # type: ignore[union-attr]
        await finished(reactor, client.lost)
    finally:
        await service.stopService()


class Accepting(protocol.Factory):
    """Records the address and transport of each connection it serves."""

    def __init__(self) -> None:
        self.served: list[tuple[Any, Any]] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        served = self.served
        built = protocol.Protocol()

        def made(transport: Any) -> None:
            served.append((addr, transport))

        built.makeConnection = made  # type: ignore[method-assign]
        return built


class FailingOnce:
    """A listening socket whose next C{_accept} fails with C{number}."""

    def __init__(self, skt: socket.socket, number: int) -> None:
        self.skt = skt
        self.number = number

    def _accept(self) -> Any:
        number, self.number = self.number, 0
        if number:
            raise OSError(number, os.strerror(number))
        return self.skt._accept()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.skt, name)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_relay_port_accepts_all_waiting_connections(reactor: Any, host: str) -> None:
    factory = Accepting()
    port = accel_port.listen_tcp(reactor, 0, factory, 511, host)
    clients = [socket.socket(port.socket.family) for _ in range(3)]
    try:
        for client in clients:
            client.connect((host, port.getHost().port))
        port.doRead()
        assert len(factory.served) == 3
        for (addr, transport), client in zip(factory.served, clients):
            assert (addr.host, addr.port) == client.getsockname()[:2]
            assert isinstance(transport, connect.RelayConnection)
            assert transport.getPeer() == addr
            assert transport.socket.gettimeout() == 0.0
            assert transport.socket.family == port.socket.family
            assert transport.socket.type == socket.SOCK_STREAM
            transport.socket.close()
        assert [t.sessionno for _, t in factory.served] == [0, 1, 2]
        # Three taken, then none: the next loop takes up to three.
        assert port.numberAccepts == 3
    finally:
        for client in clients:
            client.close()
        port.stopListening()


class AcceptingFrom(Accepting):
    """A factory taking the host and port themselves (as goma-pt's does)."""

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        raise AssertionError("acceptFrom is there")

    def acceptFrom(self, host: str, port: int) -> protocol.Protocol | None:
        if len(self.served) == 1:
            # The second one refused: the port closes its socket.
            self.served.append(((host, port), None))
            return None
        return Accepting.buildProtocol(self, (host, port))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_relay_port_hands_the_host_and_port_to_accept_from(reactor: Any, host: str) -> None:
    factory = AcceptingFrom()
    port = accel_port.listen_tcp(reactor, 0, factory, 511, host)
    clients = [socket.socket(port.socket.family) for _ in range(4)]
    try:
        for client in clients:
            client.connect((host, port.getHost().port))
        port.doRead()
        assert [address for address, _ in factory.served] == [
            tuple(client.getsockname()[:2]) for client in clients
        ]
        refused = [transport is None for _, transport in factory.served]
        assert refused == [False, True, False, False]
        for (address, transport), client in zip(factory.served, clients):
            if transport is None:
                # Closed at once: the client reads its end.
                client.settimeout(5)
                assert client.recv(10) == b""
            else:
                assert isinstance(transport, connect.RelayConnection)
                assert (transport.getPeer().host, transport.getPeer().port) == address
                transport.socket.close()
    finally:
        for client in clients:
            client.close()
        port.stopListening()


class BuildingItsOwn(AcceptingFrom):
    """A subclass overriding C{buildProtocol} alone (a .tac's, say)."""

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.built.append(addr)
        return AcceptingFrom.acceptFrom(self, addr.host, addr.port)  # type: ignore[return-value]

    built: list[Any]


def test_relay_port_calls_a_subclass_own_build_protocol(reactor: Any) -> None:
    factory = BuildingItsOwn()
    factory.built = []
    port = accel_port.listen_tcp(reactor, 0, factory, 511, "127.0.0.1")
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        port.doRead()
        [addr] = factory.built
        assert (addr.host, addr.port) == client.getsockname()
        [(_, transport)] = factory.served
        transport.socket.close()
    finally:
        client.close()
        port.stopListening()


def test_accept_from_only_where_build_protocol_is_the_one_calling_it() -> None:
    class OwnAcceptFrom(tcpfactory.TCPForwardFactory):
        def acceptFrom(self, host: str, port: int) -> Any:
            return None

    class OwnBuildProtocol(tcpfactory.TCPForwardFactory):
        def buildProtocol(self, addr: Any) -> Any:
            return None

    def ask(klass: Any) -> Any:
        factory = klass.__new__(klass)
        acceptFrom = accel_port.accept_from(factory)
        return None if acceptFrom is None else acceptFrom.__func__  # type: ignore[attr-defined]

    assert ask(tcpfactory.TCPForwardFactory) is tcpfactory.TCPForwardFactory.acceptFrom
    assert ask(OwnAcceptFrom) is OwnAcceptFrom.acceptFrom
    assert ask(OwnBuildProtocol) is None
    assert ask(Accepting) is None
    assert ask(AcceptingFrom) is AcceptingFrom.acceptFrom


def test_relay_port_goes_on_past_an_aborted_connection(reactor: Any) -> None:
    factory = Accepting()
    port = accel_port.listen_tcp(reactor, 0, factory, 511, "127.0.0.1")
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        listening = port.socket
        port.socket = FailingOnce(listening, errno.ECONNABORTED)
        port.doRead()
        [(addr, transport)] = factory.served
        assert addr.port == client.getsockname()[1]
        transport.socket.close()
    finally:
        client.close()
        port.socket = listening
        port.stopListening()


class Refusing(Accepting):
    """Records the refusals the port reports too."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[tuple[str, str, str]] = []

    def refused(self, client: str, refusal: str, detail: str = "") -> None:
        self.refusals.append((client, refusal, detail))


@pytest.mark.parametrize("number", [errno.EMFILE, errno.ENFILE])
def test_out_of_descriptors_the_relay_port_pauses_accepting(reactor: Any, number: int) -> None:
    # As nginx: a listener that stays readable while accept() cannot take a
    # descriptor would spin (and log) without end; it pauses instead.
    factory = Refusing()
    port = accel_port.listen_tcp(reactor, 0, factory, 511, "127.0.0.1")
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        listening = port.socket
        port.socket = FailingOnce(listening, number)
        port.doRead()
        assert factory.served == []
        assert port not in reactor.getReaders()
        [(_, refusal, detail)] = factory.refusals
        assert refusal == policy.NO_DESCRIPTORS
        assert errno.errorcode[number] in detail
        port.doRead()  # a second failure while paused is not logged again
        assert len(factory.refusals) == 1
        assert port._paused is not None and port._paused.active()
        port._paused.cancel()
        port._resume()
        assert port in reactor.getReaders()
        port.doRead()
        [(addr, transport)] = factory.served
        assert addr.port == client.getsockname()[1]
        transport.socket.close()
    finally:
        client.close()
        port.socket = listening
        port.stopListening()
