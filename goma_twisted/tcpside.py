"""
The two ends of a relayed TCP connection (L{RelaySide}, one protocol for
both), and the states a relay and each of its sides go through. The
coordination of a pair is L{goma_twisted.tcp.Relay}'s.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IConnector,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from .tcp import Relay

# After a timeout or a stop, how long a side may take to flush what it
# holds before its connection is cut.
CLOSE_GRACE = 2.0
# A side closed for a timeout or a stop reads and drops what its peer
# still sends after our FIN (as nginx's lingering_close) until the peer's
# own FIN, this long without a byte, or CLOSE_GRACE: closed at once with
# unread bytes, Linux would answer with a reset that can cost the peer the
# last bytes we flushed.
LINGER_QUIET = 0.5


class RelayState(Enum):
    """Where a relayed connection is in its life."""

    HEADER = "reading the load balancer's PROXY header"
    CONNECTING = "connecting to the target, the client paused"
    RELAYING = "relaying both ways"
    CLOSING = "closing its sides"
    ENDED = "ended and reported"


class Flow(Enum):
    """What has ended of one side's reading (its peer's FIN) and writing (ours)."""

    OPEN = "open"
    READ_DONE = "read done"
    WRITE_DONE = "write done"
    DONE = "done both ways"

    def readEnded(self) -> Flow:
        return Flow.READ_DONE if self is Flow.OPEN else Flow.DONE

    def writeEnded(self) -> Flow:
        return Flow.WRITE_DONE if self is Flow.OPEN else Flow.DONE


class _TCPTransport(ITCPTransport, IPushProducer, IConsumer):
    """What a relay needs of a TCP transport: it is a producer and a consumer too."""


@implementer(IHalfCloseableProtocol)
class RelaySide(Protocol):
    """Either end of a relayed pair: the accepted client (C{fromClient}) or the target."""

    transport: _TCPTransport

    def __init__(self, relay: Relay, fromClient: bool) -> None:
        self.relay = relay
        self.fromClient = fromClient
        self.peer: RelaySide | None = None
        self.flow = Flow.OPEN
        # While lingering (RelayState.CLOSING): closes this side once quiet.
        self.quiet: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.relay.sideMade(self)

    def dataReceived(self, data: bytes) -> None:
        state = self.relay.state
        if state is RelayState.RELAYING:
            self.relayData(data)
        elif state is RelayState.HEADER:
            self.relay.header.feed(data)  # type: ignore[union-attr]
        elif self.quiet is not None and self.quiet.active():
            self.quiet.reset(LINGER_QUIET)  # lingering: dropped

    def relayData(self, data: bytes) -> None:
        """Count what this side read, mark the pair active, pass it to the peer."""
        peer = self.counted(len(data))
        if peer is not None:
            peer.transport.write(data)

    def counted(self, count: int) -> RelaySide | None:
        """Count C{count} bytes read by this side, mark the relay active; the peer."""
        relay = self.relay
        if self.fromClient:
            relay.bytesToTarget += count
            relay.stats.bytes_to_target += count
        else:
            relay.bytesToClient += count
            relay.stats.bytes_to_client += count
        if relay.idleTimer is not None:
            relay.lastActivity = relay.clock.seconds()
        return self.peer

    def finishWriting(self) -> None:
        """Half-close this side once what is queued for it is sent (its peer is done)."""
        self.transport.unregisterProducer()
        self.transport.loseWriteConnection()

    def closeBoth(self) -> None:
        """Close this side, done both ways."""
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.relay.readEnded(self)

    def writeConnectionLost(self) -> None:
        self.relay.writeEnded(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.sideLost(self, reason)


class TargetFactory(ClientFactory):
    """Builds the target's end of one relay and reports a failed connect."""

    noisy = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> RelaySide:
        return self.relay.sideClass(self.relay, False)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.relay.targetFailed(reason)
