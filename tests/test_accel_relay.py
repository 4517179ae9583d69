"""
The accelerated relay's own paths (goma_twisted.accel): sending at once,
raw I/O, ends of streams done without Twisted's disconnect chain. The
behaviour they must keep is tested on both relays in test_tcp.py and the rest.
"""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import socket
import weakref
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet import tcp as twisted_tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import deferLater
from zope.interface import implementer

from goma_twisted import ending, tcp
from goma_twisted.accel import io
from goma_twisted.accel.relay import FastSide

from .support import (
    Recorder,
    bound_port,
    captured_logs,
    client_half_closed,
    connect,
    factory_of,
    finished,
    forward,
    listen_tcp,
    raw_listener,
    read_to_eof,
    reset,
    start_service,
    until,
)
from .test_tcp import Sink


@pytest_twisted.ensureDeferred
async def test_real_connections_send_at_once(
    reactor: Any, echo: Any, services: list[Any], read_path: str
) -> None:
    # The relays above and the end-to-end suite run on the send_now path:
    # this checks that they do.
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    client = Recorder(send=b"ping", halfClose=False)
    connect(reactor, bound_port(service), client)
    [listener] = service.listeners
    factory = listener.factory  # type: ignore[union-attr]
    for _ in range(500):
        if client.received:
            break
        await deferLater(reactor, 0.01)
    [relay] = factory.relays
    assert relay.client.sendsNow and relay.target is not None and relay.target.sendsNow  # type: ignore[union-attr]
    assert relay.client.transport.bufferSize == io.READ_SIZE  # type: ignore[union-attr]
    # Both sides read through relayRead (or its raw or splice kin), which
    # a spurious read event (nothing to read) leaves without effect.
    read = {"raw": "relayRawRead", "splice": "relaySplice"}.get(read_path, "relayRead")
    assert relay.client.transport.doRead == getattr(relay.client, read)  # type: ignore[union-attr]
    assert relay.target.transport.doRead == getattr(relay.target, read)  # type: ignore[union-attr]
    assert relay.client.transport.doRead() is None  # type: ignore[union-attr]
    assert (relay.bytesToTarget, relay.bytesToClient) == (4, 4)
    client.transport.loseConnection()  # type: ignore[union-attr]
    await finished(reactor, client.lost)


class SendingTransport:
    """The parts of Twisted's TCP transport that send_now looks at."""

    def __init__(self, takes: int | Exception, queued: bytes = b"") -> None:
        self.takes = takes
        self.dataBuffer = queued
        self._tempDataLen = 0
        self.disconnecting = False
        self._writeDisconnecting = False
        self._aborting = False
        self.connected = True
        self.socket = self
        self.sent: list[bytes] = []
        self.written: list[bytes] = []

    def send(self, data: bytes) -> int:
        if isinstance(self.takes, Exception):
            raise self.takes
        self.sent.append(data[: self.takes])
        return min(self.takes, len(data))

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_send_now_sends_what_the_socket_takes_and_queues_the_rest() -> None:
    transport = SendingTransport(takes=3)
    io.send_now(transport, b"abcdef")
    assert transport.sent == [b"abc"]
    assert transport.written == [b"def"]
    whole = SendingTransport(takes=100)
    io.send_now(whole, b"abcdef")
    assert (whole.sent, whole.written) == ([b"abcdef"], [])


def test_send_now_queues_a_copy_of_a_views_unsent_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    # A view of the raw read buffer is reused by the next read: what the
    # socket does not take is queued as bytes of its own.
    monkeypatch.setattr(io, "RAW", None)
    buffer = bytearray(b"abcdef")
    transport = SendingTransport(takes=2)
    io.send_now(transport, memoryview(buffer))
    full = SendingTransport(takes=100)
    full.dataBuffer = b"queued"
    io.send_now(full, memoryview(buffer)[:3])
    buffer[:] = b"xxxxxx"
    assert transport.written == [b"cdef"] and type(transport.written[0]) is bytes
    assert full.written == [b"abc"] and type(full.written[0]) is bytes


def test_raw_send_reports_a_full_socket_and_a_closed_peer() -> None:
    # libc's send through cffi: errors as socket.send raises them, and no
    # SIGPIPE for a peer that is gone.
    pytest.importorskip("cffi")
    raw = io.RawIO()
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        raw.view[:5] = b"hello"
        assert io._sendView(ours, raw.view[:5]) == 5
        assert theirs.recv(10) == b"hello"
        with pytest.raises(BlockingIOError):
            while True:
                io._sendView(ours, raw.view)
        theirs.close()
        with pytest.raises(OSError) as caught:
            io._sendView(ours, raw.view[:5])
        assert not isinstance(caught.value, BlockingIOError)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    "state",
    ["dataBuffer", "_tempDataLen", "disconnecting", "_writeDisconnecting", "_aborting", "closed"],
)
def test_send_now_queues_behind_queued_bytes_and_after_a_close(state: str) -> None:
    # Sending while bytes wait in the buffer would reorder the stream, and
    # after loseWriteConnection nothing may be sent at all.
    transport = SendingTransport(takes=100)
    if state == "dataBuffer":
        transport.dataBuffer = b"queued"
    elif state == "closed":
        transport.connected = False
    else:
        setattr(transport, state, 1)
    io.send_now(transport, b"abcdef")
    assert (transport.sent, transport.written) == ([], [b"abcdef"])


@pytest.mark.parametrize("error", [BlockingIOError(), ConnectionResetError(), BrokenPipeError()])
def test_send_now_leaves_a_full_socket_and_errors_to_twisted(error: Exception) -> None:
    transport = SendingTransport(takes=error)
    io.send_now(transport, b"abcdef")
    assert transport.written == [b"abcdef"]


def test_a_transport_without_twisteds_write_counters_keeps_twisteds_paths(reactor: Any) -> None:
    # _tempDataLen is an instance attribute: a Twisted without it must get
    # write() and doRead(), not an AttributeError on every message.
    ours, theirs = socket.socketpair()
    try:
        transport = twisted_tcp.Connection(ours, protocol.Protocol(), reactor)
        del transport._tempDataLen
        side = FastSide(None, False)  # type: ignore[arg-type]
        side.transport = transport  # type: ignore[assignment]
        side.accelerate()
        assert not side.sendsNow
        assert "doRead" not in vars(transport)
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
def ends_of_stream(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """What each L{FastSide.endOfStream} call did: (side, handled)."""
    calls: list[tuple[str, bool]] = []
    original = FastSide.endOfStream

    def spy(self: FastSide) -> bool:
        # Recorded before the call: the relay's end fires its Deferred,
        # and the test goes on, from within it.
        side = "client" if self.fromClient else "target"
        calls.append((side, True))
        handled = original(self)
        calls[calls.index((side, True))] = (side, handled)
        return handled

    monkeypatch.setattr(FastSide, "endOfStream", spy)
    return calls


def _assert_closed(relay: tcp.Relay, reactor: Any) -> None:
    """Both transports left as Twisted's connectionLost leaves them, unwatched."""
    assert relay.target is not None
    for side in (relay.client, relay.target):
        transport: Any = side.transport  # type: ignore[union-attr]
        assert (transport.connected, transport.disconnected) == (0, 1)
        assert transport.producer is None
        assert not hasattr(transport, "socket")
        assert transport not in reactor.getReaders()
        assert transport not in reactor.getWriters()
        assert side.peer is None  # type: ignore[union-attr]
        # What Twisted's loseConnection or connectionLost do later: nothing.
        transport.loseConnection()
        transport.connectionLost(io.CLOSED)


@pytest_twisted.ensureDeferred
async def test_client_fin_then_target_close_end_in_relay_read(
    reactor: Any,
    echo: Any,
    services: list[Any],
    ends_of_stream: list[tuple[str, bool]],
    read_path: str,
) -> None:
    # The short connection's way: the client's FIN goes on to the target
    # at once, the target's close ends both sides, all in relayRead.
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    [listener] = service.listeners
    factory = listener.factory  # type: ignore[union-attr]
    client = Recorder(send=b"ping", halfClose=True)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        assert await finished(reactor, client.lost) == b"ping"
        for _ in range(500):
            if not factory.relays and logs.ends():
                break
            await deferLater(reactor, 0.01)
    assert ends_of_stream == [("client", True), ("target", True)]
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_CLOSED
    assert (end["bytesToTarget"], end["bytesToClient"]) == (4, 4)
    assert end["targetAddress"] == f"127.0.0.1:{echo.getHost().port}"
    stats = factory.stats
    assert (stats.active, stats.closed[ending.CLIENT_CLOSED]) == (0, 1)
    assert factory.bounds.open == 0 and factory.bounds.by_ip == {}


class GreetAndClose(protocol.Protocol):
    """A target that speaks first and closes, reading nothing."""

    def connectionMade(self) -> None:
        self.transport.write(b"bye")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_target_close_then_client_close_end_in_relay_read(
    reactor: Any, services: list[Any], ends_of_stream: list[tuple[str, bool]], read_path: str
) -> None:
    target = listen_tcp(reactor, protocol.Factory.forProtocol(GreetAndClose))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    [listener] = service.listeners
    factory = listener.factory  # type: ignore[union-attr]
    client = Recorder()
    relays: list[tcp.Relay] = []
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        await finished(reactor, client.connected_d)
        for _ in range(500):
            relays.extend(factory.relays)
            if relays:
                break
            await deferLater(reactor, 0.01)
        assert await finished(reactor, client.lost) == b"bye"
        await finished(reactor, relays[0].done)
    target.stopListening()
    assert client.readClosed
    assert ends_of_stream == [("target", True), ("client", True)]
    _assert_closed(relays[0], reactor)
    [end] = logs.ends()
    assert end["reason"] == ending.TARGET_CLOSED
    assert (end["bytesToTarget"], end["bytesToClient"]) == (0, 3)


class SlowSink(Sink):
    """A Sink that reads nothing until told, from a small buffer."""

    instances: list[SlowSink] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        SlowSink.instances.append(self)
        transport: Any = self.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        transport.pauseProducing()


implementer(IHalfCloseableProtocol)(SlowSink)


@pytest_twisted.ensureDeferred
async def test_a_fin_behind_queued_bytes_waits_for_them(
    reactor: Any, services: list[Any], ends_of_stream: list[tuple[str, bool]], read_path: str
) -> None:
    # The target reads nothing at first: bytes wait in the relay's buffer
    # for it when the client's FIN comes, which must go after them, by
    # Twisted's way (loseWriteConnection).
    SlowSink.instances.clear()
    target = listen_tcp(reactor, protocol.Factory.forProtocol(SlowSink))
    # The window the sink offers is set from this at the handshake.
    target.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    [listener] = service.listeners
    factory = listener.factory  # type: ignore[union-attr]
    client = Recorder(send=b"abc")
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        await finished(reactor, client.connected_d)
        for _ in range(500):
            if factory.relays and next(iter(factory.relays)).bytesToTarget == 3:
                break
            await deferLater(reactor, 0.01)
        [relay] = factory.relays
        outgoing: Any = relay.target.transport  # type: ignore[union-attr]
        outgoing.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # More than the small buffers on the way take, below the pause mark
        # (the transport's bufferSize, 64 KiB at least): the client's side
        # still reads, and finds the FIN.
        queued = os.urandom(48_000)
        outgoing.write(queued)
        await deferLater(reactor, 0.05)
        assert outgoing.dataBuffer or outgoing._tempDataLen
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        for _ in range(500):
            if relay.client.flow is not tcp.Flow.OPEN:  # type: ignore[union-attr]
                break
            await deferLater(reactor, 0.01)
        assert relay.client.flow is tcp.Flow.READ_DONE  # type: ignore[union-attr]
        assert outgoing.dataBuffer or outgoing._tempDataLen
        [sink] = SlowSink.instances
        sink.transport.resumeProducing()  # type: ignore[union-attr]
        received = await finished(reactor, client.lost)
        await deferLater(reactor, 0.05)
    target.stopListening()
    sent = b"abc" + queued
    assert received == f"{len(sent)} {hashlib.sha256(sent).hexdigest()}".encode()
    # The client's end was left to Twisted, the target's close was not.
    assert ends_of_stream == [("client", False), ("target", True)]
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_CLOSED
    assert (end["bytesToTarget"], end["bytesToClient"]) == (3, len(received))


@pytest.mark.skipif(
    platform.python_implementation() != "CPython", reason="frees by reference counting"
)
@pytest.mark.parametrize("way", ["lean", "reset"])
@pytest_twisted.ensureDeferred
async def test_an_ended_relay_is_freed_without_the_garbage_collector(
    reactor: Any, way: str
) -> None:
    # Reference counting frees the relay, its sides and their transports as
    # soon as it ends, both by its own end of stream and by Twisted's way.
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    factory = factory_of(service)
    gc.collect()
    gc.disable()
    try:
        with captured_logs() as logs:
            client, conn = await client_half_closed(reactor, service, listener, b"ask")
            [relay] = factory.relays
            assert relay.target is not None
            refs = [
                weakref.ref(thing)
                for thing in (
                    relay,
                    relay.client,
                    relay.target,
                    relay.client.transport,
                    relay.target.transport,
                )
            ]
            del relay
            if way == "lean":
                conn.sendall(b"answer")
                conn.shutdown(socket.SHUT_WR)
                assert await read_to_eof(reactor, client) == b"answer"
            else:
                reset(conn)
            await until(reactor, lambda: not factory.relays)
            # What the reactor's own turn still holds (the event being handled).
            await deferLater(reactor, 0)
            assert [ref() for ref in refs] == [None] * len(refs)
        [end] = logs.ends()
        # The client's half-close came first and names the end either way.
        assert (end["reason"], end["bytesToTarget"]) == (ending.CLIENT_CLOSED, 3)
        client.close()
        conn.close()
    finally:
        gc.enable()
        await service.stopService()
        listener.close()
