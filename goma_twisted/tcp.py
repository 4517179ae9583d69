"""
The TCP relay: a pair of protocols in the manner of
L{twisted.protocols.portforward}, on Twisted's public API, which also pass
a half-close through, time out connects and idle pairs, close gently, and
say why each connection ended.

A L{RelaySide} (L{goma_twisted.tcpside}) is each end: the accepted client
connection and the one opened to the forward's target. The client's end is
paused until the target is connected, so what it sends early waits in the
kernel; then each transport is registered as the producer of the other,
so a slow reader on one side pauses reading on the other. A L{Relay} holds
the pair's life as one L{RelayState}, and each side's two halves as one
L{Flow}. L{goma_twisted.accel} makes the same relay faster by subclassing
L{Relay} and L{RelaySide}; nothing here depends on it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    ISystemHandle,
)
from twisted.python.failure import Failure

from . import ending, proxyprotocol
from .config import format_address
from .ending import (
    CLIENT_CLOSED,
    CONNECT_FAILURES,
    CONNECT_TIMEOUT,
    IDLE_TIMEOUT,
    TARGET_CLOSED,
    connect_failure_reason,
)
from .sockopts import apply_options, keepalive_timing, unread
from .tcpheader import HeaderReading
from .tcpside import CLOSE_GRACE, LINGER_QUIET, Flow, RelaySide, RelayState, TargetFactory

# What a connect in progress is: Twisted's IConnector, HostnameEndpoint's
# Deferred, or the accelerated relay's Connecting.
Connecting = Any


class Relay:
    """
    The life of one relayed connection: connecting, timers, counters, and
    the single event that reports its end.
    """

    # Slots: a relay is made per connection and has more names than an
    # instance dict shares its keys for.
    __slots__ = (
        "__weakref__", "_done", "abortTimer", "admitted", "bytesToClient", "bytesToTarget",
        "client", "clientHost", "clientIP", "clientKey", "clientPort", "clock", "connectTime",
        "connectTimer", "connecting", "factory", "failureDetail", "forward", "header",
        "idleTimer", "labels", "lastActivity", "live", "localHost", "localPort", "proxiedBy",
        "reactor", "reason", "started", "state", "stats", "target", "targetAddress",
    )  # fmt: skip

    sideClass: type[RelaySide] = RelaySide
    closeGrace = CLOSE_GRACE

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.stats = factory.stats
        self.forward = forward = factory.forward
        self.reactor = factory.reactor
        self.clock = factory.clock
        # The forward's name and target as the end event gives them.
        self.labels = factory.labels
        self.started = self.lastActivity = self.clock.seconds()
        self.state = RelayState.HEADER if forward.accept_proxy_protocol else RelayState.CONNECTING
        self.client: RelaySide | None = None
        self.target: RelaySide | None = None
        self.live = 0  # sides connected and not yet lost
        self.connecting: Connecting | None = None
        self.connectTimer: IDelayedCall | None = None
        self.idleTimer: IDelayedCall | None = None
        self.abortTimer: IDelayedCall | None = None
        self.reason: str | None = None
        self.failureDetail: str | None = None
        self.bytesToTarget = self.bytesToClient = 0
        self.connectTime: float | None = None
        self.targetAddress = ""
        # Who the client is: the connection's own addresses, or what a
        # trusted load balancer's PROXY header says they are.
        self.clientHost = self.localHost = ""
        self.clientPort = self.localPort = 0
        self.proxiedBy: str | None = None
        # Only behind a trusted load balancer (acceptProxyProtocol).
        self.header: HeaderReading | None = None
        # Set once the client passed allow/deny and the per-address bound.
        self.admitted = False
        self.clientIP: Any = None
        self.clientKey: str | None = None
        self._done: Deferred[None] | None = None

    @property
    def done(self) -> Deferred[None]:
        """Fires once the relay has ended, its sockets closed, and reported its end."""
        if self._done is None:
            self._done = Deferred()
            if self.state is RelayState.ENDED:
                self._done.callback(None)
        return self._done

    # Sides come and go.

    def sideMade(self, side: RelaySide) -> None:
        self.live += 1
        if not side.fromClient:
            self.targetConnected(side)
            return
        self.client = side
        if self.state is RelayState.HEADER:
            self.header = HeaderReading(self)
            self.header.start(side)
            return
        side.transport.pauseProducing()
        self.clientReady()

    def clientReady(self) -> None:
        """The client may be served (past any PROXY header): connect to the target."""
        client = self.client
        assert client is not None
        self.state = RelayState.CONNECTING
        if not self.clientHost:
            peer = client.transport.getPeer()
            self.clientHost, self.clientPort = peer.host, peer.port
        if self.forward.proxy_protocol is not None and not self.localHost:
            host = client.transport.getHost()
            self.localHost, self.localPort = host.host, host.port
        self.setOptions(client)
        self.connectTarget()

    def setOptions(self, side: RelaySide) -> None:
        """The relay's socket options (no Nagle delay, keepalive) on C{side}."""
        transport = side.transport
        transport.setTcpNoDelay(True)
        keepalive = self.factory.keepalive
        transport.setTcpKeepAlive(keepalive is not None)
        if keepalive is not None and ISystemHandle.providedBy(transport):
            apply_options(ISystemHandle(transport).getHandle(), keepalive_timing(keepalive))

    def connectTarget(self) -> None:
        """Start connecting to the forward's target (its hostname resolved now)."""
        target = self.forward.target
        timeout = self.forward.connect_timeout
        factory = TargetFactory(self)
        self.connectTimer = self.clock.callLater(timeout, self._connectTimedOut)
        if target.is_hostname:
            endpoint = HostnameEndpoint(self.reactor, target.host, target.port, timeout=timeout)
            pending = endpoint.connect(factory)
            self.connecting = pending
            pending.addErrback(self.targetFailed)
        else:
            self.connecting = self.reactor.connectTCP(
                target.host, target.port, factory, timeout=timeout
            )

    def _connectTimedOut(self) -> None:
        self.connectTimer = None
        self.reason = self.reason or CONNECT_TIMEOUT
        self._stopConnecting()

    def _stopConnecting(self) -> None:
        """Give up a connect in progress; its failure comes back to L{targetFailed}."""
        connecting = self.connecting
        if isinstance(connecting, Deferred):
            connecting.cancel()
        elif connecting is not None and getattr(connecting, "state", "connecting") == "connecting":
            # A connector that already connected or failed has nothing to stop.
            connecting.stopConnecting()

    def targetConnected(self, target: RelaySide) -> None:
        self._cancel("connectTimer")
        self.connecting = None
        self.connectTime = self.clock.seconds() - self.started
        self.stats.connected(self.connectTime)
        if self.state is not RelayState.CONNECTING:
            target.transport.loseConnection()
            return
        client = self.client
        assert client is not None
        self.state = RelayState.RELAYING
        self.target = target
        client.peer, target.peer = target, client
        peer = target.transport.getPeer()
        self.targetAddress = ending.client_text(peer.host, peer.port)
        self.setOptions(target)
        version = self.forward.proxy_protocol
        if version is not None:
            source = (self.clientHost, self.clientPort)
            local = (self.localHost, self.localPort)
            target.transport.write(proxyprotocol.encode(version, source, local))
        if self.header is not None:
            early = self.header.takeEarly()
            if early:
                client.relayData(early)
        self.link(client, target)
        if self.forward.idle_timeout is not None:
            self.lastActivity = self.clock.seconds()
            self.idleTimer = self.clock.callLater(self.forward.idle_timeout, self._idleCheck)

    def link(self, client: RelaySide, target: RelaySide) -> None:
        """Pause each side when the other's buffer fills; start reading the client."""
        target.transport.registerProducer(client.transport, True)
        client.transport.registerProducer(target.transport, True)
        client.transport.resumeProducing()

    def targetFailed(self, failure: Failure) -> None:
        self._cancel("connectTimer")
        self.connecting = None
        self.reason = self.reason or connect_failure_reason(failure)
        self.failureDetail = failure.getErrorMessage()
        if self.reason in CONNECT_FAILURES:
            self.factory.targetFailed(self.reason, self.failureDetail)
        if self.client is not None and self.state is not RelayState.ENDED:
            self.state = RelayState.CLOSING
            self.client.transport.loseConnection()
        self._finishIfDone()

    def refuse(self, refusal: str, detail: str = "") -> None:
        """Close a client that may not be served, before any upstream work."""
        client = self.client
        assert client is not None
        self.state = RelayState.CLOSING
        peer = client.transport.getPeer()
        host = self.clientHost or peer.host
        port = self.clientPort or peer.port
        self.factory.refused(format_address(host, port), refusal, detail)
        client.transport.loseConnection()

    # Ends of the streams.

    def readEnded(self, side: RelaySide) -> None:
        """C{side}'s peer sent a FIN: pass it on, close the side once done both ways."""
        if self.state is RelayState.HEADER:
            self.header.cut()  # type: ignore[union-attr]
            return
        side.flow = side.flow.readEnded()
        if self.state is RelayState.CLOSING:
            side.transport.loseConnection()  # lingering: the peer is done
            return
        if self.reason is None:
            self.reason = CLIENT_CLOSED if side.fromClient else TARGET_CLOSED
        peer = side.peer
        if peer is not None:
            peer.finishWriting()
        if side.flow is Flow.DONE:
            side.closeBoth()

    def writeEnded(self, side: RelaySide) -> None:
        """Our FIN to C{side} is sent: close the side once done both ways."""
        side.flow = side.flow.writeEnded()
        if side.flow is Flow.DONE:
            side.closeBoth()

    def pairClosed(self) -> None:
        """Both sides closed at once, done both ways (an acceleration's clean end)."""
        self.live = 0
        self.state = RelayState.CLOSING
        self._finishIfDone()

    def sideLost(self, side: RelaySide, reason: Failure) -> None:
        self.live -= 1
        side.flow = Flow.DONE
        if side.quiet is not None and side.quiet.active():
            side.quiet.cancel()
        if self.reason is None:
            self.reason = ending.lost_reason(side.fromClient, reason)
        if self.state is not RelayState.ENDED:
            self.state = RelayState.CLOSING
        peer, side.peer = side.peer, None
        if peer is not None:
            peer.peer = None
            peer.transport.unregisterProducer()
            peer.transport.loseConnection()
        if side.fromClient:
            self._stopHeader()
            self._stopConnecting()
        self._finishIfDone()

    # Timeouts and stops.

    def _idleCheck(self) -> None:
        idle = self.forward.idle_timeout
        assert idle is not None
        remaining = self.lastActivity + idle - self.clock.seconds()
        if remaining > 0:
            self.idleTimer = self.clock.callLater(remaining, self._idleCheck)
            return
        self.idleTimer = None
        self.close(IDLE_TIMEOUT)

    def close(self, reason: str) -> None:
        """
        End both sides, for a timeout or a stop: each flushes what it holds,
        sends a FIN and lingers; one that is not done after L{closeGrace}
        seconds is cut.
        """
        if self.state is RelayState.ENDED:
            return
        self.reason = self.reason or reason
        if self.state is not RelayState.CLOSING:
            self.state = RelayState.CLOSING
            self._stopHeader()
            self._stopConnecting()
            for side in (self.client, self.target):
                if side is not None and side.flow is not Flow.DONE:
                    self.closeSide(side)
            # Each side lingers on its own now: neither closes the other.
            for side in (self.client, self.target):
                if side is not None:
                    side.peer = None
        if self.abortTimer is None and self.live:
            self.abortTimer = self.clock.callLater(self.closeGrace, self._abort)

    def closeSide(self, side: RelaySide) -> None:
        """
        Flush C{side} and close it; one whose peer is still sending (bytes
        wait unread) sends its FIN and reads, dropping, until its peer is done.
        """
        transport = side.transport
        transport.unregisterProducer()
        handle = ISystemHandle(transport, None)
        if side.flow is not Flow.OPEN or handle is None or not unread(handle.getHandle()):
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        try:
            transport.resumeProducing()
        except OSError:
            # The reactor watches no more descriptors: closed as it is.
            transport.loseConnection()
            return
        side.quiet = self.clock.callLater(LINGER_QUIET, transport.loseConnection)

    def _abort(self) -> None:
        self.abortTimer = None
        for side in (self.client, self.target):
            if side is not None and side.flow is not Flow.DONE:
                side.transport.abortConnection()

    # The end.

    def _finishIfDone(self) -> None:
        if self.live == 0 and self.connecting is None and self.state is not RelayState.ENDED:
            self.finish()

    def finish(self) -> None:
        self.state = RelayState.ENDED
        for name in ("connectTimer", "idleTimer", "abortTimer"):
            self._cancel(name)
        self._stopHeader()
        self.factory.relayEnded(self)
        if self.admitted:
            # Not refused (those are logged, rate-limited) nor gone before
            # its PROXY header: a connection that was served.
            self.logEnd()
        if self._done is not None:
            self._done.callback(None)
        self.release()

    def release(self) -> None:
        """
        Break an ended relay's reference cycles (each side and its relay, a
        PROXY header's reading and its relay), so that reference counting
        frees it at once rather than the cyclic collector.
        """
        self.header = None
        for side in (self.client, self.target):
            if side is not None:
                del side.relay

    def logEnd(self) -> None:
        forwardName, targetText = self.labels
        ending.log_tcp_end(
            {
                "forward": forwardName,
                "client": ending.client_text(self.clientHost, self.clientPort),
                "proxiedBy": self.proxiedBy,
                "target": targetText,
                "targetAddress": self.targetAddress,
                "bytesToTarget": self.bytesToTarget,
                "bytesToClient": self.bytesToClient,
                "duration": self.clock.seconds() - self.started,
                "connectTime": self.connectTime,
                "reason": self.reason,
                "detail": self.failureDetail,
            }
        )

    def _stopHeader(self) -> None:
        if self.header is not None:
            self.header.stop()

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            setattr(self, name, None)
            if timer.active():
                timer.cancel()
