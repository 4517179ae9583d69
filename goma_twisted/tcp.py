"""
The TCP relay: a pair of protocols in the manner of
L{twisted.protocols.portforward}, which also pass a half-close through,
time out connects and idle pairs, and say why each connection ended.

A L{RelaySide} is each end: the accepted connection (L{ClientSide}) and
the one we open to the forward's target (L{TargetSide}). Each transport is
registered as the producer of the other, so a slow reader on one side
pauses reading on the other and memory stays bounded by the socket
buffers plus one read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import socket
import sys
import termios
from errno import EWOULDBLOCK
from functools import partial
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReadDescriptor,
    ITCPTransport,
)
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from . import policy
from ._reactor import reactor_or_global
from .config import Forward, format_address
from .connect import Connecting, TargetAddress, lean
from .logs import EventLogger
from .policy import SPLICE_PIPES, Bounds, IPAddress, RefusalLog, ip_text, matches, parse_ip
from .proxyprotocol import HeaderReader, ProxyHeaderError, encode
from .stats import TCPStats

log = EventLogger(namespace="goma_pt.tcp")

# Why a connection ended, as the end-of-connection event reports it.
CLIENT_CLOSED = "client closed"
TARGET_CLOSED = "target closed"
CLIENT_RESET = "client reset"
TARGET_RESET = "target reset"
IDLE_TIMEOUT = "idle timeout"
CONNECT_TIMEOUT = "connect timeout"
CONNECT_REFUSED = "connect refused"
RESOLVE_FAILED = "resolve failed"
CONNECT_FAILED = "connect failed"
SHUTDOWN = "shutdown"

# After a timeout or a stop, how long a side may take to flush what it
# holds before its connection is cut.
CLOSE_GRACE = 2.0
# A side closed for a timeout or a stop while its peer was still sending
# reads and drops what comes after its FIN until the peer's own FIN, this
# long without a byte, or CLOSE_GRACE (see _Lingering).
LINGER_QUIET = 0.5

END_REASONS = (
    CLIENT_CLOSED, TARGET_CLOSED, CLIENT_RESET, TARGET_RESET, IDLE_TIMEOUT,
    CONNECT_TIMEOUT, CONNECT_REFUSED, RESOLVE_FAILED, CONNECT_FAILED, SHUTDOWN,
)  # fmt: skip
CONNECT_FAILURES = (CONNECT_REFUSED, CONNECT_TIMEOUT, RESOLVE_FAILED, CONNECT_FAILED)


def connect_failure_reason(failure: Failure) -> str:
    """Name the way an upstream connection attempt failed."""
    if failure.check(error.ConnectionRefusedError):
        return CONNECT_REFUSED
    if failure.check(error.TimeoutError, error.TCPTimedOutError):
        return CONNECT_TIMEOUT
    if failure.check(error.DNSLookupError):
        return RESOLVE_FAILED
    return CONNECT_FAILED


_ENDED_FORMAT = (
    "{forward} {client} -> {target}: {reason}; "
    "{bytesToTarget} bytes sent, {bytesToClient} received, {duration:.3f}s"
)
_FAILED_FORMAT = "{forward} {client} -> {target}: {reason} ({detail}); {duration:.3f}s"
_CONNECTED_FORMAT = _ENDED_FORMAT + " (connect {connectTime:.3f}s)"


def _address(address: IAddress) -> str:
    return format_address(address.host, address.port)  # type: ignore[attr-defined]


class _TCPTransport(ITCPTransport, IPushProducer, IConsumer):
    """What a relay needs of a TCP transport: it is a producer and a consumer too."""


# How much one read takes from a socket (Twisted reads 64 KiB). It is also
# the transport's write buffer mark above which the peer's reading pauses,
# so a pair holds at most about 2 x READ_SIZE per direction besides the
# kernel's socket buffers. 1 MiB measured 0.65-0.78x (up) and 0.62-0.69x
# (down) the CPU per GB of 256 KiB in iperf3 bulk (512 KiB in between),
# with no cost per small message; the price is a slow reader's peak RSS.
READ_SIZE = 1024 * 1024


class _RawIO:
    """
    recv and send of libc through cffi (ABI mode), on one buffer of raw
    memory that every relay of the process reads into (one reactor thread:
    what was read is sent, or copied, before the next read).

    For PyPy. Its socket recv(n) fills a fresh n-byte buffer on every call,
    whatever came: 1 MiB reads cost it 4.7x the CPU per small request of
    64 KiB reads, and 64 KiB reads make 6.6x the recv, send and epoll_wait
    calls per GB of CPython's 1 MiB (about twice its CPU per GB in iperf3
    bulk, nearly all in the kernel). Its recv_into and send of a memoryview
    do not help: send copies the view into a fresh buffer (a bytearray's a
    byte at a time), and fresh megabytes are page faults (brk grows and
    trims the heap): 1 MiB reads that way cost as much as 64 KiB. Here
    nothing is allocated or copied: 1 MiB reads cost no more per small
    message than recv(64 KiB), and 0.81x (up) and 0.85x (down) the CPU
    per GB of 64 KiB reads in iperf3 bulk.
    """

    def __init__(self) -> None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(
            "ssize_t recv(int, void *, size_t, int); ssize_t send(int, const void *, size_t, int);"
            "ssize_t splice(int, void *, int, void *, size_t, unsigned int);"
        )
        lib = ffi.dlopen(None)  # the C library the interpreter has loaded
        self.ffi = ffi
        self.recv = lib.recv
        self.send = lib.send
        # Linux only (see _loadSplice): None elsewhere.
        self.splice = getattr(lib, "splice", None)
        self.buffer = ffi.new("char[]", READ_SIZE)
        # What relayData gets: a view of the first bytes of the buffer.
        self.view = memoryview(ffi.buffer(self.buffer, READ_SIZE))


def _loadRawIO() -> _RawIO | None:
    """L{_RawIO}, or None without cffi or a C library to open."""
    try:
        return _RawIO()
    except Exception:
        return None


if platform.python_implementation() == "PyPy":
    _RAW = _loadRawIO()
    if _RAW is None:
        READ_SIZE = 64 * 1024  # PyPy's own recv then (see _RawIO).
else:
    _RAW = None  # CPython's recv and send do not copy.
    # CPython's recv(READ_SIZE) allocates READ_SIZE bytes and shrinks them
    # to what came. Above glibc's mmap threshold (128 KiB until a larger
    # block is freed) that is an mmap, mremap and munmap per read: about
    # 20 us for each small message. Freeing one larger block raises glibc's
    # threshold for good, so these allocations come from the heap whatever
    # the process did before.
    bytes(2 * READ_SIZE)

# The errors of a raw send or recv that only mean "not now".
_AGAIN = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))
# A raw send to a peer that is gone fails with EPIPE, without SIGPIPE.
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _sendView(skt: socket.socket, data: bytes | memoryview) -> int:
    """C{skt.send(data)} for a view of the raw buffer (see L{_RawIO})."""
    raw = _RAW
    if raw is None:
        return skt.send(data)
    sent: int = raw.send(skt.fileno(), raw.ffi.from_buffer(data), len(data), _MSG_NOSIGNAL)
    if sent < 0:
        code = raw.ffi.errno
        if code in _AGAIN:
            raise BlockingIOError(code, os.strerror(code))
        raise OSError(code, os.strerror(code))
    return sent


def _loadSplice() -> Any:
    """
    C{splice(src, dst, count)} moving bytes between a socket and a pipe
    without copying them, raising as C{os.splice} does; None where there is
    none (not Linux, or PyPy without cffi: it has no C{os.splice}, and
    calls libc's through L{_RawIO}).
    """
    flags = 3  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
    if hasattr(os, "splice"):

        def splice(src: int, dst: int, count: int) -> int:
            return os.splice(src, dst, count, flags=flags)

        return splice
    raw = _RAW
    if raw is None or raw.splice is None or not hasattr(os, "pipe2"):
        return None
    call, null, ffi = raw.splice, raw.ffi.NULL, raw.ffi

    def rawSplice(src: int, dst: int, count: int) -> int:
        moved: int = call(src, null, dst, null, count, flags)
        if moved < 0:
            code = ffi.errno
            if code in _AGAIN:
                raise BlockingIOError(code, os.strerror(code))
            raise OSError(code, os.strerror(code))
        return moved

    return rawSplice


_SPLICE = _loadSplice()

# After a read of how many bytes a side moves its direction to splice(2)
# (L{_SplicePipe}); None: never. A full read marks a bulk stream, which
# small messages never make. Measured in iperf3 bulk, 2 GB a run, medians
# of 5-7 interleaved runs, copy -> splice: on PyPy goma-pt's CPU per GB
# 0.69 -> 0.31 (up) and 0.66 -> 0.34 (down), throughput +23% and +14%;
# on CPython 0.47 -> 0.34 and 0.48 -> 0.40, but throughput +8% up and
# -13% down, the iperf3 ends paying 6% and 36% more CPU per GB (the pages
# passed on, not copied, reach the reader cold, and the sender cannot
# reuse its own): off there. Tests set 0: sides splice from their first read.
SPLICE_AFTER: int | None = READ_SIZE if _RAW is not None else None


def splices() -> bool:
    """Whether relays here may splice, and so open pipes (L{_SplicePipe})."""
    return SPLICE_AFTER is not None


# fcntl's F_SETPIPE_SZ (Linux; Python's fcntl has it from 3.10).
_F_SETPIPE_SZ = 1031


class _SplicePipe:
    """
    The pipe one direction of a pair passes through once it splices: the
    bytes read go from the socket into the pipe and from the pipe into the
    peer's socket as references to the same pages, never copied into user
    memory and back (two copies per byte in the forwarder otherwise).

    C{held} counts what the pipe holds for the peer: the side does not
    read while it holds any, so a splice in that fails with EAGAIN always
    means the source is empty (with a full pipe it would mean that too).
    """

    held = 0
    # The pipes open in the process: at most MAX_PIPES, the number whose
    # descriptors policy.RESERVED_FDS keeps aside for them, so that
    # accept() still never fails for want of one (see policy.plan_budget).
    live = 0
    MAX_PIPES = SPLICE_PIPES

    def __init__(self) -> None:
        if _SplicePipe.live >= self.MAX_PIPES:
            raise OSError(errno.EMFILE, "splice pipes all in use")
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _SplicePipe.live += 1
        try:
            # A whole read at once (pipe-max-size is 1 MiB by default); a
            # user past pipe-user-pages-soft gets EPERM: the default then.
            import fcntl

            fcntl.fcntl(self.write, _F_SETPIPE_SZ, READ_SIZE)
        except OSError:
            pass

    def close(self) -> None:
        _SplicePipe.live -= 1
        os.close(self.read)
        os.close(self.write)


def _readPipe(pipe: _SplicePipe, count: int) -> bytes:
    """Take C{count} bytes out of a pipe into memory."""
    chunks = []
    while count:
        chunk = os.read(pipe.read, count)
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


# The reason a relay gives its transports when it closes them: as the
# reactor does, one Failure for all (its class tree worked out here, once).
_CLOSED = Failure(error.ConnectionDone())
_CLOSED.check(error.ConnectionDone)

# What sending at once relies on in Twisted's TCP transport (besides its
# socket): checked once here, so a Twisted without them falls back to
# transport.write() instead of failing.
_SEND_NOW = all(
    hasattr(tcp.Connection, name)
    for name in (
        "dataBuffer",
        "disconnecting",
        "_writeDisconnecting",
        "_writeDisconnected",
        "_aborting",
        "connected",
    )
)


def send_now(transport: Any, data: bytes | memoryview) -> bool:
    """
    Write C{data} to a Twisted TCP transport, sending at once what the
    socket takes when nothing is queued ahead of it.

    Twisted's C{write} only buffers: the bytes go out on a later reactor
    turn, after an C{epoll_ctl} to watch for writability and another to stop.
    Here, when the transport's buffer is empty and it is open for writing,
    C{send} is called directly and only the unsent tail is handed to
    C{write}, so the order of the stream is kept (nothing is queued that
    could go after these bytes), and Twisted's buffering and the
    producer/consumer pausing stay in charge of whatever the socket does
    not take. Any error other than a full socket is left to Twisted too:
    the data goes to C{write}, whose next send ends the connection in the
    usual way. It returns True then: C{send} took the socket's pending
    error (a reset), so a read that follows finds only an end of stream,
    and the caller must remember the reset (see L{_RelaySide.sendFailed}).
    """
    if not _writable(transport):
        transport.write(bytes(data))
        return False
    try:
        if type(data) is bytes:
            sent = transport.socket.send(data)
        else:
            sent = _sendView(transport.socket, data)
    except BlockingIOError:
        sent = 0
    except OSError:
        transport.write(bytes(data))
        return True
    if sent < len(data):
        # bytes(): a view of the shared read buffer must be copied before
        # it is queued (for bytes, a slice is a copy already).
        transport.write(bytes(data[sent:]))
    return False


# Whether a linked side may replace its transport's doRead (relayRead):
# Twisted's TCP connection reads in doRead and takes its result as the
# reason to disconnect, and its socket is an attribute.
_RELAY_READ = _SEND_NOW and all(hasattr(tcp.Connection, name) for name in ("doRead", "bufferSize"))

# Whether relayRead may end a clean half-close or close itself (endOfStream):
# it sets the state Twisted's readConnectionLost, loseConnection and
# connectionLost chain leaves on the transports, and Twisted's
# connectionLost returns at once for a transport without its socket.
_LEAN_END = _RELAY_READ and all(
    hasattr(tcp.Connection, name)
    for name in ("producer", "disconnected", "stopReading", "stopWriting", "connectionLost")
)


# Whether Relay.targetConnected may register each transport of a pair as
# the other's producer by setting what Twisted's registerProducer sets.
_LEAN_PAIR = _SEND_NOW and all(
    hasattr(tcp.Connection, name) for name in ("producer", "streamingProducer", "disconnected")
)


def _writable(transport: Any) -> bool:
    """Whether a transport is open for writing with nothing queued."""
    return not (
        transport._tempDataLen
        or transport.dataBuffer
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport._aborting
        or not transport.connected
    )


def _closeTransport(transport: Any) -> None:
    """
    Close a transport that is done both ways, leaving it as Twisted's
    C{connectionLost} does (without calling the protocol). Our reactor
    closes the socket without an C{epoll_ctl} (see its C{closeSocket}).
    """
    transport.disconnected = 1
    transport.connected = 0
    transport.producer = None
    skt = transport.socket
    closeSocket = getattr(transport.reactor, "closeSocket", None)
    if closeSocket is not None:
        closeSocket(transport, skt)
    else:
        transport.stopReading()
        transport.stopWriting()
        skt.close()
    del transport.protocol
    del transport.socket
    del transport.fileno


def _unread(skt: socket.socket) -> int:
    """How many received bytes wait in C{skt} (0 if it cannot say)."""
    try:
        return int.from_bytes(fcntl.ioctl(skt.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
    except (OSError, ValueError):  # ValueError: closed (no descriptor)
        return 0


# Where a lingering socket reads what it drops (one buffer for all: a
# recv of a new bytes object would allocate each time).
_DROPPED = bytearray(64 * 1024)


@implementer(IReadDescriptor)
class _Lingering:
    """
    A socket closed for a timeout or a stop while its peer was still
    sending, after its FIN. Closed at once, Linux would answer the peer
    with a reset (its bytes are unread) and drop what it had not yet sent
    of ours, the last bytes the close was to flush. So, as nginx's
    C{lingering_close}: it reads and drops what still comes until the
    peer's FIN or reset, L{LINGER_QUIET} seconds without a byte, or the
    close's deadline (L{CLOSE_GRACE} after it began), then closes.
    """

    def __init__(self, skt: socket.socket, reactor: Any, clock: Any, deadline: float) -> None:
        self.socket: socket.socket | None = skt
        self.reactor = reactor
        self.clock = clock
        self.closed: Deferred[None] = Deferred()
        # First: it may fail (OSError: epoll takes no more descriptors).
        reactor.addReader(self)
        self._deadline = clock.callLater(max(0.0, deadline - clock.seconds()), self.close)
        self._quiet = clock.callLater(LINGER_QUIET, self.close)

    def fileno(self) -> int:
        return -1 if self.socket is None else self.socket.fileno()

    def logPrefix(self) -> str:
        return "goma-pt lingering close"

    def doRead(self) -> Any:
        assert self.socket is not None
        for _ in range(16):
            try:
                if not self.socket.recv_into(_DROPPED):
                    return CONNECTION_DONE
            except BlockingIOError:
                break
            except OSError:
                return CONNECTION_LOST
        self._quiet.reset(LINGER_QUIET)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self.socket is None:
            return
        for timer in (self._deadline, self._quiet):
            if timer.active():
                timer.cancel()
        self.reactor.removeReader(self)
        skt, self.socket = self.socket, None
        skt.close()
        self.closed.callback(None)


@implementer(IHalfCloseableProtocol)
class _RelaySide(Protocol):
    """
    What both ends of a relayed pair do alike: copy bytes to the peer and
    pass each half-close on.
    """

    peer: _RelaySide | None = None
    relay: Relay
    transport: _TCPTransport
    readDone = False
    writeDone = False
    # Whether bytes for this side may be sent at once (see send_now): only
    # on a real Twisted TCP connection, not a test's in-memory transport.
    sendsNow = False
    # Which of the relay's byte counters what this side reads adds to.
    fromClient = False
    # Whether sending to this side met an error (a reset): its end of
    # stream is then a lost connection, not a close.
    sendFailed = False
    # The pipe this side's reads pass through once it splices (see
    # startSplicing), and whether it tried to make one.
    pipe: _SplicePipe | None = None
    spliceTried = False

    def link(self, peer: _RelaySide) -> None:
        """Relay to C{peer} from now on."""
        self.peer = peer
        transport = self.transport
        # _tempDataLen is set by FileDescriptor.__init__, so the class-level
        # check (_SEND_NOW) cannot see it: asked of the transport itself.
        if (
            _SEND_NOW
            and isinstance(transport, tcp.Connection)
            and hasattr(transport, "_tempDataLen")
        ):
            self.sendsNow = True
            transport.bufferSize = READ_SIZE
            # Twisted calls shutdown(SHUT_RDWR) before close(), "not really
            # necessary" by its own comment (descriptors are close-on-exec):
            # one syscall less per side.
            transport._shouldShutdown = False
            if _RELAY_READ and not transport._aborting:
                # An instance attribute, as Twisted's own connecting and
                # aborting states use: abortConnection() replaces it again.
                transport.doRead = (  # type: ignore[method-assign]
                    self.relayRawRead if _RAW is not None else self.relayRead
                )
                if SPLICE_AFTER == 0:
                    self.startSplicing()

    def relayRead(self) -> Any:
        """
        C{doRead} of this side's transport once the pair is linked: the
        work of Twisted's C{doRead} and C{dataReceived} in one call before
        L{relayData}, as Twisted's calls were much of the Python time per
        message. It returns what Twisted's C{doRead} returns, so the
        reactor handles an end of stream or an error as before.
        """
        try:
            data = self.transport.socket.recv(READ_SIZE)  # type: ignore[attr-defined]
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        if not data:
            return self.readEnded()
        self.relayData(data)
        if SPLICE_AFTER is not None and len(data) >= SPLICE_AFTER:
            self.startSplicing()
        return None

    def relayRawRead(self) -> Any:
        """
        L{relayRead} into the raw buffer (see L{_RawIO}): L{relayData} gets
        a view of it, and L{send_now} copies what the socket does not take
        before it is queued.
        """
        raw: Any = _RAW
        count = raw.recv(self.transport.socket.fileno(), raw.buffer, READ_SIZE, 0)  # type: ignore[attr-defined]
        if count > 0:
            self.relayData(raw.view[:count])
            if SPLICE_AFTER is not None and count >= SPLICE_AFTER:
                self.startSplicing()
            return None
        if count == 0:
            return self.readEnded()
        if raw.ffi.errno in _AGAIN:
            return None
        return CONNECTION_LOST

    def copyRead(self) -> Any:
        """A read of the copy path (L{relayRawRead} or L{relayRead}), where splicing cannot."""
        if _RAW is not None:
            return self.relayRawRead()
        return self.relayRead()

    def startSplicing(self) -> None:
        """
        Read this side by L{relaySplice} from now on, through a pipe of
        its own; without a pipe (no descriptors left, or no splice here)
        it goes on copying, as it would not refuse a connection for want
        of one. Tried once per side.
        """
        if self.spliceTried:
            return
        self.spliceTried = True
        transport: Any = self.transport
        if _SPLICE is None or transport._aborting:
            return
        try:
            self.pipe = _SplicePipe()
        except OSError:
            return
        transport.doRead = self.relaySplice

    def relaySplice(self) -> Any:
        """
        L{relayRead} through this side's pipe (see L{_SplicePipe}): the
        bytes go on to the peer's socket when it is writable with nothing
        queued; what it does not take at once stays in the pipe and this
        side stops reading until L{drainPipe} has sent it. (Reading that
        rest out into C{transport.write} instead took 13-16% of the bytes
        back through memory in iperf3 bulk, and left PyPy's CPU per GB at
        0.63-0.71, against 0.42-0.46 this way.) With bytes queued ahead in
        Twisted (a PROXY header, or what was read before the switch), or
        an error on the peer, the pipe is read out into C{transport.write},
        as L{send_now} does with what it cannot send.
        """
        pipe: Any = self.pipe
        transport: Any = self.transport
        if pipe.held:
            # Resumed while the peer still owes the pipe's bytes.
            transport.stopReading()
            return None
        try:
            count = _SPLICE(transport.socket.fileno(), pipe.write, READ_SIZE)
        except BlockingIOError:
            # Nothing to read, or bytes splice(2) will not move: it stops
            # at TCP urgent data (MSG_OOB), and fails so for as long as the
            # socket stays readable (the reactor would call again at once,
            # and the rest never came). recv() steps over the urgent byte,
            # as the copy path always did.
            return self.copyRead()
        except OSError:
            return CONNECTION_LOST
        if count == 0:
            # The end of the stream, or urgent data with the FIN behind it
            # (splice reads 0 at the mark then): recv() tells them apart.
            return self.copyRead()
        peer = self.counted(count)
        if peer is None:
            _readPipe(pipe, count)
            return None
        other: Any = peer.transport
        if not _writable(other):
            other.write(_readPipe(pipe, count))
            return None
        pipe.held = count
        if self.drainPipe() is not None:
            # As send_now: the error is Twisted's to meet on its next send.
            other.write(_readPipe(pipe, pipe.held))
            pipe.held = 0
            peer.sendFailed = True
        elif pipe.held:
            # Paused as Twisted pauses a producer (our transport is the
            # peer's), until the peer's socket has taken the rest.
            transport.stopReading()
            other.doWrite = self.drainPipe
            other.startWriting()
        return None

    def drainPipe(self) -> Any:
        """
        Send the peer what the pipe holds: the peer transport's C{doWrite}
        while it holds any. Once empty, this side reads again, and
        Twisted's C{doWrite} finds nothing queued: it stops writing, or
        finishes a C{loseConnection} that came meanwhile.
        """
        pipe: Any = self.pipe
        other: Any = self.peer.transport  # type: ignore[union-attr]
        try:
            pipe.held -= _SPLICE(pipe.read, other.socket.fileno(), pipe.held)
        except BlockingIOError:
            return None
        except OSError:
            return CONNECTION_LOST
        if pipe.held or other.doWrite != self.drainPipe:
            return None
        del other.doWrite
        self.transport.resumeProducing()  # nothing if it is closing
        return other.doWrite()

    def closePipe(self) -> None:
        """
        Close the pipe with its side (on every way a pair ends); what it
        still holds for a peer that is still there goes to that peer's
        Twisted buffer, to be flushed as any other before it closes.
        """
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        if pipe.held and self.peer is not None:
            other: Any = self.peer.transport
            if other.doWrite == self.drainPipe:
                del other.doWrite
            other.write(_readPipe(pipe, pipe.held))
        pipe.close()

    def readEnded(self) -> Any:
        """What a read of an end of stream returns to the reactor."""
        if self.sendFailed:
            return CONNECTION_LOST
        if _LEAN_END and self.endOfStream():
            return None
        return CONNECTION_DONE

    def endOfStream(self) -> bool:
        """
        Pass on a clean end of stream read by L{relayRead}, when both
        transports are in the plain state of a relay between messages;
        return False to leave it to Twisted (C{CONNECTION_DONE}).

        The first end of a pair stops reading this side and half-closes
        the peer (what L{readConnectionLost} and L{finishWriting} do); the
        second closes both sides and reports the relay's end at once.
        Twisted's way there, through C{readConnectionLost},
        C{loseConnection}, C{connectionLost} on each transport, a
        L{Failure} and its checks, was about a third of the Python calls
        per connection; and the second side's C{epoll_ctl} is saved.
        """
        peer = self.peer
        transport: Any = self.transport
        if (
            peer is None
            or self.readDone
            or not peer.sendsNow
            or transport.disconnecting
            or transport._aborting
            or not transport.connected
        ):
            return False
        other: Any = peer.transport
        if not _writable(other):
            return False
        if not peer.readDone:
            # The first end: stop reading here, send the FIN on.
            transport.stopReading()
            self.readDone = True
            self.relay.halfClosed(self)
            other.producer = None
            other._writeDisconnecting = other._writeDisconnected = True
            try:  # noqa: SIM105 (contextlib.suppress is three more calls)
                other.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            peer.writeDone = True
            return True
        if not self.writeDone:
            # Our write side is still flushing (Twisted has it).
            return False
        # The second end: both ways done on both sides.
        self.readDone = peer.writeDone = True
        self.peer = peer.peer = None
        _closeTransport(other)
        _closeTransport(transport)
        if self.pipe is not None or peer.pipe is not None:
            self.closePipe()
            peer.closePipe()
        self.relay.pairClosed()
        return True

    def relayData(self, data: bytes | memoryview) -> None:
        """Count what this side read, mark the relay active, and pass it to the peer."""
        peer = self.counted(len(data))
        if peer is None:
            return
        if peer.sendsNow:
            if send_now(peer.transport, data):
                peer.sendFailed = True
        else:
            peer.transport.write(bytes(data))

    def counted(self, count: int) -> _RelaySide | None:
        """Count C{count} bytes read by this side, mark the relay active; the peer."""
        relay = self.relay
        if self.fromClient:
            relay.bytesToTarget += count
            relay.stats.bytes_to_target += count
        else:
            relay.bytesToClient += count
            relay.stats.bytes_to_client += count
        if relay._idleTimer is not None:
            # Only the idle check reads it.
            relay.lastActivity = relay.clock.seconds()
        return self.peer

    def dataReceived(self, data: bytes) -> None:
        self.relayData(data)

    def readConnectionLost(self) -> None:
        # Our sender is done: stop it from pausing or resuming us, and
        # finish the peer's write side once its buffer is flushed.
        self.readDone = True
        self.relay.halfClosed(self)
        peer = self.peer
        if peer is not None:
            peer.transport.unregisterProducer()
            peer.finishWriting()
        if self.writeDone:
            self._close()

    def finishWriting(self) -> None:
        """
        Half-close our connection once what is queued for it is sent.

        With nothing queued, on a real TCP connection, it is done at once:
        Twisted would wait for writability (an C{epoll_ctl} there and back,
        a reactor turn and an empty C{send}) to find that out. When our read
        side is done too, the connection is about to close, which sends the
        FIN: no C{shutdown} is needed.
        """
        transport: Any = self.transport
        if not (self.sendsNow and _writable(transport)):
            transport.loseWriteConnection()
            return
        # As FileDescriptor.doWrite and tcp.Connection._closeWriteConnection.
        transport._writeDisconnecting = transport._writeDisconnected = True
        if not self.readDone:
            with contextlib.suppress(OSError):
                transport.socket.shutdown(socket.SHUT_WR)
        self.writeConnectionLost()

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        if self.readDone:
            self._close()

    def _close(self) -> None:
        """
        Close our connection, both halves done: as C{loseConnection} does
        then, at once, but with a shared L{Failure} (Twisted makes one each
        time, and the checks on it work out its class tree each time).
        """
        transport: Any = self.transport
        if (
            self.sendsNow
            and transport._writeDisconnected
            and transport.connected
            and not transport.disconnecting
        ):
            transport.connectionLost(_CLOSED)
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.pipe is not None:
            self.closePipe()
        peer, self.peer = self.peer, None
        self.relay.sideLost(self, reason)
        if peer is not None:
            peer.peer = None
            peer.transport.unregisterProducer()
            peer.transport.loseConnection()


class RelaySide(_RelaySide):
    """
    Either end of a relayed pair: the accepted client connection
    (C{fromClient}) or our connection to the forward's target.

    The client's end reads nothing until the target is connected, so the
    bytes a client sends early wait in the kernel. Behind a trusted load
    balancer (C{acceptProxyProtocol}) it first reads the PROXY header, and
    only then pauses and connects: the header is done before L{link}, so
    L{relayRead} need not look for it.

    One class for both ends, not two: the relay's code runs on both alike,
    and CPython 3.11 specialises an attribute access for one class at a
    time; with two classes taking turns, most of the relay's attribute
    accesses per connection fell back to the generic look-up.
    """

    def __init__(self, relay: Relay, fromClient: bool) -> None:
        self.relay = relay
        self.fromClient = fromClient
        # Set here though the class has them: see Relay.__init__.
        self.peer = None
        self.readDone = self.writeDone = self.sendsNow = self.sendFailed = False
        self.pipe = None

    def connectionMade(self) -> None:
        relay = self.relay
        if not self.fromClient:
            relay.targetConnected(self)
            return
        # A transport from connect.RelayPort has not started reading.
        held = getattr(self.transport, "readingHeld", False)
        if relay.expectHeader:
            if held:
                self.transport.startReading()  # type: ignore[attr-defined]
            relay.readHeader(self)
            return
        if not held:
            self.transport.pauseProducing()
        relay.clientConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.fromClient and self.relay.reader is not None:
            self.relay.headerData(data)
            return
        self.relayData(data)

    def readConnectionLost(self) -> None:
        if self.fromClient and self.relay.reader is not None:
            self.relay.headerCut()
            return
        super().readConnectionLost()


def ClientSide(relay: Relay) -> RelaySide:
    """The accepted client's end of C{relay}."""
    return RelaySide(relay, True)


def TargetSide(relay: Relay) -> RelaySide:
    """The end of C{relay} connected to the forward's target."""
    return RelaySide(relay, False)


class _TargetFactory(ClientFactory):
    """Builds the one target end of a relay and reports a failed connect."""

    noisy = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> RelaySide:
        return RelaySide(self.relay, False)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.relay.targetFailed(reason)


class Relay:
    """
    The life of one relayed connection: connecting, timers, counters, and
    the single event that reports its end.
    """

    # Slots, all set in __init__: CPython 3.11 does not specialise reading
    # a class attribute through an instance (about 6x the time of reading
    # an instance's own), and an instance dict shares its keys with its
    # class's other instances only up to 30 names (a relay has more), past
    # which it became a plain dict on every connection.
    __slots__ = (
        "__weakref__", "_abortTimer", "_clientGone", "_closeStarted", "_connectTimer",
        "_connector", "_done", "_early", "_finished", "_headerTimer", "_idleTimer", "_lingering",
        "_pending", "_targetGone", "admitted", "bytesToClient", "bytesToTarget", "client",
        "clientHost", "clientIP", "clientKey", "clientPort", "clock", "connectTime",
        "expectHeader", "factory", "failureDetail", "forward", "labels", "lastActivity",
        "localHost", "localPort", "proxiedBy", "reactor", "reader", "reason", "refusal", "started",
        "stats", "target", "targetAddress",
    )  # fmt: skip

    client: RelaySide
    target: RelaySide | None
    reason: str | None
    _done: Deferred[None] | None
    bytesToTarget: int
    bytesToClient: int
    targetAddress: str
    connectTime: float | None
    _connector: IConnector | Connecting | None
    _pending: Deferred[Any] | None
    _connectTimer: IDelayedCall | None
    _idleTimer: IDelayedCall | None
    _abortTimer: IDelayedCall | None
    _clientGone: bool
    _targetGone: bool
    _finished: bool
    # Sides still reading after a close's FIN (see _closeSocket), and
    # when the close began (its sides are cut CLOSE_GRACE after).
    _lingering: int
    _closeStarted: float | None
    failureDetail: str | None
    # Who the client is: the connection's own addresses, or what a
    # trusted load balancer's PROXY header says they are.
    clientHost: str
    clientPort: int
    localHost: str
    localPort: int
    proxiedBy: str | None
    reader: HeaderReader | None
    _headerTimer: IDelayedCall | None
    _early: bytes
    # Set once the client passed allow/deny and the per-address bound.
    admitted: bool
    clientIP: IPAddress | None
    # What the bounds count it under (policy.ip_text).
    clientKey: str | None
    refusal: str | None

    def __init__(self, factory: TCPForwardFactory) -> None:
        self.factory = factory
        self.stats = factory.stats
        self.forward = forward = factory.forward
        # The forward's name and target as the end event gives them.
        self.labels = factory.labels
        self.reactor = factory.reactor
        self.clock = factory.clock
        self.started = self.lastActivity = self.clock.seconds()
        self.expectHeader = bool(forward.accept_proxy_protocol)
        self.target = self._connector = self._pending = None
        self._connectTimer = self._idleTimer = self._abortTimer = self._headerTimer = None
        self.reason = self.failureDetail = self.proxiedBy = self.refusal = None
        self.reader = self._done = self.connectTime = self._closeStarted = None
        self.clientIP = self.clientKey = None
        self.bytesToTarget = self.bytesToClient = self._lingering = 0
        self._clientGone = self._finished = self.admitted = False
        self._targetGone = True
        self.targetAddress = self.clientHost = self.localHost = ""
        self.clientPort = self.localPort = 0
        self._early = b""

    @property
    def done(self) -> Deferred[None]:
        """Fires once the relay has ended and reported its end, and its
        sockets are closed."""
        if self._done is None:
            self._done = Deferred()
            if self._finished and not self._lingering:
                self._done.callback(None)
        return self._done

    # Reading an incoming PROXY header

    def readHeader(self, client: RelaySide) -> None:
        """Read the load balancer's PROXY header before anything else."""
        self.client = client
        self.reader = HeaderReader()
        self._headerTimer = self.clock.callLater(
            self.forward.connect_timeout, self._headerTimedOut
        )

    def headerData(self, data: bytes) -> None:
        assert self.reader is not None
        try:
            result = self.reader.feed(data)
        except ProxyHeaderError as e:
            self.refuse(policy.BAD_HEADER, str(e))
            return
        if result is None:
            return
        self._endHeader()
        self.client.transport.pauseProducing()
        addresses, self._early = result
        peer = self.client.transport.getPeer()
        self.proxiedBy = _address(peer)
        if addresses.source is not None and addresses.destination is not None:
            self.clientHost, self.clientPort = addresses.source
            self.localHost, self.localPort = addresses.destination
        host = self.clientHost or peer.host
        why = self.factory.admit(self, parse_ip(host), ip_text(host))
        if why is not None:
            self.refuse(why)
            return
        self.clientConnected(self.client)

    def headerCut(self) -> None:
        """The load balancer closed before its header was complete."""
        assert self.reader is not None
        if self.reader.buffer:
            self.refuse(policy.BAD_HEADER, "closed before the header was complete")
        else:
            # A bare connect and close: a load balancer's health check.
            self._endHeader()
            self.client.transport.loseConnection()

    def _headerTimedOut(self) -> None:
        self._headerTimer = None
        self.refuse(policy.BAD_HEADER, f"no header within {self.forward.connect_timeout:g}s")

    def _endHeader(self) -> None:
        self.reader = None
        if self._headerTimer is not None and self._headerTimer.active():
            self._headerTimer.cancel()
        self._headerTimer = None

    def refuse(self, refusal: str, detail: str = "") -> None:
        """Close a client that may not be served, before any upstream work."""
        self._endHeader()
        self.refusal = refusal
        host = self.clientHost or self.client.transport.getPeer().host
        port = self.clientPort or self.client.transport.getPeer().port
        self.factory.refused(format_address(host, port), refusal, detail)
        self.client.transport.loseConnection()

    # Connecting

    def clientConnected(self, client: RelaySide) -> None:
        self.client = client
        if not self.clientHost:
            peer = client.transport.getPeer()
            self.clientHost, self.clientPort = peer.host, peer.port
        if self.forward.proxy_protocol is not None and not self.localHost:
            # Only the PROXY header needs it, and getHost() is a syscall.
            host = client.transport.getHost()
            self.localHost, self.localPort = host.host, host.port
        if not getattr(client.transport, "tcpOptionsSet", False):
            client.transport.setTcpKeepAlive(True)
            client.transport.setTcpNoDelay(True)
        target = self.forward.target
        timeout = self.forward.connect_timeout
        address = self.factory.targetAddress
        if address is not None:
            side = RelaySide(self, False)
            connecting = Connecting(
                self.reactor, self.clock, address, timeout, side, self.targetFailed
            )
            self._connector = connecting
            connecting.start()
            return
        factory = _TargetFactory(self)
        if target.is_hostname:
            endpoint = HostnameEndpoint(self.reactor, target.host, target.port, timeout=timeout)
            self._pending = endpoint.connect(factory)
            self._pending.addErrback(self._hostnameFailed)
            self._connectTimer = self.clock.callLater(timeout, self._connectTimedOut)
        else:
            self._connector = self.reactor.connectTCP(
                target.host, target.port, factory, timeout=timeout
            )

    def _hostnameFailed(self, failure: Failure) -> None:
        self._pending = None
        self.targetFailed(failure)

    def _connectTimedOut(self) -> None:
        self._connectTimer = None
        self.reason = self.reason or CONNECT_TIMEOUT
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def targetConnected(self, target: RelaySide) -> None:
        if self._connectTimer is not None:
            self._cancelConnectTimer()
        self.connectTime = self.clock.seconds() - self.started
        self.stats.connected(self.connectTime)
        self._pending = None
        connector, self._connector = self._connector, None
        if self._clientGone:
            target.transport.loseConnection()
            return
        self.target = target
        self._targetGone = False
        client = self.client
        client.link(target)
        target.link(client)
        if isinstance(connector, Connecting):
            self.targetAddress = connector.target.text
        else:
            self.targetAddress = _address(target.transport.getPeer())
        if not getattr(target.transport, "tcpOptionsSet", False):
            target.transport.setTcpKeepAlive(True)
            target.transport.setTcpNoDelay(True)
        version = self.forward.proxy_protocol
        if version is not None:
            source = (self.clientHost, self.clientPort)
            target.transport.write(encode(version, source, (self.localHost, self.localPort)))
        early, self._early = self._early, b""
        if early:
            client.relayData(early)
        ours: Any = client.transport
        theirs: Any = target.transport
        if (
            _LEAN_PAIR
            and client.sendsNow
            and target.sendsNow
            and ours.producer is None
            and theirs.producer is None
            and not (ours.disconnected or theirs.disconnected)
        ):
            # What registerProducer does for a pair that is connected and
            # has none, both ways; then resumeProducing (startReading).
            theirs.producer, theirs.streamingProducer = ours, True
            ours.producer, ours.streamingProducer = theirs, True
            if ours.connected and not ours.disconnecting:
                ours.startReading()
        else:
            theirs.registerProducer(ours, True)
            ours.registerProducer(theirs, True)
            ours.resumeProducing()
        if self.forward.idle_timeout is not None:
            self.lastActivity = self.clock.seconds()
            self._idleTimer = self.clock.callLater(self.forward.idle_timeout, self._idleCheck)

    def targetFailed(self, failure: Failure) -> None:
        self._cancelConnectTimer()
        self._connector = None
        self.reason = self.reason or connect_failure_reason(failure)
        self.failureDetail = failure.getErrorMessage()
        if not self._clientGone:
            self.client.transport.loseConnection()

    def _cancelConnectTimer(self) -> None:
        if self._connectTimer is not None and self._connectTimer.active():
            self._connectTimer.cancel()
        self._connectTimer = None

    # Relaying

    def halfClosed(self, side: _RelaySide) -> None:
        if self.reason is None:
            self.reason = CLIENT_CLOSED if side is self.client else TARGET_CLOSED

    def _idleCheck(self) -> None:
        idle = self.forward.idle_timeout
        assert idle is not None
        remaining = self.lastActivity + idle - self.clock.seconds()
        if remaining > 0:
            self._idleTimer = self.clock.callLater(remaining, self._idleCheck)
            return
        self._idleTimer = None
        self.close(IDLE_TIMEOUT)

    def close(self, reason: str) -> None:
        """
        End both sides, for a timeout or a stop: each flushes what it holds
        and closes with a FIN; a side that will not take its bytes is cut
        after L{CLOSE_GRACE} seconds.
        """
        self.reason = self.reason or reason
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.stopConnecting()
        if self._closeStarted is None:
            self._closeStarted = self.clock.seconds()
        for side in self._sides():
            transport = side.transport
            if isinstance(transport, tcp.Connection) and "_closeSocket" not in vars(transport):
                # An instance attribute, which Twisted's connectionLost calls
                # (private: a Twisted that does not closes as it always did).
                transport._closeSocket = partial(  # type: ignore[method-assign]
                    self._closeSocket, transport
                )
            transport.unregisterProducer()
            transport.loseConnection()
        if self._abortTimer is None and not self._finished:
            self._abortTimer = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _closeSocket(self, transport: tcp.Connection, orderly: bool) -> None:
        """
        Close the socket of a side this relay closed (L{close}), its bytes
        flushed: one whose peer was still sending lingers (L{_Lingering})
        after a FIN, instead of a close the kernel would turn into a reset.
        """
        skt = transport.socket
        if orderly and _unread(skt):
            started = self._closeStarted
            deadline = (self.clock.seconds() if started is None else started) + CLOSE_GRACE
            try:
                skt.shutdown(socket.SHUT_WR)
                lingering = _Lingering(skt, self.reactor, self.clock, deadline)
            except OSError:
                # Not connected any more, or not to be watched: closed as
                # before (raising here, Twisted's connectionLost would stop
                # short of the relay, which would never end).
                pass
            else:
                self._lingering += 1
                lingering.closed.addCallback(self._lingered)
                return
        tcp.Connection._closeSocket(transport, orderly)

    def _lingered(self, _: object) -> None:
        self._lingering -= 1
        if self._finished and not self._lingering:
            self.factory.lingering.discard(self)
            if self._done is not None:
                self._done.callback(None)

    def _abort(self) -> None:
        self._abortTimer = None
        for side in self._sides():
            side.transport.abortConnection()

    def _sides(self) -> list[_RelaySide]:
        sides: list[_RelaySide] = [self.client]
        if self.target is not None:
            sides.append(self.target)
        return [side for side in sides if side.transport is not None]

    def pairClosed(self) -> None:
        """
        Both sides closed cleanly at once (L{_RelaySide.endOfStream}): as
        L{sideLost} for each, the first half-close having named the reason.
        """
        self._clientGone = self._targetGone = True
        if self._connector is None:
            self._finish()

    def sideLost(self, side: _RelaySide, reason: Failure) -> None:
        if side is self.client:
            self._clientGone = True
            if self.reason is None:
                self.reason = CLIENT_CLOSED if reason.check(error.ConnectionDone) else CLIENT_RESET
        else:
            self._targetGone = True
            if self.reason is None:
                self.reason = TARGET_CLOSED if reason.check(error.ConnectionDone) else TARGET_RESET
        if self._clientGone and self._targetGone and self._connector is None:
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._connectTimer is not None:
            self._cancelConnectTimer()
        if self.reader is not None or self._headerTimer is not None:
            self._endHeader()
        for timer in (self._idleTimer, self._abortTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idleTimer = self._abortTimer = None
        self.factory.relayEnded(self)
        if self._lingering:
            # A stop must wait for its sockets still (drain).
            self.factory.lingering.add(self)
        if self.admitted:
            # Not refused (those are logged, rate-limited) nor gone before
            # its PROXY header: a connection that was served.
            self._logEnd()
        self._letGo()
        if self._done is not None and not self._lingering:
            self._done.callback(None)

    def _logEnd(self) -> None:
        if self.failureDetail:
            text = _FAILED_FORMAT
        else:
            text = _ENDED_FORMAT if self.connectTime is None else _CONNECTED_FORMAT
        forwardName, targetText = self.labels
        host, port = self.clientHost, self.clientPort
        log.infoEvent(
            text,
            {
                "forward": forwardName,
                # format_address's work is for IPv6 (and IPv4-mapped) hosts.
                "client": format_address(host, port) if ":" in host else f"{host}:{port}",
                "proxiedBy": self.proxiedBy,
                "target": targetText,
                "targetAddress": self.targetAddress,
                "bytesToTarget": self.bytesToTarget,
                "bytesToClient": self.bytesToClient,
                "duration": self.clock.seconds() - self.started,
                "connectTime": self.connectTime,
                "reason": self.reason,
                "detail": self.failureDetail,
            },
        )

    def _letGo(self) -> None:
        """
        Break the reference cycles of an ended relay (each side and its
        relay, each transport and its side's bound C{relayRead}), so that
        reference counting frees the relay, its sides and their transports
        at once. Otherwise every connection's objects waited for Python's
        cyclic garbage collector, whose runs they also set off.
        """
        for side in (getattr(self, "client", None), self.target):
            if side is not None:
                transport: Any = side.transport
                if side.sendsNow:
                    # link() set it (abortConnection() may have replaced
                    # it): deleted without vars(), which turns the
                    # instance's attributes into a dict of their own.
                    try:  # noqa: SIM105 (contextlib.suppress is three more calls)
                        del transport.doRead
                    except AttributeError:
                        pass
                else:
                    vars(transport).pop("doRead", None)
                if self._closeStarted is not None:
                    # close() may have set it.
                    vars(transport).pop("_closeSocket", None)
                del side.relay


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

    def __init__(self, forward: Forward, reactor: Any = None, clock: Any = None) -> None:
        self.forward = forward
        self.reactor = reactor = reactor_or_global(reactor)
        self.clock = clock if clock is not None else reactor
        self.relays: set[Relay] = set()
        # Ended relays whose sockets still linger (L{_Lingering}): out of
        # the bounds, but a drain waits for them.
        self.lingering: set[Relay] = set()
        # maxConnections (the service fills in the default from the file
        # descriptor budget) and maxConnectionsPerIp.
        self.bounds = Bounds(forward.max_connections, forward.max_connections_per_ip)
        self.policy = forward.policy
        self.stats = TCPStats(forward, END_REASONS, CONNECT_FAILURES, policy.REFUSALS)
        self.targetAddress = self._targetAddress(forward)
        self.labels = (forward.name, str(forward.target))
        # Refusals are counted in the stats and logged rate-limited.
        self.refusalLog = RefusalLog(log.warn, self.clock)

    def reconfigure(self, forward: Forward) -> None:
        """New settings for new connections (a reload); live ones keep theirs."""
        self.forward = forward
        self.policy = forward.policy
        self.bounds.per_ip = forward.max_connections_per_ip
        self.targetAddress = self._targetAddress(forward)
        self.labels = (forward.name, str(forward.target))

    def _targetAddress(self, forward: Forward) -> TargetAddress | None:
        """Where new connections go, when an IP target can take the lean path."""
        target = forward.target
        if target.is_hostname or not lean(self.reactor):
            return None
        return TargetAddress(target.host, target.port)

    def buildProtocol(self, addr: IAddress | None) -> RelaySide | None:
        """
        Admit a client, or refuse it before any upstream work: returning
        None makes the listening port close the socket at once.
        """
        return self.acceptFrom(str(getattr(addr, "host", "")), int(getattr(addr, "port", 0)))

    def acceptFrom(self, host: str, port: int) -> RelaySide | None:
        """
        L{buildProtocol} for a client at C{host} and C{port}: what
        L{goma_twisted.connect.RelayPort} calls, without making an address
        object for each connection that only these two are read from.
        """
        relay = Relay(self)
        if relay.expectHeader:
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
        return RelaySide(relay, True)

    def admit(self, relay: Relay, client: IPAddress | None, key: str | None = None) -> str | None:
        """
        Check the client against allow/deny and the bounds; count it if
        admitted (under C{key}, C{str(client)} by default).
        """
        if not self.policy.permits(client):
            return policy.DENIED
        if key is None:
            key = str(client)
        why = self.bounds.admit(client, counted=relay.expectHeader, key=key)
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

    def relayEnded(self, relay: Relay) -> None:
        if relay in self.relays:
            self.relays.discard(relay)
            self.bounds.release(relay.clientIP, admitted=relay.admitted, key=relay.clientKey)
            reason = relay.reason or "unknown"
            self.stats.ended(reason, connect_failed=reason in CONNECT_FAILURES)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Fire once every live relay has ended on its own, closing those still
        open after C{timeout} seconds (all of them at once for 0), and the
        lingering sockets of those already ended have closed.
        """
        if not self.relays and not self.lingering:
            return succeed(None)
        ended: Deferred[Any] = DeferredList(
            [relay.done for relay in (*self.relays, *self.lingering)]
        )
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
