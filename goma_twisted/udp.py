"""
The UDP relay: the listening port hands each client address its own
session, and each session owns a UDP socket connected to the target, so
the target's replies find their way back to the right client.

The session table is bounded: at the bound a datagram from a new client
is dropped (the sessions already open are untouched), and the event is
logged once until the table has room again.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import base, udp
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import policy
from ._reactor import reactor_or_global
from .config import Forward, format_address
from .policy import Bounds, IPAddress, RefusalLog, parse_ip
from .resolve import resolve_host
from .stats import UDPStats

log = Logger(namespace="goma_pt.udp")

# The largest UDP payload over IPv4; Twisted's default read size is 8 KiB.
MAX_DATAGRAM = 65535
# Datagrams kept for a session while its target hostname resolves.
MAX_QUEUED = 64

IDLE_TIMEOUT = "idle timeout"
RESOLVE_FAILED = "resolve failed"
SOCKET_FAILED = "socket failed"
SHUTDOWN = "shutdown"
ANSWERED = "answered"
END_REASONS = (IDLE_TIMEOUT, ANSWERED, RESOLVE_FAILED, SOCKET_FAILED, SHUTDOWN)

# Why a datagram was dropped (besides the reasons a session ends with,
# for the datagrams it still held): the session table was full, the
# queue of a session still resolving was full, a send failed.
QUEUE_FULL = "queue full"
SEND_FAILED = "send failed"
REPLY_FAILED = "reply failed"
DROP_REASONS = (QUEUE_FULL, SEND_FAILED, REPLY_FAILED)


class SessionPort(udp.Port):
    """
    A session's socket, connected to the target.

    Two things differ from L{udp.Port}. Sessions come and go by the
    thousand, so it does not log its opening and closing: the session's end
    event says all of it. And an ICMP error from the target (port
    unreachable while the backend restarts) makes epoll report the socket
    in error with nothing to read, which the reactor takes for a lost
    connection; here that is reported to the session as refused, and the
    socket goes on reading.
    """

    _closing = False

    def _bindSocket(self) -> None:
        try:
            skt = self.createInternetSocket()
            skt.bind((self.interface, self.port))
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from e
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]

    def stopListening(self) -> Deferred[None] | None:
        self._closing = True
        return super().stopListening()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._closing and self._pendingError():
            self.protocol.connectionRefused()
            self.startReading()
            return
        self._realPortNumber = None
        self.maxThroughput = -1
        base.BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno
        if hasattr(self, "d"):
            self.d.callback(None)
            del self.d

    def _pendingError(self) -> int:
        """Read (and so clear) the socket's pending error, 0 if none."""
        try:
            return self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return 0


class UDPSession(DatagramProtocol):
    """
    One client address's conversation with the target, over a socket of
    its own connected to the target.
    """

    noisy = False

    def __init__(self, forward: UDPForward, client: tuple[str, int]) -> None:
        self.forward = forward
        self.stats = forward.stats
        self.client = client
        self.clock = forward.clock
        self.started = self.clock.seconds()
        self.lastActivity = self.started
        self.bytesToTarget = 0
        self.bytesToClient = 0
        self.datagramsToTarget = 0
        self.datagramsToClient = 0
        self.answers = 0
        self.targetAddress = ""
        self.reason: str | None = None
        self.refusals = 0
        self.detail: str | None = None
        self.clientIP: IPAddress | None = None
        self._queue: list[bytes] | None = []
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        target = self.forward.config.target
        self._timer = self.clock.callLater(self.forward.config.udp_idle_timeout, self._idleCheck)
        if not target.is_hostname:
            self._open(target.host)
            return
        d = resolve_host(self.forward.reactor, target.host, target.port, "UDP")
        d.addCallbacks(lambda hosts: self._open(hosts[0]), self._resolveFailed)

    def _resolveFailed(self, failure: Failure) -> None:
        self.detail = failure.getErrorMessage()
        self.close(RESOLVE_FAILED)

    def _open(self, host: str) -> None:
        if self.reason is not None:
            return
        port = self.forward.config.target.port
        interface = "::" if isIPv6Address(host) else "0.0.0.0"
        try:
            SessionPort(0, self, interface, MAX_DATAGRAM, self.forward.reactor).startListening()
            self.transport.connect(host, port)  # type: ignore[union-attr]
        except (CannotListenError, OSError) as e:
            self.detail = str(e)
            self.close(SOCKET_FAILED)
            return
        self.targetAddress = format_address(host, port)
        queued, self._queue = self._queue, None
        for data in queued or ():
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
            # The socket is connected to the target: send() straight away,
            # without udp.Port.write's checks (any OSError is a drop).
            self.transport.socket.send(data)  # type: ignore[union-attr]
        except OSError as e:
            if isinstance(e, ConnectionRefusedError):
                # An ICMP error from an earlier datagram, reported here.
                self.connectionRefused()
            self.stats.count_dropped(SEND_FAILED)
            return
        self.bytesToTarget += len(data)
        self.datagramsToTarget += 1
        self.stats.bytes_to_target += len(data)
        self.stats.datagrams_to_target += 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.lastActivity = self.clock.seconds()
        if self.forward.reply(data, self.client):
            self.bytesToClient += len(data)
            self.datagramsToClient += 1
            self.stats.bytes_to_client += len(data)
            self.stats.datagrams_to_client += 1
        # udpResponses: a query/answer protocol (DNS) needs the session only
        # until its answers are in; its socket is freed at once.
        self.answers += 1
        expected = self.forward.config.udp_responses
        if expected is not None and self.answers >= expected:
            self.close(ANSWERED)

    def connectionRefused(self) -> None:
        # The target's ICMP "port unreachable": nobody listens there now.
        # Keep the session; the next datagram tries again.
        self.refusals += 1
        self.stats.unreachable += 1

    def stopProtocol(self) -> None:
        # The socket is gone without a close() of ours: end the session too.
        self.close(SOCKET_FAILED)

    def _idleCheck(self) -> None:
        remaining = self.lastActivity + self.forward.config.udp_idle_timeout - self.clock.seconds()
        if remaining > 0:
            self._timer = self.clock.callLater(remaining, self._idleCheck)
        else:
            self._timer = None
            self.close(IDLE_TIMEOUT)

    def close(self, reason: str) -> None:
        """End the session: its timer, its socket, its table entry, one log event."""
        if self.reason is not None:
            return
        self.reason = reason
        if self._queue:
            self.stats.count_dropped(reason, len(self._queue))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.transport is not None:
            self.transport.stopListening()
        self.forward.sessionEnded(self)
        log.info(
            "{forward} {client} -> {target}: {reason}; {datagramsToTarget} datagrams "
            "({bytesToTarget} bytes) sent, {datagramsToClient} ({bytesToClient} bytes) "
            "received, {duration:.3f}s",
            forward=self.forward.config.name,
            client=format_address(*self.client[:2]),
            target=str(self.forward.config.target),
            targetAddress=self.targetAddress,
            bytesToTarget=self.bytesToTarget,
            bytesToClient=self.bytesToClient,
            datagramsToTarget=self.datagramsToTarget,
            datagramsToClient=self.datagramsToClient,
            duration=self.clock.seconds() - self.started,
            reason=reason,
            detail=self.detail,
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
        self.config = config
        self.max_sessions = max_sessions
        self.reactor = reactor = reactor_or_global(reactor)
        self.clock = clock if clock is not None else reactor
        self.sessions: dict[tuple[str, int], UDPSession] = {}
        self.stats = UDPStats(config, END_REASONS, DROP_REASONS, policy.REFUSALS)
        self._full = False
        self.policy = config.policy
        # Sessions per client address (maxSessionsPerIp); the total is
        # len(self.sessions) against max_sessions.
        self.bounds = Bounds(None, config.max_sessions_per_ip)
        # Refusals are counted in the stats and logged rate-limited.
        self.refusalLog = RefusalLog(log.warn, self.clock)

    @property
    def refusedCounts(self) -> dict[str, int]:
        """Datagrams refused a session so far, by reason (those that happened)."""
        return {reason: n for reason, n in self.stats.sessions_refused.items() if n}

    @property
    def refusedAtBound(self) -> int:
        return self.stats.sessions_refused[policy.AT_BOUND]

    def reconfigure(self, config: Forward) -> None:
        """New settings for new sessions (a reload); open ones keep their target."""
        self.config = config
        self.policy = config.policy
        self.bounds.per_ip = config.max_sessions_per_ip

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                self._refuse(addr)
                return
            client = parse_ip(addr[0])
            why = policy.DENIED if not self.policy.permits(client) else self.bounds.admit(client)
            if why is not None:
                self.stats.count_refused(why)
                self.refusalLog.refused(self.config.name, format_address(*addr[:2]), why)
                return
            session = self.sessions[addr] = UDPSession(self, addr)
            session.clientIP = client
            self.stats.opened()
            session.start()
            if session.reason is not None:
                self.stats.count_dropped(session.reason)
                return
        session.send(data)

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

    def reply(self, data: bytes, client: tuple[str, int]) -> bool:
        """
        Send a target's datagram to its client from the listening port.

        The address came from this socket's own recvfrom, so it is valid
        for it: the datagram goes to C{sendto} directly, without
        L{udp.Port.write}'s checks of the address on every datagram. Any
        error (a full socket buffer, EMSGSIZE, an ICMP error pending) drops
        this datagram and is counted, never raised.
        """
        try:
            self.transport.socket.sendto(data, client)  # type: ignore[union-attr]
        except OSError:
            self.stats.count_dropped(REPLY_FAILED)
            return False
        return True

    def sessionEnded(self, session: UDPSession) -> None:
        self.stats.ended(session.reason or "unknown")
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
            self.bounds.release(session.clientIP)
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
