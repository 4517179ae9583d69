"""
A UDP session: one client address's conversation with the target, over a
socket of its own connected to the target, and its life as one state.
"""

from __future__ import annotations

import enum
import errno
import socket
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from .ending import (
    ANSWERED,
    RESOLVE_FAILED,
    SHUTDOWN,
    SOCKET_FAILED,
    UDP_END_REASONS,
    UDP_ENDED_FORMAT,
    client_text,
    log_udp_end,
)
from .policy import IPAddress
from .resolve import resolve_host

if TYPE_CHECKING:
    from .udp import UDPForward

# The largest UDP payload over IPv4; Twisted's default read size is 8 KiB.
MAX_DATAGRAM = 65535
# Datagrams a session reads from its socket per readiness event at most
# (L{udp.Port} bounds its reads by bytes, 256 KiB, for the same fairness).
READS_PER_EVENT = 64
# A session's socket: non-blocking and closed on exec from its creation,
# without the fcntl/ioctl calls that would set those afterwards.
SESSION_SOCKET_TYPE = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
# The socket type itself (C{socket.socket}'s C base): a session uses
# connect, send, recv, fileno and close only, and C{socket.socket}'s own
# Python __init__ and close (three calls per session) add nothing to those.
_SessionSocket = socket.SocketType
# Datagrams kept for a session while its target hostname resolves.
MAX_QUEUED = 64

# Why a session ends: defined with the TCP reasons, in ending.
END_REASONS = UDP_END_REASONS

# Why a datagram was dropped (besides the reasons a session ends with,
# for the datagrams it still held): the session table was full, the
# queue of a session still resolving was full, a send failed.
QUEUE_FULL = "queue full"
SEND_FAILED = "send failed"
REPLY_FAILED = "reply failed"
DROP_REASONS = (QUEUE_FULL, SEND_FAILED, REPLY_FAILED)


class State(enum.Enum):
    """Where a session is in its life; it only moves down this list."""

    # No socket yet: the target's name resolves; the client's datagrams wait.
    PENDING = "pending"
    # The socket is connected to the target and read by the reactor.
    OPEN = "open"
    # Over: the socket is closed and the end event logged.
    ENDED = "ended"


# The states by plain names, for the per-datagram checks.
PENDING, OPEN, ENDED = State.PENDING, State.OPEN, State.ENDED

# The event each session ends with (ending.log_udp_end).
SESSION_END_FORMAT = UDP_ENDED_FORMAT


@implementer(IReadDescriptor)
class UDPSession:
    """
    One client address's conversation with the target, over a socket of
    its own connected to the target. Its life is L{state}: L{PENDING} until
    its socket is connected (at once for an IP address, once a hostname
    resolves), then L{OPEN}, and L{ENDED} by L{close}, once, with a reason.

    The session is its socket's reader in the reactor: a plain non-blocking
    socket, connected (which binds it), instead of a L{udp.Port}. Sessions
    come and go by the thousand, one per DNS query when every query has a
    new source port, and a port's start and stop (its own log lines, a
    C{callLater(0)}, a Deferred, C{bind} and C{getsockname}) were most of a
    session's cost. The socket's life is the session's: opened by L{start}
    (or once the target's name resolves), closed by L{close}.

    An ICMP error from the target (port unreachable while the backend
    restarts) comes back as C{ECONNREFUSED} from C{recv} or C{send}, or as
    epoll reporting the socket in error with nothing to read, which the
    reactor takes for a lost connection: each is counted as unreachable
    and the session goes on.
    """

    # What a session starts with, read from the class until the session
    # changes it: a session is set up per query under churn, and most of
    # these keep their start value all its life.
    bytesToTarget = 0
    bytesToClient = 0
    datagramsToTarget = 0
    datagramsToClient = 0
    answers = 0
    targetAddress = ""
    state = PENDING
    # Why the session ended (set with ENDED).
    reason: str | None = None
    refusals = 0
    detail: str | None = None
    clientIP: IPAddress | None = None
    # Whether forward.bounds counted this session (see UDPForward._newSession).
    counted = False
    # The connected socket, while OPEN.
    socket: socket.SocketType
    _fd = -1
    # Datagrams kept while PENDING.
    _queue: list[bytes] | None = None
    # The idle sweep's bucket this session is in (UDPForward.watch).
    checkAt: float | None = None

    def __init__(self, forward: UDPForward, client: tuple[str, int]) -> None:
        self.forward = forward
        self.stats = forward.stats
        self.client = client
        self.clock = forward.clock
        self.started = self.lastActivity = self.clock.seconds()
        # The target, idle timeout and udpResponses as configured when the
        # session starts: a reload's new settings are for new sessions.
        self.target = forward.targetText
        self.idleTimeout = forward.idleTimeout
        self.udpResponses = forward.udpResponses

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "UDPSession"

    def start(self) -> None:
        forward = self.forward
        # First checked at the timeout it has while unanswered.
        forward.sweep.watch(self, self.started + forward.firstTimeout)
        if not forward.targetIsHostname:
            self._connect(forward.targetFamily, forward.targetSockaddr, forward.targetAddressText)
            return
        target = forward.config.target
        d = resolve_host(forward.reactor, target.host, target.port, "UDP")
        d.addCallbacks(lambda hosts: self._open(hosts[0], target.port), self._resolveFailed)

    def _resolveFailed(self, failure: Failure) -> None:
        self.detail = failure.getErrorMessage()
        self.close(RESOLVE_FAILED)

    def _open(self, host: str, port: int) -> None:
        """Connect to the target's address C{host} (resolved), unless ended meanwhile."""
        if self.state is ENDED:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._connect(family, (host, port), self.forward.targetAddress(host, port))

    def _connect(self, family: int, address: tuple[str, int], addressText: str) -> None:
        """Open the session's socket, connected to C{address}; send what was queued."""
        forward = self.forward
        try:
            skt = _SessionSocket(family, SESSION_SOCKET_TYPE)
        except OSError as e:
            self.detail = str(e)
            self.close(SOCKET_FAILED)
            return
        try:
            # connect() binds the socket to a free port and fixes its peer:
            # only the target's datagrams reach it, as recv() reads them.
            skt.connect(address)
            self._fd = fd = skt.fileno()
            forward.readers.add(self, fd)
        except OSError as e:
            self._fd = -1
            skt.close()
            self.detail = str(e)
            self.close(SOCKET_FAILED)
            return
        self.socket = skt
        self.state = OPEN
        self.targetAddress = addressText
        if self._queue is not None:
            queued, self._queue = self._queue, None
            for data in queued:
                self.send(data)

    def send(self, data: bytes) -> None:
        """Pass a client's datagram on, or keep it while the target resolves."""
        self.lastActivity = self.clock.seconds()
        if self.state is not OPEN:
            self._hold(data)
            return
        try:
            self.socket.send(data)
        except OSError as e:
            if isinstance(e, ConnectionRefusedError):
                # An ICMP error from an earlier datagram, reported here.
                self.connectionRefused()
            self.stats.count_dropped(SEND_FAILED)
            return
        size = len(data)
        self.bytesToTarget += size
        self.datagramsToTarget += 1
        stats = self.stats
        stats.bytes_to_target += size
        stats.datagrams_to_target += 1

    def _hold(self, data: bytes) -> None:
        """Keep a datagram while PENDING (up to L{MAX_QUEUED}); drop it if ENDED."""
        if self.state is ENDED:
            self.stats.count_dropped(self.reason or SHUTDOWN)
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = []
        if len(queue) < MAX_QUEUED:
            queue.append(data)
        else:
            self.stats.count_dropped(QUEUE_FULL)

    def doRead(self) -> None:
        """
        Read the target's datagrams, at most L{READS_PER_EVENT} of them, so
        that one busy session cannot hold the reactor from the others.
        """
        recv = self.socket.recv
        for _ in range(READS_PER_EVENT):
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # The error is cleared by reading it; datagrams may follow.
                self.connectionRefused()
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.detail = str(e)
                self.close(SOCKET_FAILED)
                return
            self.datagramReceived(data)
            if self.state is ENDED:
                return

    def datagramReceived(self, data: bytes) -> None:
        """
        Send a target's datagram to its client from the listening port.

        The address came from that socket's own recvfrom, so it is valid
        for it: the datagram goes to C{sendto} directly, without
        L{udp.Port.write}'s checks of the address on every datagram. Any
        error (a full socket buffer, EMSGSIZE, an ICMP error pending) drops
        this datagram and is counted, never raised.
        """
        self.lastActivity = self.clock.seconds()
        forward = self.forward
        stats = self.stats
        try:
            forward.transport.socket.sendto(data, self.client)  # type: ignore[union-attr]
        except OSError:
            stats.count_dropped(REPLY_FAILED)
        else:
            size = len(data)
            self.bytesToClient += size
            self.datagramsToClient += 1
            stats.bytes_to_client += size
            stats.datagrams_to_client += 1
        if not self.answers:
            forward.table.answered(self)
        # udpResponses: a query/answer protocol (DNS) needs the session only
        # until its answers are in; its socket is freed at once.
        self.answers += 1
        expected = self.udpResponses
        if expected is not None and self.answers >= expected:
            self.close(ANSWERED)

    def connectionRefused(self) -> None:
        # The target's ICMP "port unreachable": nobody listens there now.
        # Keep the session; the next datagram tries again.
        self.refusals += 1
        self.stats.unreachable += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        The reactor gave up on the socket (it already stopped reading it):
        epoll reported an error with nothing to read. A pending ICMP error
        is an unreachable target, and the socket goes on reading; anything
        else ends the session.
        """
        if self.state is not OPEN:
            return
        if self._pendingError():
            self.connectionRefused()
            self.forward.readers.resume(self)
            return
        self.detail = reason.getErrorMessage() if reason is not None else None
        self.close(SOCKET_FAILED)

    def _pendingError(self) -> int:
        """Read (and so clear) the socket's pending error, 0 if none."""
        try:
            return self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return 0

    def close(self, reason: str) -> None:
        """End the session: its timer, its socket, its table entry, one log event."""
        state = self.state
        if state is ENDED:
            return
        self.state = ENDED
        self.reason = reason
        if self._queue:
            self.stats.count_dropped(reason, len(self._queue))
            self._queue = None
        forward = self.forward
        if self.checkAt is not None:
            forward.sweep.unwatch(self)
        if state is OPEN:
            forward.readers.close(self, self.socket)
            self._fd = -1
            del self.socket
        forward.sessionEnded(self)
        host, port = self.client[:2]
        log_udp_end(
            {
                "forward": forward.name,
                "client": client_text(host, port),
                "target": self.target,
                "targetAddress": self.targetAddress,
                "bytesToTarget": self.bytesToTarget,
                "bytesToClient": self.bytesToClient,
                "datagramsToTarget": self.datagramsToTarget,
                "datagramsToClient": self.datagramsToClient,
                "duration": self.clock.seconds() - self.started,
                "reason": reason,
                "detail": self.detail,
            },
        )
