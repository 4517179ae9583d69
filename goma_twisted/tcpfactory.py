"""
The factory of one TCP forward: it admits or refuses each client (allow/deny,
bounds, a trusted load balancer), builds its L{Relay}, keeps the live ones
so that a stop or a reload can drain them, and counts.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory

from . import policy
from ._reactor import reactor_or_global
from .config import Forward, format_address
from .ending import CONNECT_FAILURES, SHUTDOWN, TCP_END_REASONS, tcp_log
from .logfilter import LOG_PREFIX
from .policy import Bounds, IPAddress, RefusalLog, ip_text, matches, parse_ip
from .sockopts import SocketOption, relay_options
from .stats import TCPStats
from .tcp import Relay, RelaySide

TARGET_FAILED_FORMAT = (
    "{forward}: cannot reach {target}: {refusal}{detailNote}; its clients are closed"
    "{suppressedNote}"
)


def matches_trusted(client: IPAddress | None, forward: Forward) -> bool:
    """Whether a connection comes from a load balancer trusted to send PROXY headers."""
    return client is not None and matches(client, forward.accept_proxy_protocol)


class TCPForwardFactory(Factory):
    """
    Accepts clients for one forward and keeps the live relays, so that a
    stop can end them.

    @param reactor: accepts and connects.
    @param clock: runs the timers (the reactor unless a test gives a
        L{twisted.internet.task.Clock}).
    """

    noisy = False
    relayClass: type[Relay] = Relay

    def __init__(self, forward: Forward, reactor: Any = None, clock: Any = None) -> None:
        self.reactor = reactor = reactor_or_global(reactor)
        self.clock = clock if clock is not None else reactor
        self.relays: set[Relay] = set()
        # maxConnections (the service fills in the default from the file
        # descriptor budget) and maxConnectionsPerIp.
        self.bounds = Bounds(forward.max_connections, forward.max_connections_per_ip)
        self.stats = TCPStats(forward, TCP_END_REASONS, CONNECT_FAILURES, policy.REFUSALS)
        # Refusals are counted in the stats and logged rate-limited; so are
        # failures to reach the target, which its clients see as a close.
        self.refusalLog = RefusalLog(tcp_log.warn, self.clock)
        self.targetLog = RefusalLog(tcp_log.warn, self.clock, format=TARGET_FAILED_FORMAT)
        self.reconfigure(forward)

    def reconfigure(self, forward: Forward) -> None:
        """New settings for new connections (a reload); live ones keep theirs."""
        self.forward = forward
        # The metrics' labels name the target as configured now.
        self.stats.forward = forward
        self.policy = forward.policy
        self.bounds.per_ip = forward.max_connections_per_ip
        # The forward's name and target as the end event gives them.
        self.labels = (forward.name, str(forward.target))
        # Keepalive's idle time and interval in seconds; None: off.
        self.keepalive = forward.keepalive
        # Both sockets' options, for transports made by hand (accel).
        self.socketOptions: list[SocketOption] = relay_options(self.keepalive)

    def logPrefix(self) -> str:
        return LOG_PREFIX

    def buildProtocol(self, addr: IAddress | None) -> RelaySide | None:
        """
        Admit a client, or refuse it before any upstream work: returning
        None makes the listening port close the socket at once.
        """
        return self.acceptFrom(str(getattr(addr, "host", "")), int(getattr(addr, "port", 0)))

    def acceptFrom(self, host: str, port: int) -> RelaySide | None:
        """L{buildProtocol} for a client at C{host} and C{port}."""
        relay = self.relayClass(self)
        if self.forward.accept_proxy_protocol:
            if not matches_trusted(parse_ip(host), self.forward):
                self.refused(format_address(host, port), policy.UNTRUSTED)
                return None
            if self.bounds.full():
                self.refused(format_address(host, port), policy.AT_BOUND)
                return None
            # Counted in the total now; allow/deny and the per-address
            # bound wait for the header to name the real client.
            self.bounds.count()
        else:
            why = self.admit(relay, parse_ip(host), ip_text(host))
            if why is not None:
                self.refused(format_address(host, port), why)
                return None
            if host:
                # The address the transport's getPeer() would build again.
                relay.clientHost, relay.clientPort = host, port
        self.relays.add(relay)
        self.stats.opened()
        return relay.sideClass(relay, True)

    def admit(self, relay: Relay, client: IPAddress | None, key: str | None = None) -> str | None:
        """
        Check the client against allow/deny and the bounds; count it if
        admitted (under C{key}, C{str(client)} by default).
        """
        if not self.policy.permits(client):
            return policy.DENIED
        if key is None:
            key = str(client)
        counted = bool(self.forward.accept_proxy_protocol)
        why = self.bounds.admit(client, counted=counted, key=key)
        if why is None:
            relay.admitted = True
            relay.clientIP = client
            relay.clientKey = key
        return why

    @property
    def refusedCounts(self) -> dict[str, int]:
        """The refusals so far, by reason (those that happened)."""
        return {reason: n for reason, n in self.stats.refused.items() if n}

    def refused(self, client: str, refusal: str, detail: str = "") -> None:
        self.stats.count_refused(refusal)
        self.refusalLog.refused(self.forward.name, client, refusal, detail)

    def targetFailed(self, reason: str, detail: str) -> None:
        """A relay could not reach the forward's target."""
        target = str(self.forward.target)
        self.targetLog.refused(self.forward.name, target, reason, detail, target=target)

    def relayEnded(self, relay: Relay) -> None:
        if relay in self.relays:
            self.relays.discard(relay)
            self.bounds.release(relay.clientIP, admitted=relay.admitted, key=relay.clientKey)
            reason = relay.reason or "unknown"
            self.stats.ended(reason, connect_failed=reason in CONNECT_FAILURES)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Fire once every live relay has ended on its own, closing those still
        open after C{timeout} seconds (all of them at once for 0).
        """
        if not self.relays:
            return succeed(None)
        ended: Deferred[Any] = DeferredList([relay.done for relay in self.relays])
        if timeout <= 0:
            self.closeAll()
        else:
            deadline = self.clock.callLater(timeout, self.closeAll)
            ended.addBoth(_cancelling(deadline))
        return ended.addCallback(lambda _: None)

    def closeAll(self) -> Deferred[Any]:
        """End every live relay; fires when all have reported their end."""
        done = [relay.done for relay in self.relays]
        for relay in list(self.relays):
            relay.close(SHUTDOWN)
        return DeferredList(done)


def _cancelling(call: IDelayedCall) -> Any:
    """A callback that cancels C{call} if it is still pending."""

    def cancel(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return cancel
