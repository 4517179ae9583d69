"""
The UDP relay: the listening port hands each client address its own
session, and each session owns a UDP socket connected to the target, so
the target's replies find their way back to the right client.

This module is the listening side (L{UDPForward}); the parts live apart:
L{goma_twisted.udp_session} (a session and its state; the reasons it
ends with are L{goma_twisted.ending}'s, with TCP's),
L{goma_twisted.udp_table} (the bounded table, pure),
L{goma_twisted.udp_sweep} (idle expiry, pure) and
L{goma_twisted.udp_readers} (the reactor calls a session's socket needs).

The session table is bounded. At the bound, the oldest session that never
got an answer from the target gives way to the new client (see
L{goma_twisted.udp_table}); if every session has had an answer, the new
client's datagram is dropped (the sessions already open are untouched),
and the event is logged once until the table has room again.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from . import policy
from ._reactor import reactor_or_global
from .config import Forward, format_address
from .ending import (
    ANSWERED,
    EVICTED,
    IDLE_TIMEOUT,
    RESOLVE_FAILED,
    SHUTDOWN,
    SOCKET_FAILED,
    UNANSWERED,
)
from .ending import udp_log as log
from .logfilter import LOG_PREFIX
from .policy import Bounds, RefusalLog, parse_ip
from .stats import UDPStats
from .udp_readers import Readers
from .udp_session import (
    DROP_REASONS,
    END_REASONS,
    MAX_DATAGRAM,
    MAX_QUEUED,
    QUEUE_FULL,
    READS_PER_EVENT,
    REPLY_FAILED,
    SEND_FAILED,
    SESSION_END_FORMAT,
    State,
    UDPSession,
)
from .udp_sweep import IdleSweep
from .udp_table import UNANSWERED_TIMEOUT, SessionTable, expiry

# An eviction's warning, logged as refusals are: at most one per interval.
EVICTION_FORMAT = (
    "{forward}: {sessions} sessions open, the bound; ended the unanswered session "
    "of {client} for a new client ({newClient}){suppressedNote}"
)

# The names importers of the UDP relay use, wherever they are defined.
__all__ = [
    "ANSWERED",
    "DROP_REASONS",
    "END_REASONS",
    "EVICTED",
    "EVICTION_FORMAT",
    "IDLE_TIMEOUT",
    "MAX_DATAGRAM",
    "MAX_QUEUED",
    "QUEUE_FULL",
    "READS_PER_EVENT",
    "REPLY_FAILED",
    "RESOLVE_FAILED",
    "SEND_FAILED",
    "SESSION_END_FORMAT",
    "SHUTDOWN",
    "SOCKET_FAILED",
    "UNANSWERED",
    "UNANSWERED_TIMEOUT",
    "State",
    "UDPForward",
    "UDPSession",
]


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
        # How session sockets join and leave the reactor (the seam).
        self.readers = Readers(reactor)
        self.table: SessionTable[tuple[str, int], UDPSession] = SessionTable(max_sessions)
        self.stats = UDPStats(config, END_REASONS, DROP_REASONS, policy.REFUSALS)
        self.sweep: IdleSweep[UDPSession] = IdleSweep(self.clock, 1.0, self._due)
        self._full = False
        # Sessions per client address (maxSessionsPerIp); the total is
        # len(self.sessions) against max_sessions.
        self.bounds = Bounds(None, config.max_sessions_per_ip)
        self._configure(config)
        # Refusals and evictions are counted in the stats and logged rate-limited.
        self.refusalLog = RefusalLog(log.warn, self.clock)
        self.evictionLog = RefusalLog(log.warn, self.clock, format=EVICTION_FORMAT)
        self._targetAddresses: dict[tuple[str, int], str] = {}

    def logPrefix(self) -> str:
        return LOG_PREFIX

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

    def refreshStats(self) -> UDPStats:
        """The stats, with what the table knows brought up to date (for a scrape)."""
        stats = self.stats
        stats.max_sessions = self.table.bound
        stats.sessions_unanswered = self.table.unanswered
        return stats

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
        # The metrics' labels name the target as configured now.
        self.stats.forward = config
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
        # A new session's timeout until its first answer (udp_table.expiry).
        self.firstTimeout = expiry(config.udp_idle_timeout, False)[0]
        self.udpResponses = config.udp_responses
        # Seconds between sweeps: 1 s, or a tenth of a timeout under 10 s.
        self.sweep.granularity = min(1.0, config.udp_idle_timeout / 10)

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
        if len(table.sessions) >= table.bound:
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
        if self.screened:
            session.clientIP = client
            session.counted = True
        self.stats.opened()
        session.start()
        if session.state is State.ENDED:
            self.stats.count_dropped(session.reason or SOCKET_FAILED)
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
        # Listening may start again (a rejected reload restarts what it stopped).
        self.sweep.stop()

    # Idle expiry: see udp_sweep. A session is first checked at its start
    # plus the timeout it has while unanswered (see udp_table.expiry).

    @property
    def granularity(self) -> float:
        """Seconds between sweeps: 1 s, or a tenth of a timeout under 10 s."""
        return self.sweep.granularity

    def watch(self, session: UDPSession, deadline: float) -> None:
        """Have the sweep check C{session} at C{deadline} (rounded up)."""
        self.sweep.watch(session, deadline)

    def unwatch(self, session: UDPSession) -> None:
        """Take an ended C{session} out of the sweep."""
        self.sweep.unwatch(session)

    def _due(self, session: UDPSession, now: float) -> float | None:
        """End C{session} if idle past its timeout; else its next deadline."""
        timeout, unanswered = expiry(session.idleTimeout, session.answers > 0)
        deadline = session.lastActivity + timeout
        if deadline <= now:
            session.close(UNANSWERED if unanswered else IDLE_TIMEOUT)
            return None
        return deadline
