"""
The UDP relay: the listening port hands each client address its own
session, and each session owns a UDP socket connected to the target, so
the target's replies find their way back to the right client.

The session table is bounded. At the bound, the oldest session that never
got an answer from the target gives way to the new client (see
L{goma_twisted.udp_table}); if every session has had an answer, the new
client's datagram is dropped (the sessions already open are untouched),
and the event is logged once until the table has room again.
"""

from __future__ import annotations

import errno
import math
import socket
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from . import policy
from ._reactor import reactor_or_global
from .config import Forward, format_address
from .logs import EventLogger
from .policy import Bounds, IPAddress, RefusalLog, parse_ip
from .resolve import resolve_host
from .stats import UDPStats
from .udp_table import UNANSWERED_TIMEOUT as UNANSWERED_TIMEOUT
from .udp_table import SessionTable, expiry

log = EventLogger(namespace="goma_pt.udp")

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

IDLE_TIMEOUT = "idle timeout"
# Idle for UNANSWERED_TIMEOUT (under the idle timeout) without an answer.
UNANSWERED = "unanswered"
# Ended, never answered, to make room for a new client in a full table.
EVICTED = "evicted"
RESOLVE_FAILED = "resolve failed"
SOCKET_FAILED = "socket failed"
SHUTDOWN = "shutdown"
ANSWERED = "answered"
END_REASONS = (
    IDLE_TIMEOUT,
    UNANSWERED,
    EVICTED,
    ANSWERED,
    RESOLVE_FAILED,
    SOCKET_FAILED,
    SHUTDOWN,
)

# Why a datagram was dropped (besides the reasons a session ends with,
# for the datagrams it still held): the session table was full, the
# queue of a session still resolving was full, a send failed.
QUEUE_FULL = "queue full"
SEND_FAILED = "send failed"
REPLY_FAILED = "reply failed"
DROP_REASONS = (QUEUE_FULL, SEND_FAILED, REPLY_FAILED)

# The event each session ends with.
SESSION_END_FORMAT = (
    "{forward} {client} -> {target}: {reason}; {datagramsToTarget} datagrams "
    "({bytesToTarget} bytes) sent, {datagramsToClient} ({bytesToClient} bytes) "
    "received, {duration:.3f}s"
)


@implementer(IReadDescriptor)
class UDPSession:
    """
    One client address's conversation with the target, over a socket of
    its own connected to the target.

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
    reason: str | None = None
    refusals = 0
    detail: str | None = None
    clientIP: IPAddress | None = None
    # Whether forward.bounds counted this session (see UDPForward._newSession).
    counted = False
    socket: socket.SocketType | None = None
    _fd = -1
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
        # Datagrams kept while the target's name resolves (hostnames only).
        self._queue: list[bytes] | None = [] if forward.targetIsHostname else None

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "UDPSession"

    def start(self) -> None:
        forward = self.forward
        forward.watch(self, self.started + expiry(self.idleTimeout, False)[0])
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
        if self.reason is not None:
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
            self.socket = skt
            self._fd = fd = skt.fileno()
            addNewReader = forward._addNewReader
            if addNewReader is not None:
                addNewReader(self, fd)
            else:
                forward.reactor.addReader(self)
        except OSError as e:
            self.socket = None
            self._fd = -1
            skt.close()
            self.detail = str(e)
            self.close(SOCKET_FAILED)
            return
        self.targetAddress = addressText
        if self._queue is not None:
            queued, self._queue = self._queue, None
            for data in queued:
                self.send(data)

    def send(self, data: bytes) -> None:
        """Pass a client's datagram on, or keep it while the target resolves."""
        self.lastActivity = self.clock.seconds()
        if self._queue is not None:
            if len(self._queue) < MAX_QUEUED:
                self._queue.append(data)
            else:
                self.stats.count_dropped(QUEUE_FULL)
            return
        try:
            self.socket.send(data)  # type: ignore[union-attr]
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

    def doRead(self) -> None:
        """
        Read the target's datagrams, at most L{READS_PER_EVENT} of them, so
        that one busy session cannot hold the reactor from the others.
        """
        recv = self.socket.recv  # type: ignore[union-attr]
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
            if self.reason is not None:
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
            forward.answered(self)
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
        if self.reason is not None:
            return
        if self._pendingError():
            self.connectionRefused()
            self.forward.reactor.addReader(self)
            return
        self.detail = reason.getErrorMessage() if reason is not None else None
        self.close(SOCKET_FAILED)

    def _pendingError(self) -> int:
        """Read (and so clear) the socket's pending error, 0 if none."""
        try:
            return self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return 0

    def close(self, reason: str) -> None:
        """End the session: its timer, its socket, its table entry, one log event."""
        if self.reason is not None:
            return
        self.reason = reason
        if self._queue:
            self.stats.count_dropped(reason, len(self._queue))
        forward = self.forward
        if self.checkAt is not None:
            forward.unwatch(self)
        skt = self.socket
        if skt is not None:
            closeSocket = forward._closeSocket
            if closeSocket is not None:
                closeSocket(self, skt)
            else:
                forward.reactor.removeReader(self)
                skt.close()
            self._fd = -1
            self.socket = None
        forward.sessionEnded(self)
        host, port = self.client[:2]
        log.infoEvent(
            SESSION_END_FORMAT,
            {
                "forward": forward.name,
                # format_address's work is for IPv6 (and IPv4-mapped) hosts.
                "client": format_address(host, port) if ":" in host else f"{host}:{port}",
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


class UDPForward(DatagramProtocol):
    """
    The listening side of one UDP forward: finds or opens the session of
    each datagram's sender.

    @param reactor: opens the session sockets and resolves hostnames.
    @param clock: runs the idle timers (the reactor unless a test gives a
        L{twisted.internet.task.Clock}).
    """

    noisy = False

    def __init__(
        self, config: Forward, max_sessions: int, reactor: Any = None, clock: Any = None
    ) -> None:
        self.reactor = reactor = reactor_or_global(reactor)
        self.clock = clock if clock is not None else reactor
        # A session's socket is its own and closed with the session: goma-pt's
        # reactor closes it without an epoll_ctl call (see closeSocket).
        self._closeSocket: Any = getattr(reactor, "closeSocket", None)
        # And registers it without addReader's look-ups (see addNewReader).
        self._addNewReader: Any = getattr(reactor, "addNewReader", None)
        self.table: SessionTable[tuple[str, int], UDPSession] = SessionTable(max_sessions)
        self.stats = UDPStats(config, END_REASONS, DROP_REASONS, policy.REFUSALS)
        self._full = False
        # Sessions per client address (maxSessionsPerIp); the total is
        # len(self.sessions) against max_sessions.
        self.bounds = Bounds(None, config.max_sessions_per_ip)
        self._configure(config)
        # Refusals and evictions are counted in the stats and logged rate-limited.
        self.refusalLog = RefusalLog(log.warn, self.clock)
        self.evictionLog = EvictionLog(log.warn, self.clock)
        self._targetAddresses: dict[tuple[str, int], str] = {}
        # Sessions by the time the idle sweep checks them (see watch).
        self._buckets: dict[float, dict[UDPSession, None]] = {}
        self._sweep: IDelayedCall | None = None
        self._sweepAt: float | None = None
        # The bucket watch used last, and its time: under churn, sessions
        # starting within the same granularity step share it (see watch).
        self._lastAt = -math.inf
        self._lastBucket: dict[UDPSession, None] = {}

    @property
    def sessions(self) -> dict[tuple[str, int], UDPSession]:
        """The open sessions by client address."""
        return self.table.sessions

    @property
    def max_sessions(self) -> int:
        return self.table.bound

    @max_sessions.setter
    def max_sessions(self, bound: int) -> None:
        self.table.bound = bound

    @property
    def refusedCounts(self) -> dict[str, int]:
        """Datagrams refused a session so far, by reason (those that happened)."""
        return {reason: n for reason, n in self.stats.sessions_refused.items() if n}

    @property
    def refusedAtBound(self) -> int:
        return self.stats.sessions_refused[policy.AT_BOUND]

    def reconfigure(self, config: Forward) -> None:
        """New settings for new sessions (a reload); open ones keep their target."""
        self._configure(config)

    def _configure(self, config: Forward) -> None:
        """
        Take C{config}, and what sessions read of it worked out once (its
        properties compute their value at every read).
        """
        self.config = config
        self.policy = config.policy
        self.bounds.per_ip = config.max_sessions_per_ip
        # Whether a new client's address is checked: by an access policy,
        # or against a per-address bound.
        self.screened = bool(self.policy) or config.max_sessions_per_ip is not None
        self.name = config.name
        target = config.target
        self.targetText = str(target)
        self.targetIsHostname = target.is_hostname
        # An IP literal target's socket address, family and text, once.
        self.targetFamily = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        self.targetSockaddr = (target.host, target.port)
        self.targetAddressText = format_address(target.host, target.port)
        self.idleTimeout = config.udp_idle_timeout
        self.udpResponses = config.udp_responses
        # Seconds between sweeps: 1 s, or a tenth of a timeout under 10 s.
        self.granularity = min(1.0, config.udp_idle_timeout / 10)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        session = self.table.sessions.get(addr)
        if session is None:
            session = self._newSession(addr)
            if session is None:
                return
        session.send(data)

    def _newSession(self, addr: tuple[str, int]) -> UDPSession | None:
        """
        Open a session for a new client, or refuse it (None). In a full
        table the oldest unanswered session gives way, once the new client
        has passed its checks; with none unanswered, the client is refused.
        """
        table = self.table
        victim = None
        if table.full:
            victim = table.victim()
            if victim is None:
                self._refuse(addr)
                return None
        # The client's address as a value is needed only by an access
        # policy or a per-address bound; without either, no parsing.
        client = None
        if self.screened:
            client = parse_ip(addr[0])
            why = policy.DENIED if not self.policy.permits(client) else self.bounds.admit(client)
            if why is not None:
                self.stats.count_refused(why)
                self.refusalLog.refused(self.name, format_address(*addr[:2]), why)
                return None
        if victim is not None:
            self._evict(victim, addr)
        session = UDPSession(self, addr)
        table.add(addr, session)
        self.stats.sessions_unanswered = table.unanswered
        if self.screened:
            session.clientIP = client
            session.counted = True
        self.stats.opened()
        session.start()
        if session.reason is not None:
            self.stats.count_dropped(session.reason)
            return None
        return session

    def targetAddress(self, host: str, port: int) -> str:
        """C{host:port} of a session's target, formatted once per address."""
        key = (host, port)
        text = self._targetAddresses.get(key)
        if text is None:
            if len(self._targetAddresses) >= 64:
                self._targetAddresses.clear()
            text = self._targetAddresses[key] = format_address(host, port)
        return text

    def _evict(self, victim: UDPSession, addr: tuple[str, int]) -> None:
        self.evictionLog.refused(
            self.name,
            format_address(*victim.client[:2]),
            EVICTED,
            newClient=format_address(*addr[:2]),
            sessions=len(self.table),
        )
        victim.close(EVICTED)

    def answered(self, session: UDPSession) -> None:
        """C{session} has its first answer: it no longer gives way to new clients."""
        self.table.answered(session)
        self.stats.sessions_unanswered = self.table.unanswered

    def _refuse(self, addr: tuple[str, int]) -> None:
        self.stats.count_refused(policy.AT_BOUND)
        if not self._full:
            self._full = True
            log.warn(
                "{forward}: {sessions} sessions open, the bound; dropping datagrams from "
                "new clients (first: {client}) until one ends",
                forward=self.config.name,
                sessions=len(self.sessions),
                client=format_address(*addr[:2]),
            )

    def sessionEnded(self, session: UDPSession) -> None:
        self.stats.ended(session.reason or "unknown")
        table = self.table
        if table.remove(session.client, session) and session.counted:
            self.bounds.release(session.clientIP)
        self.stats.sessions_unanswered = table.unanswered
        if self._full and len(self.sessions) < self.max_sessions:
            self._full = False
            log.info(
                "{forward}: room for new sessions again ({refused} datagrams refused so far)",
                forward=self.config.name,
                refused=self.refusedAtBound,
            )

    def stopProtocol(self) -> None:
        for session in list(self.sessions.values()):
            session.close(SHUTDOWN)
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        # Listening may start again (a rejected reload restarts what it stopped).
        self._sweep = self._sweepAt = None
        self._lastAt = -math.inf

    # Idle expiry. One timer per session (scheduled at its start, cancelled
    # at its end, usually within milliseconds with udpResponses) cost more
    # than the rest of a session's Python work; instead, sessions wait in
    # buckets, one per sweep time (a multiple of the granularity), and one
    # timer per forward runs the sweep that is due. A session is checked at
    # its deadline rounded up to the granularity: it ends idle between
    # udp_idle_timeout and udp_idle_timeout + granularity after its last
    # datagram, never earlier.

    def watch(self, session: UDPSession, deadline: float) -> None:
        """Have the sweep check C{session} at C{deadline} (rounded up)."""
        at = self._lastAt
        if deadline <= at and deadline > at - self.granularity:
            # The bucket of the previous call's: less than a step after the
            # deadline, never before it (sessions of the same step share it).
            bucket = self._lastBucket
        else:
            step = self.granularity
            at = math.ceil(deadline / step) * step
            if at < deadline:
                # Rounded below it in floating point (3.6 / 0.3 -> 3.5999...):
                # a sweep there would put the session back in the same bucket.
                at += step
            found = self._buckets.get(at)
            if found is None:
                found = self._buckets[at] = {}
            bucket = self._lastBucket = found
            self._lastAt = at
        bucket[session] = None
        session.checkAt = at
        if self._sweepAt is None or at < self._sweepAt:
            self._schedule(at)

    def unwatch(self, session: UDPSession) -> None:
        """Take an ended C{session} out of its bucket."""
        at, session.checkAt = session.checkAt, None
        bucket = self._buckets.get(at)  # type: ignore[arg-type]
        if bucket is not None:
            bucket.pop(session, None)
            if not bucket and bucket is not self._lastBucket:
                # The timer stays: when it fires with nothing due, it stops.
                # The last bucket stays for the next session (the sweep takes
                # it at its time): under churn, each session would make it
                # anew and remove it again.
                del self._buckets[at]  # type: ignore[arg-type]

    def _schedule(self, at: float) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweepAt = at
        self._sweep = self.clock.callLater(max(at - self.clock.seconds(), 0), self._runSweep)

    def _runSweep(self) -> None:
        self._sweep = self._sweepAt = None
        # The buckets due are taken away: watch makes new ones.
        self._lastAt = -math.inf
        now = self.clock.seconds()
        for at in sorted(at for at in self._buckets if at <= now):
            for session in self._buckets.pop(at):
                session.checkAt = None
                timeout, unanswered = expiry(session.idleTimeout, session.answers > 0)
                deadline = session.lastActivity + timeout
                if deadline <= now:
                    session.close(UNANSWERED if unanswered else IDLE_TIMEOUT)
                else:
                    self.watch(session, deadline)
        # A session moved on may have scheduled a later bucket than one
        # still waiting: the next sweep is the earliest bucket's.
        if self._buckets:
            first = min(self._buckets)
            if self._sweepAt is None or first < self._sweepAt:
                self._schedule(first)


class EvictionLog(RefusalLog):
    """Evictions, logged as refusals are: at most one event per interval."""

    FORMAT = (
        "{forward}: {sessions} sessions open, the bound; ended the unanswered session "
        "of {client} for a new client ({newClient}){suppressedNote}"
    )
