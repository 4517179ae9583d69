"""
The splice(2) path of the TCP relay (io.SplicePipe, relaySplice) over
real loopback sockets: bytes exact, backpressure, ends, descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.task import Clock, deferLater

from goma_twisted import ending
from goma_twisted.accel import io
from goma_twisted.accel import relay as accel_relay

from .support import (
    Echo,
    accept_raw,
    bound_port,
    captured_logs,
    connect,
    finished,
    forward,
    listen_tcp,
    open_fds,
    raw_client,
    raw_listener,
    read_to_eof,
    relays,
    reset,
    start_service,
    until,
)
from .test_tcp import FIFTY_MB, Hasher, Sink, Source

# Without splice(2) (not Linux) these are skipped on a dev machine; under CI
# (Linux, where goma-pt must find it) they run and fail.
pytestmark = pytest.mark.skipif(
    io.SPLICE is None and not os.environ.get("CI"), reason="no splice(2) here"
)

SIXTY_FOUR_MB = 64 * 1024 * 1024


@pytest.fixture
def services(reactor: Any) -> Any:
    started: list[Any] = []
    yield started
    for service in started:
        pytest_twisted.blockon(service.stopService())


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Splice from the first read on; the byte counts each splice call moved."""
    moved: list[int] = []
    real = io.SPLICE
    assert real is not None

    def counting(src: int, dst: int, count: int) -> int:
        n: int = real(src, dst, count)
        moved.append(n)
        return n

    monkeypatch.setattr(io, "SPLICE", counting)
    monkeypatch.setattr(io, "SPLICE_AFTER", 0)
    return moved


class Pump(Source):
    """A Source that also hashes what it receives back."""

    def connectionMade(self) -> None:
        self.back = hashlib.sha256()
        self.backCount = 0
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.back.update(data)
        self.backCount += len(data)


@pytest_twisted.ensureDeferred
async def test_64_mb_both_ways_switching_mid_stream(
    reactor: Any, services: list[Any], spliced: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each side switches after its first read, whatever it held.
    monkeypatch.setattr(io, "SPLICE_AFTER", 1)
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    pump = Pump(SIXTY_FOUR_MB, halfClose=True)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), pump)
        await until(reactor, lambda: relays(service), 5)
        [relay] = relays(service)
        await finished(reactor, pump.lost, 90)
        await deferLater(reactor, 0.05)
    echo.stopListening()
    assert pump.backCount == SIXTY_FOUR_MB
    assert pump.back.hexdigest() == pump.digest.hexdigest()
    assert relay.client.spliceTried and relay.target.spliceTried
    assert sum(spliced) >= SIXTY_FOUR_MB  # most of it went through the pipes
    [end] = logs.ends()
    assert (end["bytesToTarget"], end["bytesToClient"]) == (SIXTY_FOUR_MB, SIXTY_FOUR_MB)
    assert end["reason"] == ending.CLIENT_CLOSED


@pytest_twisted.ensureDeferred
async def test_eof_after_splicing_delivers_every_byte_then_the_fin(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    target = listen_tcp(reactor, protocol.Factory.forProtocol(Sink))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    source = Source(3 * 1024 * 1024 + 7, halfClose=True)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), source)
        # The Sink answers only after the FIN, with what it got before it.
        received = await finished(reactor, source.lost, 30)
        await deferLater(reactor, 0.05)
    target.stopListening()
    assert received == f"{3 * 1024 * 1024 + 7} {source.digest.hexdigest()}".encode()
    assert spliced
    [end] = logs.ends()
    assert end["bytesToTarget"] == 3 * 1024 * 1024 + 7
    assert end["bytesToClient"] == len(received)


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_pauses_the_spliced_sender(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    sources: list[Source] = []

    def build() -> Source:
        sources.append(Source(FIFTY_MB))
        return sources[-1]

    factory = protocol.Factory()
    factory.protocol = build
    target = listen_tcp(reactor, factory)
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    client = Hasher()
    connect(reactor, bound_port(service), client)
    await finished(reactor, client.connected_d)
    client.transport.pauseProducing()  # type: ignore[union-attr]
    await until(reactor, lambda: sources and sources[0].remaining < FIFTY_MB)
    await deferLater(reactor, 0.5)  # the buffers on the way fill up
    [relay] = relays(service)
    sent = FIFTY_MB - sources[0].remaining
    await deferLater(reactor, 0.3)
    # The target's side stopped reading: the target stopped being able to send.
    assert FIFTY_MB - sources[0].remaining - sent < 4 * io.READ_SIZE
    toClient: Any = relay.client.transport
    held = toClient._tempDataLen + len(toClient.dataBuffer) + relay.target.pipe.held
    assert held <= 2 * io.READ_SIZE
    assert relay.target.transport not in reactor.getReaders()
    client.transport.resumeProducing()  # type: ignore[union-attr]
    await finished(reactor, client.lost, 60)
    target.stopListening()
    assert client.count == FIFTY_MB
    assert client.digest.hexdigest() == sources[0].digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_target_reset_mid_splice_ends_as_target_reset(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    source = Source(FIFTY_MB)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), source)
        conn = await accept_raw(reactor, listener)
        got = 0
        while got < 2 * 1024 * 1024:
            try:
                got += len(conn.recv(1 << 20))
            except BlockingIOError:
                await deferLater(reactor, 0.01)
        reset(conn)
        await finished(reactor, source.lost, 10)
        await until(reactor, lambda: not relays(service))
    listener.close()
    [end] = logs.ends()
    assert end["reason"] == ending.TARGET_RESET
    assert spliced


@pytest_twisted.ensureDeferred
async def test_no_descriptor_leaks_after_spliced_pairs_end_every_way(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    clock = Clock()
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    listener = raw_listener()
    closing = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    timing = start_service(
        forward(target=("127.0.0.1", echo.getHost().port), idle_timeout=5.0), clock=clock
    )
    resetting = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.extend([closing, timing, resetting])
    await deferLater(reactor, 0.1)
    before = open_fds()
    payload = os.urandom(200_000)
    for _ in range(20):
        # Clean close (both FINs), and a client reset with bytes in flight.
        done = []
        for _ in range(5):
            client = raw_client(bound_port(closing))
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            done.append(client)
        for client in done:
            assert len(await read_to_eof(reactor, client)) == len(payload)
            client.close()
        client = raw_client(bound_port(closing))
        client.sendall(payload)
        await until(reactor, lambda: relays(closing))
        reset(client)
        await until(reactor, lambda: not relays(closing))
        # A target reset, with the client still sending.
        client = raw_client(bound_port(resetting))
        conn = await accept_raw(reactor, listener)
        client.sendall(payload[:50_000])
        await until(reactor, lambda: relays(resetting))
        reset(conn)
        await until(reactor, lambda: not relays(resetting))
        client.close()
        # The idle timeout, and a stop's drain: both closed by the relay.
        idle = raw_client(bound_port(timing))
        idle.sendall(payload)
        await until(reactor, lambda: len(relays(timing)) == 1)
        await deferLater(reactor, 0.05)
        clock.advance(6)
        await until(reactor, lambda: not relays(timing))
        idle.close()
    assert io.SplicePipe.live == 0
    # Closes still under way (a reactor turn or two) are waited for.
    await until(reactor, lambda: open_fds() == before, 5)
    for service in (closing, timing, resetting):
        client = raw_client(bound_port(service))
        client.sendall(payload[:1000])
        await until(reactor, lambda s=service: relays(s))
        await deferLater(reactor, 0.05)
        await finished(reactor, service.stopService(), 10)
        services.remove(service)
        client.close()
    echo.stopListening()
    listener.close()
    # The three listening sockets are gone too.
    await until(reactor, lambda: open_fds() <= before - 3, 5)
    assert spliced


@pytest_twisted.ensureDeferred
async def test_without_a_pipe_the_side_goes_on_copying(
    reactor: Any, services: list[Any], spliced: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pipe() -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(accel_relay, "SplicePipe", no_pipe)
    target = listen_tcp(reactor, protocol.Factory.forProtocol(Sink))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    services.append(service)
    source = Source(5 * 1024 * 1024, halfClose=True)
    connect(reactor, bound_port(service), source)
    await until(reactor, lambda: relays(service))
    [relay] = relays(service)
    received = await finished(reactor, source.lost, 30)
    target.stopListening()
    assert received == f"{5 * 1024 * 1024} {source.digest.hexdigest()}".encode()
    assert relay.client.spliceTried and relay.client.pipe is None
    assert spliced == []


@pytest_twisted.ensureDeferred
async def test_past_the_pipe_bound_sides_copy(
    reactor: Any, services: list[Any], spliced: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(io.SplicePipe, "MAX_PIPES", 3)
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    payload = os.urandom(300_000)
    clients = [raw_client(bound_port(service)) for _ in range(3)]
    await until(reactor, lambda: len(relays(service)) == 3)
    await deferLater(reactor, 0.05)
    assert io.SplicePipe.live == 3
    sides = [side for r in relays(service) for side in (r.client, r.target)]
    assert sum(side.pipe is not None for side in sides) == 3
    for client in clients:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
    for client in clients:
        assert await read_to_eof(reactor, client) == payload
        client.close()
    await until(reactor, lambda: not relays(service))
    echo.stopListening()
    assert io.SplicePipe.live == 0


@pytest_twisted.ensureDeferred
async def test_the_proxy_header_still_goes_first(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    listener = raw_listener()
    service = start_service(
        forward(target=("127.0.0.1", listener.getsockname()[1]), proxy_protocol=1)
    )
    services.append(service)
    payload = os.urandom(2 * 1024 * 1024)
    client = raw_client(bound_port(service))
    client.setblocking(True)
    client.sendall(payload[:500_000])  # waiting in the kernel before the target is connected
    client.setblocking(False)
    conn = await accept_raw(reactor, listener)
    rest = payload[500_000:]
    while rest:
        try:
            rest = rest[client.send(rest) :]
        except BlockingIOError:
            await deferLater(reactor, 0.01)
    client.shutdown(socket.SHUT_WR)
    received = await read_to_eof(reactor, conn, 20)
    header, _, data = received.partition(b"\r\n")
    assert header.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert data == payload
    assert spliced
    conn.close()
    client.close()
    listener.close()


# The spots below are reached on purpose, some by calling the reactor's
# doRead by hand at the moment a race would (the same call the reactor
# makes for a read event in the same batch).


async def _linked(reactor: Any, service: Any, listener: socket.socket) -> tuple[Any, Any, Any]:
    """A raw client through C{service} to a raw target: (client, target's conn, relay)."""
    client = raw_client(bound_port(service))
    conn = await accept_raw(reactor, listener)
    await until(reactor, lambda: relays(service))
    [relay] = relays(service)
    await until(reactor, lambda: relay.target is not None and relay.target.pipe is not None)
    return client, conn, relay


async def _hold(reactor: Any, conn: socket.socket, side: Any, payload: bytes) -> int:
    """Send from C{conn} (nobody reading the other end) until C{side}'s pipe holds bytes."""
    sent = 0
    for _ in range(2000):
        if side.pipe.held:
            break
        try:
            sent += conn.send(payload[sent : sent + 256 * 1024])
        except BlockingIOError:
            await deferLater(reactor, 0.005)
    assert side.pipe.held, "the pipe never held bytes"
    await deferLater(reactor, 0.05)  # settled: the peer's socket takes nothing more
    return sent


async def _send_and_read(
    reactor: Any, conn: socket.socket, client: socket.socket, payload: bytes, sent: int
) -> bytes:
    """Send the rest of C{payload} from C{conn} while C{client} reads, then the FIN; all read."""
    chunks: list[bytes] = []
    for _ in range(20000):
        if sent == len(payload):
            break
        with contextlib.suppress(BlockingIOError):
            sent += conn.send(payload[sent : sent + 256 * 1024])
        try:
            chunks.append(client.recv(1 << 20))
        except BlockingIOError:
            await deferLater(reactor, 0.001)
    assert sent == len(payload)
    conn.shutdown(socket.SHUT_WR)
    return b"".join(chunks) + await read_to_eof(reactor, client, 20)


@pytest_twisted.ensureDeferred
async def test_resumed_while_the_pipe_holds_bytes_it_stops_reading_again(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    payload = os.urandom(24 * 1024 * 1024)
    client, conn, relay = await _linked(reactor, service, listener)
    side, fromTarget = relay.target, relay.target.transport
    sent = await _hold(reactor, conn, side, payload)
    assert fromTarget not in reactor.getReaders()
    held, counted, calls = side.pipe.held, relay.bytesToClient, len(spliced)
    # More waiting to be read, and the reactor told to read it (as a
    # resumeProducing from elsewhere would).
    with contextlib.suppress(BlockingIOError):
        sent += conn.send(payload[sent : sent + 64 * 1024])
    fromTarget.startReading()
    await deferLater(reactor, 0.1)
    assert fromTarget not in reactor.getReaders()
    assert (side.pipe.held, relay.bytesToClient) == (held, counted)
    assert len(spliced) == calls  # nothing spliced in (nor out: the client reads nothing)
    received = await _send_and_read(reactor, conn, client, payload, sent)
    assert len(received) == len(payload)
    assert received == payload
    client.close()
    conn.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_spliced_read_with_the_peer_gone_is_counted_and_dropped(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    client, conn, relay = await _linked(reactor, service, listener)
    side, fromClient = relay.client, relay.client.transport
    pipe = side.pipe
    fromClient.stopReading()
    payload = os.urandom(60_000)
    client.sendall(payload)
    await deferLater(reactor, 0.05)
    assert relay.bytesToTarget == 0
    seen: list[Any] = []
    lose = fromClient.loseConnection

    def lateRead(*args: Any) -> Any:
        # The target's loss closes the client's side; the client's read
        # event, in the same batch, comes after it (the reactor does not
        # ask whether the side still reads).
        lose(*args)
        if side.peer is not None:
            return  # Twisted's own stopProducing, before the relay's
        seen.append((side.peer, fromClient.doRead(), pipe.held))
        try:
            os.read(pipe.read, 1)
        except BlockingIOError:
            seen.append("pipe empty")

    fromClient.loseConnection = lateRead
    with captured_logs() as logs:
        reset(conn)
        await until(reactor, lambda: not relays(service))
        await deferLater(reactor, 0.05)
    assert seen == [(None, None, 0), "pipe empty"]
    [end] = logs.ends()
    assert end["reason"] == ending.TARGET_RESET
    assert end["bytesToTarget"] == len(payload)
    assert io.SplicePipe.live == 0
    assert spliced == [len(payload)]
    client.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_bytes_queued_in_twisted_go_out_ahead_of_the_spliced_read(
    reactor: Any, services: list[Any], spliced: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    readOut: list[int] = []
    real = io.SplicePipe.readOut

    def counting(pipe: Any, count: int) -> bytes:
        readOut.append(count)
        return real(pipe, count)

    monkeypatch.setattr(io.SplicePipe, "readOut", counting)
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    client, conn, relay = await _linked(reactor, service, listener)
    fromClient, toTarget = relay.client.transport, relay.target.transport
    fromClient.stopReading()
    payload = os.urandom(60_000)
    client.sendall(payload)
    await deferLater(reactor, 0.05)
    # Queued in the target's Twisted buffer (as a PROXY header is), not
    # yet sent, when the client's read comes.
    toTarget.write(b"AHEAD")
    assert fromClient.doRead() is None
    assert readOut == [len(payload)]  # read out of the pipe, not spliced on
    fromClient.startReading()
    client.shutdown(socket.SHUT_WR)
    assert await read_to_eof(reactor, conn, 10) == b"AHEAD" + payload
    assert readOut == [len(payload)]
    client.close()
    conn.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_pipe_left_at_its_default_size_still_relays_exactly(
    reactor: Any, services: list[Any], spliced: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    real = fcntl.fcntl

    def refusing(fd: int, cmd: int, arg: Any = 0) -> Any:
        if cmd == io._F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing)
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    service = start_service(forward(target=("127.0.0.1", echo.getHost().port)))
    services.append(service)
    size = 8 * 1024 * 1024 + 3
    pump = Pump(size, halfClose=True)
    connect(reactor, bound_port(service), pump)
    await until(reactor, lambda: relays(service))
    [relay] = relays(service)
    await until(reactor, lambda: relay.client.pipe is not None)
    pipeSize = real(relay.client.pipe.write, io._F_SETPIPE_SZ + 1)  # F_GETPIPE_SZ
    await finished(reactor, pump.lost, 30)
    echo.stopListening()
    assert pipeSize < io.READ_SIZE
    assert pump.backCount == size
    assert pump.back.hexdigest() == pump.digest.hexdigest()
    assert sum(spliced) >= size
    assert max(spliced) <= pipeSize
    await until(reactor, lambda: io.SplicePipe.live == 0)


@pytest_twisted.ensureDeferred
async def test_a_peer_reset_met_draining_the_pipe_ends_the_pair_as_a_reset(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    await deferLater(reactor, 0.05)
    before = open_fds()
    client, conn, relay = await _linked(reactor, service, listener)
    side, fromTarget = relay.target, relay.target.transport
    drained: list[Any] = []
    drain = side.drainPipe

    def recording() -> Any:
        drained.append(drain())
        return drained[-1]

    side.drainPipe = recording
    fromTarget.stopReading()
    conn.sendall(os.urandom(60_000))
    await deferLater(reactor, 0.05)
    with captured_logs() as logs:
        reset(client)  # the relay has not seen it yet: its client socket looks writable
        assert fromTarget.doRead() is None
        assert drained == [CONNECTION_LOST]
        assert relay.client.sendFailed and side.pipe.held == 0
        fromTarget.startReading()
        await until(reactor, lambda: not relays(service))
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_RESET
    assert end["bytesToClient"] == 60_000
    assert io.SplicePipe.live == 0
    conn.close()
    await until(reactor, lambda: open_fds() == before, 5)
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_close_while_the_pipe_holds_bytes_sends_them_before_the_fin(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    clock = Clock()
    listener = raw_listener()
    service = start_service(
        forward(target=("127.0.0.1", listener.getsockname()[1]), idle_timeout=5.0), clock=clock
    )
    services.append(service)
    payload = os.urandom(24 * 1024 * 1024)
    client, conn, relay = await _linked(reactor, service, listener)
    await _hold(reactor, conn, relay.target, payload)
    counted = relay.bytesToClient
    assert relay.target.pipe.held and counted
    with captured_logs() as logs:
        clock.advance(6)  # the idle timeout: both sides loseConnection()
        received = await read_to_eof(reactor, client, 20)  # a FIN, not a reset
        await until(reactor, lambda: not relays(service))
        await deferLater(reactor, 0.05)
    assert len(received) == counted
    assert received == payload[:counted]
    [end] = logs.ends()
    assert end["reason"] == ending.IDLE_TIMEOUT
    assert end["bytesToClient"] == counted
    assert io.SplicePipe.live == 0
    client.close()
    conn.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_stop_while_both_pipes_hold_bytes_drains_each_before_its_fin(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    # Neither end reads: each side's pipe holds bytes for the other. A stop
    # hands each side back to Twisted's reading, its pipe's bytes to the
    # peer's Twisted buffer: each end gets every byte read, then a FIN.
    listener = raw_listener()
    service = start_service(
        forward(target=("127.0.0.1", listener.getsockname()[1])), clock=Clock()
    )
    up, down = os.urandom(24 * 1024 * 1024), os.urandom(24 * 1024 * 1024)
    client, conn, relay = await _linked(reactor, service, listener)
    await _hold(reactor, conn, relay.target, down)
    await _hold(reactor, client, relay.client, up)
    toClient, toTarget = relay.bytesToClient, relay.bytesToTarget
    assert relay.target.pipe.held and relay.client.pipe.held
    with captured_logs() as logs:
        stopped = service.stopService()
        await deferLater(reactor, 0.05)
        assert relays(service)  # nothing closed yet: both pipes hold bytes
        # Each end still sends (bytes the stop leaves unread): goma-pt's side
        # lingers after its FIN, so that the end gets a FIN, not a reset.
        received = await read_to_eof(reactor, client, 20)
        client.close()  # the client's FIN ends the lingering
        assert len(received) == toClient
        assert received == down[:toClient]
        assert relays(service)  # the target's side still owes it its bytes
        atTarget = await read_to_eof(reactor, conn, 20)
        conn.close()
        await finished(reactor, stopped, 10)
    assert len(atTarget) == toTarget
    assert atTarget == up[:toTarget]
    [end] = logs.ends()
    assert (end["bytesToClient"], end["bytesToTarget"]) == (toClient, toTarget)
    assert io.SplicePipe.live == 0
    client.close()
    conn.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_reset_met_by_drain_pipe_as_do_write_closes_the_pair(
    reactor: Any, services: list[Any], spliced: list[int]
) -> None:
    # The client half-closed, so its socket is watched for writing only;
    # its reset then reaches drainPipe (the transport's doWrite) when it
    # comes between the poll and the write: the reactor gets its answer.
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    await deferLater(reactor, 0.05)
    before = open_fds()
    client, conn, relay = await _linked(reactor, service, listener)
    client.shutdown(socket.SHUT_WR)
    assert await read_to_eof(reactor, conn) == b""
    side, toClient = relay.target, relay.client.transport
    await _hold(reactor, conn, side, os.urandom(24 * 1024 * 1024))
    assert toClient.doWrite == side.drainPipe
    with captured_logs() as logs:
        reset(client)
        why = toClient.doWrite()
        assert why is CONNECTION_LOST
        assert side.pipe.held  # left for closePipe: the peer is gone
        reactor._disconnectSelectable(toClient, why, False)
        await until(reactor, lambda: not relays(service))
        await deferLater(reactor, 0.05)
    [end] = logs.ends()
    # The client's half-close named the end first.
    assert end["reason"] == ending.CLIENT_CLOSED
    assert io.SplicePipe.live == 0
    conn.close()
    await until(reactor, lambda: open_fds() == before, 5)
    listener.close()


async def _read_for(reactor: Any, conn: socket.socket, count: int, within: float) -> bytes:
    """Read a non-blocking socket until C{count} bytes came, or C{within} seconds passed."""
    chunks: list[bytes] = []
    got = 0
    for _ in range(int(within / 0.01)):
        try:
            chunk = conn.recv(1 << 20)
        except BlockingIOError:
            await deferLater(reactor, 0.01)
            continue
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        if got >= count:
            break
    return b"".join(chunks)


@pytest.mark.parametrize("fin", [True, False], ids=["then-a-fin", "connection-open"])
@pytest_twisted.ensureDeferred
async def test_urgent_data_on_a_spliced_direction_stops_nothing(
    reactor: Any, services: list[Any], spliced: list[int], fin: bool
) -> None:
    # splice(2) stops at TCP urgent data (MSG_OOB) and moves nothing past
    # it: EAGAIN while the connection is open (the socket stays readable,
    # so the relay spun and the rest never came), 0 once the FIN is in (it
    # read as the end: the rest was dropped and the end logged clean).
    # recv() steps over the urgent byte (not inline): the copy path's
    # bytes, and the spliced direction's, are the stream without it.
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    services.append(service)
    client, conn, _ = await _linked(reactor, service, listener)
    client.setblocking(True)
    before, after = os.urandom(300_000), os.urandom(200_000)
    client.sendall(before)
    client.send(b"!", socket.MSG_OOB)
    client.sendall(after)
    if fin:
        client.shutdown(socket.SHUT_WR)
    with captured_logs() as logs:
        received = await _read_for(reactor, conn, len(before + after), 5)
        assert len(received) == len(before + after)
        assert received == before + after
        assert spliced
        if fin:
            assert await read_to_eof(reactor, conn) == b""
            conn.close()
            client.close()
            await until(reactor, lambda: not relays(service))
            [end] = logs.ends()
            assert end["bytesToTarget"] == len(before + after)
            assert end["reason"] == ending.CLIENT_CLOSED
    if not fin:
        client.close()
        conn.close()
    listener.close()
