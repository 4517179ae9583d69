"""
A side that a stop or a timeout closes while its peer still sends lingers
after its FIN (Relay.closeSide): the peer reads every relayed byte and a FIN,
not a reset, and the stop waits for it, within its bounds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import termios
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater

from goma_twisted import tcp

from .support import (
    accept_raw,
    bound_port,
    finished,
    forward,
    open_fds,
    raw_client,
    raw_listener,
    read_to_end,
    read_to_eof,
    relays,
    start_service,
    until,
)


def _unread(skt: socket.socket) -> int:
    """How many received bytes wait in C{skt}."""
    return int.from_bytes(fcntl.ioctl(skt.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)


async def _flooding(
    reactor: Any, clock: Clock, **options: Any
) -> tuple[Any, Any, Any, Any, bytes]:
    """
    A service whose one client has sent the target more than it reads, so
    that goma-pt's client side holds bytes unread; the target has sent
    C{b"bye"}, relayed. (service, client, target's conn, listener, what the
    client sent.)
    """
    listener = raw_listener()
    target = ("127.0.0.1", listener.getsockname()[1])
    service = start_service(forward(target=target, **options), clock=clock)
    client = raw_client(bound_port(service))
    conn = await accept_raw(reactor, listener)
    await until(reactor, lambda: relays(service))
    conn.sendall(b"bye")
    [relay] = relays(service)
    await until(reactor, lambda: relay.bytesToClient == 3)
    sent = bytearray()
    chunk = b"x" * 65536
    for _ in range(4000):  # until every buffer on the way is full
        try:
            sent += chunk[: client.send(chunk)]
        except BlockingIOError:
            if _unread(_clientSocket(service)):
                break
            await deferLater(reactor, 0.005)
    assert _unread(_clientSocket(service)), "goma-pt's client side never held bytes"
    return service, client, conn, listener, bytes(sent)


def _sockets() -> int:
    """This process's open sockets (the lingering one is closed at the end)."""
    open_fds()  # collects what earlier tests left
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def _clientSocket(service: Any) -> socket.socket:
    [relay] = relays(service)
    skt: socket.socket = relay.client.transport.getHandle()
    return skt


async def _readAll(reactor: Any, conn: socket.socket) -> bytes:
    data, how = await read_to_end(reactor, conn, 20)
    assert how == "eof"
    return data


@pytest_twisted.ensureDeferred
async def test_a_stop_ends_a_client_still_sending_with_a_fin_and_waits_for_it(
    reactor: Any,
) -> None:
    sockets = _sockets()
    clock = Clock()
    service, client, conn, listener, sent = await _flooding(reactor, clock)
    stopped = service.stopService()
    atTarget = ensureDeferred(_readAll(reactor, conn))
    data, how = await read_to_end(reactor, client, 20)
    assert (data, how) == (b"bye", "eof")  # a FIN: before, a reset
    relayed = await atTarget
    assert relayed == sent[: len(relayed)]
    await deferLater(reactor, 0.05)
    assert not stopped.called  # goma-pt's client side still reads and drops
    [relay] = relays(service)
    assert relay.state is tcp.RelayState.CLOSING
    client.close()  # its FIN ends the lingering
    await finished(reactor, stopped, 10)
    conn.close()
    listener.close()
    await until(reactor, lambda: _sockets() <= sockets)


async def _stoppedAndRead(reactor: Any, clock: Clock) -> tuple[Any, Any, Any, Any]:
    """
    A L{_flooding} service stopped, with its client and target having read
    all they were sent and the FIN: (the stop's Deferred, client, target's
    conn, listener).
    """
    service, client, conn, listener, _ = await _flooding(reactor, clock)
    stopped = service.stopService()
    atTarget = ensureDeferred(_readAll(reactor, conn))
    assert await read_to_eof(reactor, client, 20) == b"bye"
    await atTarget
    return stopped, client, conn, listener


@pytest_twisted.ensureDeferred
async def test_a_lingering_side_closes_after_a_quiet_spell(reactor: Any) -> None:
    clock = Clock()
    stopped, client, conn, listener = await _stoppedAndRead(reactor, clock)
    await deferLater(reactor, 0.05)  # what the client had sent is read and dropped
    clock.advance(tcp.LINGER_QUIET - 0.01)
    assert not stopped.called
    clock.advance(0.01)
    await finished(reactor, stopped, 10)
    client.close()
    conn.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_stops_sending_is_closed_at_the_grace(
    reactor: Any,
) -> None:
    clock = Clock()
    service, client, conn, listener, _ = await _flooding(reactor, clock)
    goma = _clientSocket(service)
    stopped = service.stopService()
    atTarget = ensureDeferred(_readAll(reactor, conn))
    assert await read_to_eof(reactor, client, 20) == b"bye"
    await atTarget
    waited = 0.0
    chunk = b"y" * 4096
    while not stopped.called and waited < tcp.CLOSE_GRACE + 1:  # bounded: about 50 steps
        try:
            client.send(chunk)
        except BlockingIOError:
            pass
        except OSError:
            break
        # The bytes reach goma-pt's socket (TCP may hold them a moment for a
        # window update), which reads and drops them.
        with contextlib.suppress(AssertionError):
            await until(reactor, lambda: goma.fileno() == -1 or _unread(goma), 2)
        with contextlib.suppress(AssertionError):
            await until(reactor, lambda: goma.fileno() == -1 or not _unread(goma), 2)
        clock.advance(tcp.LINGER_QUIET / 2)  # never quiet for long enough
        waited += tcp.LINGER_QUIET / 2
    assert stopped.called
    assert tcp.CLOSE_GRACE <= waited < tcp.CLOSE_GRACE + tcp.LINGER_QUIET
    await finished(reactor, stopped, 10)
    client.close()
    conn.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_stop_waits_for_the_lingering_side_of_a_relay_timed_out(
    reactor: Any,
) -> None:
    # An idle timeout closed the relay while its client side lingers: a
    # stop then must not end before that socket.
    clock = Clock()
    service, client, conn, listener, _ = await _flooding(reactor, clock, idle_timeout=30.0)
    clock.advance(30)
    atTarget = ensureDeferred(_readAll(reactor, conn))
    assert await read_to_eof(reactor, client, 20) == b"bye"
    await atTarget
    [relay] = relays(service)
    assert relay.state is tcp.RelayState.CLOSING
    stopped = service.stopService()
    await deferLater(reactor, 0.05)
    assert not stopped.called
    client.close()  # its FIN ends the lingering
    await finished(reactor, stopped, 10)
    conn.close()
    listener.close()


class _NoWatches:
    """A reactor whose epoll set takes no more descriptors (ENOSPC: max_user_watches)."""

    @staticmethod
    def addReader(reader: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest_twisted.ensureDeferred
async def test_a_side_that_cannot_linger_is_closed_and_the_stop_ends(reactor: Any) -> None:
    # A side paused by its peer's full buffer must read again to linger:
    # when the reactor cannot watch it, it is closed at once, and the stop
    # ends instead of waiting for a relay that never would.
    sockets = _sockets()
    clock = Clock()
    service, client, conn, listener, _ = await _flooding(reactor, clock)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reactor, "addReader", _NoWatches.addReader)
        stopped = service.stopService()
    await finished(reactor, stopped, 10)
    assert not relays(service)
    client.close()
    conn.close()
    listener.close()
    await until(reactor, lambda: _sockets() <= sockets)
