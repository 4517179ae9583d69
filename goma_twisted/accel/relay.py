"""
The accelerated TCP relay: L{goma_twisted.tcp}'s relay, with each linked
side reading its socket itself and sending at once (L{FastSide.relayRead}),
its clean ends done without Twisted's disconnect chain
(L{FastSide.endOfStream}), and its connects and accepts on goma-pt's own
transports (L{goma_twisted.accel.transports}).

Replaces: the transport's C{doRead}, C{dataReceived}, C{write} and the
half-close and close paths of a relay between messages. Buys: less CPU per
new connection and per small request than the plain relay; the measured
ratios are in docs/benchmarks.md ("The plain relay's price"). A timeout or a
stop hands a side back to the plain relay's way of closing
(L{FastRelay.closeSide}).
"""

from __future__ import annotations

import contextlib
import socket
from errno import EWOULDBLOCK
from typing import Any

from twisted.internet import tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from .. import tcp as plain
from ..ending import CLIENT_CLOSED, TARGET_CLOSED
from ..tcp import Flow, RelayState
from ..tcpfactory import TCPForwardFactory
from . import io
from .io import CLOSED, SplicePipe, close_transport, send_now, writable
from .transports import Connecting, TargetAddress


class FastSide(plain.RelaySide):
    """Either end of an accelerated pair (one class for both: CPython specialises per class)."""

    def __init__(self, relay: plain.Relay, fromClient: bool) -> None:
        super().__init__(relay, fromClient)
        # Whether bytes for this side are sent at once (a Twisted TCP transport).
        self.sendsNow = False
        # Whether sending to this side met an error (a reset): its end of
        # stream is then a lost connection, not a close.
        self.sendFailed = False
        # The pipe this side's reads pass through once it splices.
        self.pipe: SplicePipe | None = None
        self.spliceTried = False

    def accelerate(self) -> None:
        """Read this side's socket directly from now on (its peer is linked)."""
        transport: Any = self.transport
        if not isinstance(self.transport, tcp.Connection) or not hasattr(
            transport, "_tempDataLen"
        ):
            return
        self.sendsNow = True
        transport.bufferSize = io.READ_SIZE
        # No shutdown(SHUT_RDWR) before close(): one syscall less per side.
        transport._shouldShutdown = False
        if not transport._aborting:
            # An instance attribute, as Twisted's own states use.
            transport.doRead = self.relayRawRead if io.RAW is not None else self.relayRead
            if io.SPLICE_AFTER == 0:
                self.startSplicing()

    def decelerate(self) -> None:
        """Hand this side back to Twisted's reading (a timeout's or a stop's close)."""
        if self.pipe is not None:
            self.closePipe()
        if self.sendsNow:
            self.sendsNow = False
            own = vars(self.transport)
            if own.get("doRead") in (self.relayRead, self.relayRawRead, self.relaySplice):
                del own["doRead"]

    # Reading.

    def relayRead(self) -> Any:
        """C{doRead} once linked: Twisted's C{doRead} and C{dataReceived} in one call."""
        try:
            data = self.transport.socket.recv(io.READ_SIZE)  # type: ignore[attr-defined]
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        if not data:
            return self.endRead()
        self.relayData(data)
        if io.SPLICE_AFTER is not None and len(data) >= io.SPLICE_AFTER:
            self.startSplicing()
        return None

    def relayRawRead(self) -> Any:
        """L{relayRead} into the raw buffer (PyPy): L{relayData} gets a view of it."""
        raw: Any = io.RAW
        skt: Any = self.transport.socket  # type: ignore[attr-defined]
        count = raw.recv(skt.fileno(), raw.buffer, io.READ_SIZE, 0)
        if count > 0:
            self.relayData(raw.view[:count])
            if io.SPLICE_AFTER is not None and count >= io.SPLICE_AFTER:
                self.startSplicing()
            return None
        if count == 0:
            return self.endRead()
        if raw.ffi.errno in io.AGAIN:
            return None
        return CONNECTION_LOST

    def copyRead(self) -> Any:
        """A read of the copy path, where splicing cannot."""
        if io.RAW is not None:
            return self.relayRawRead()
        return self.relayRead()

    def relayData(self, data: bytes | memoryview) -> None:
        peer: Any = self.counted(len(data))
        if peer is None:
            return
        if peer.sendsNow:
            if send_now(peer.transport, data):
                peer.sendFailed = True
        else:
            peer.transport.write(bytes(data))

    # Splicing (PyPy's bulk streams).

    def startSplicing(self) -> None:
        """Read by L{relaySplice} from now on, if a pipe can be had; tried once."""
        if self.spliceTried:
            return
        self.spliceTried = True
        transport: Any = self.transport
        if io.SPLICE is None or transport._aborting:
            return
        try:
            self.pipe = SplicePipe()
        except OSError:
            return
        transport.doRead = self.relaySplice

    def relaySplice(self) -> Any:
        """
        L{relayRead} through this side's pipe: the bytes go on to the peer's
        socket when it is writable with nothing queued; what it does not take
        stays in the pipe, and this side stops reading until L{drainPipe} has
        sent it. Otherwise the pipe is read out into the peer's C{write}.
        """
        pipe: Any = self.pipe
        transport: Any = self.transport
        if pipe.held:
            transport.stopReading()
            return None
        try:
            count = io.SPLICE(transport.socket.fileno(), pipe.write, io.READ_SIZE)
        except BlockingIOError:
            # Nothing to read, or urgent data splice(2) will not move: recv()
            # steps over it.
            return self.copyRead()
        except OSError:
            return CONNECTION_LOST
        if count == 0:
            # The end of the stream, or urgent data before the FIN.
            return self.copyRead()
        peer: Any = self.counted(count)
        if peer is None:
            pipe.readOut(count)
            return None
        other: Any = peer.transport
        if not writable(other):
            other.write(pipe.readOut(count))
            return None
        pipe.held = count
        if self.drainPipe() is not None:
            other.write(pipe.readOut(pipe.held))
            pipe.held = 0
            peer.sendFailed = True
        elif pipe.held:
            transport.stopReading()
            other.doWrite = self.drainPipe
            other.startWriting()
        return None

    def drainPipe(self) -> Any:
        """The peer transport's C{doWrite} while the pipe holds bytes for it."""
        pipe: Any = self.pipe
        other: Any = self.peer.transport  # type: ignore[union-attr]
        try:
            pipe.held -= io.SPLICE(pipe.read, other.socket.fileno(), pipe.held)
        except BlockingIOError:
            return None
        except OSError:
            return CONNECTION_LOST
        if pipe.held or other.doWrite != self.drainPipe:
            return None
        del other.doWrite
        self.transport.resumeProducing()
        return other.doWrite()

    def closePipe(self) -> None:
        """Close the pipe; what it holds for a live peer goes to the peer's buffer."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        if pipe.held and self.peer is not None:
            other: Any = self.peer.transport
            if other.doWrite == self.drainPipe:
                del other.doWrite
            other.write(pipe.readOut(pipe.held))
        pipe.close()

    # Ends.

    def endRead(self) -> Any:
        """What a read of an end of stream returns to the reactor."""
        if self.sendFailed:
            return CONNECTION_LOST
        if self.endOfStream():
            return None
        return CONNECTION_DONE

    def endOfStream(self) -> bool:
        """
        Pass on a clean end of stream when both transports are in the plain
        state of a relay between messages; False leaves it to Twisted. The
        first end of a pair stops reading here and half-closes the peer; the
        second closes both sides and ends the relay at once.
        """
        peer: Any = self.peer
        transport: Any = self.transport
        if (
            peer is None
            or (self.flow is not Flow.OPEN and self.flow is not Flow.WRITE_DONE)
            or not peer.sendsNow
            or transport.disconnecting
            or transport._aborting
            or not transport.connected
        ):
            return False
        other: Any = peer.transport
        if not writable(other):
            return False
        relay = self.relay
        if peer.flow is Flow.OPEN or peer.flow is Flow.WRITE_DONE:
            # The first end: stop reading here, send the FIN on.
            transport.stopReading()
            self.flow = self.flow.readEnded()
            if relay.reason is None:
                relay.reason = CLIENT_CLOSED if self.fromClient else TARGET_CLOSED
            other.producer = None
            other._writeDisconnecting = other._writeDisconnected = True
            with contextlib.suppress(OSError):
                other.socket.shutdown(socket.SHUT_WR)
            peer.flow = peer.flow.writeEnded()
            return True
        if self.flow is not Flow.WRITE_DONE:
            return False  # our write side is still flushing (Twisted has it)
        # The second end: both ways done on both sides.
        self.flow = peer.flow = Flow.DONE
        self.peer = peer.peer = None
        close_transport(other)
        close_transport(transport)
        if self.pipe is not None or peer.pipe is not None:
            self.closePipe()
            peer.closePipe()
        relay.pairClosed()
        return True

    def finishWriting(self) -> None:
        """Half-close at once when nothing is queued (Twisted would wait a turn)."""
        transport: Any = self.transport
        if not (self.sendsNow and writable(transport)):
            super().finishWriting()
            return
        transport.producer = None
        transport._writeDisconnecting = transport._writeDisconnected = True
        if self.flow is Flow.OPEN:
            with contextlib.suppress(OSError):
                transport.socket.shutdown(socket.SHUT_WR)
        self.writeConnectionLost()

    def closeBoth(self) -> None:
        """Close at once with a shared L{Failure} when the write side is done."""
        transport: Any = self.transport
        if (
            self.sendsNow
            and transport._writeDisconnected
            and transport.connected
            and not transport.disconnecting
        ):
            transport.connectionLost(CLOSED)
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.pipe is not None:
            self.closePipe()
        super().connectionLost(reason)


class FastRelay(plain.Relay):
    """L{plain.Relay} on goma-pt's transports, linking L{FastSide}s."""

    __slots__ = ()
    sideClass = FastSide

    def sideMade(self, side: plain.RelaySide) -> None:
        if side.fromClient and getattr(side.transport, "readingHeld", False):
            # A RelayPort transport, not reading yet: no pause needed.
            self.live += 1
            self.client = side
            if self.state is RelayState.HEADER:
                side.transport.startReading()  # type: ignore[attr-defined]
                self.header = plain.HeaderReading(self)
                self.header.start(side)
                return
            self.clientReady()
            return
        super().sideMade(side)

    def setOptions(self, side: plain.RelaySide) -> None:
        if not getattr(side.transport, "tcpOptionsSet", False):
            super().setOptions(side)

    def connectTarget(self) -> None:
        address = self.factory.targetAddress
        if address is None:
            super().connectTarget()
            return
        side = self.sideClass(self, False)
        connecting = Connecting(
            self.reactor,
            self.clock,
            address,
            self.forward.connect_timeout,
            side,
            self.targetFailed,
            self.factory.socketOptions,
        )
        self.connecting = connecting
        connecting.start()

    def link(self, client: plain.RelaySide, target: plain.RelaySide) -> None:
        fastClient: Any = client
        fastTarget: Any = target
        fastClient.accelerate()
        fastTarget.accelerate()
        ours: Any = client.transport
        theirs: Any = target.transport
        if (
            fastClient.sendsNow
            and fastTarget.sendsNow
            and ours.producer is None
            and theirs.producer is None
            and not (ours.disconnected or theirs.disconnected)
        ):
            # What registerProducer does for a connected pair, both ways;
            # then resumeProducing (startReading).
            theirs.producer, theirs.streamingProducer = ours, True
            ours.producer, ours.streamingProducer = theirs, True
            if ours.connected and not ours.disconnecting:
                ours.startReading()
        else:
            super().link(client, target)

    def closeSide(self, side: plain.RelaySide) -> None:
        side.decelerate()  # type: ignore[attr-defined]
        super().closeSide(side)

    def release(self) -> None:
        # Each transport holds its side's bound doRead too.
        for side in (self.client, self.target):
            if side is not None and side.sendsNow:  # type: ignore[attr-defined]
                with contextlib.suppress(AttributeError):
                    del side.transport.doRead  # type: ignore[attr-defined]
        super().release()


class FastFactory(TCPForwardFactory):
    """The factory of an accelerated forward."""

    relayClass = FastRelay

    def reconfigure(self, forward: Any) -> None:
        super().reconfigure(forward)
        # Where new connections go, when an IP target can take Connecting.
        target = forward.target
        self.targetAddress = (
            None if target.is_hostname else TargetAddress(target.host, target.port)
        )
