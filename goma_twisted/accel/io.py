"""
Reading and writing a relay's sockets past Twisted's buffering.

Replaces: Twisted's C{write} (which only queues: the bytes go out a reactor
turn later, after an C{epoll_ctl} pair) by a C{send} at once when nothing
is queued; on PyPy, C{recv}/C{send} by libc's through cffi into one shared
buffer; and, for bulk streams on PyPy, copying by C{splice(2)} through a
pipe. Buys: CPU per GB in iperf3 bulk about 0.5x on PyPy (see
docs/benchmarks.md). Leans on Twisted's private transport fields, listed in
L{PRIVATE_FIELDS} and checked once by L{goma_twisted.accel.unavailable}.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import socket
from typing import Any

from twisted.internet import error
from twisted.python.failure import Failure

from ..policy import SPLICE_PIPES

# How much one read takes from a socket; also the transport's write buffer
# mark above which the peer's reading pauses.
READ_SIZE = 1024 * 1024

# Twisted's TCP transport fields the accelerated relay reads or sets.
PRIVATE_FIELDS = (
    "dataBuffer", "disconnecting", "_writeDisconnecting", "_writeDisconnected", "_aborting",
    "connected", "_tempDataLen", "producer", "streamingProducer", "disconnected", "bufferSize",
)  # fmt: skip


class RawIO:
    """
    libc's recv and send through cffi, on one buffer of raw memory that
    every relay of the process reads into (one reactor thread: what was read
    is sent, or copied, before the next read). For PyPy, whose socket recv
    fills a fresh buffer on every call.
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
        self.splice = getattr(lib, "splice", None)
        self.buffer = ffi.new("char[]", READ_SIZE)
        # What relayData gets: a view of the first bytes of the buffer.
        self.view = memoryview(ffi.buffer(self.buffer, READ_SIZE))


def _loadRawIO() -> RawIO | None:
    try:
        return RawIO()
    except Exception:
        return None


RAW: RawIO | None = None
if platform.python_implementation() == "PyPy":
    RAW = _loadRawIO()
    if RAW is None:
        READ_SIZE = 64 * 1024
else:
    # CPython's recv(READ_SIZE) allocates READ_SIZE bytes: above glibc's
    # mmap threshold that is an mmap and munmap per read. Freeing one larger
    # block raises the threshold for good.
    bytes(2 * READ_SIZE)

# The errors of a raw send or recv that only mean "not now".
AGAIN = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))
# A raw send to a peer that is gone fails with EPIPE, without SIGPIPE.
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _sendView(skt: socket.socket, data: bytes | memoryview) -> int:
    """C{skt.send(data)} for a view of the raw buffer (see L{RawIO})."""
    raw = RAW
    if raw is None:
        return skt.send(data)
    sent: int = raw.send(skt.fileno(), raw.ffi.from_buffer(data), len(data), _MSG_NOSIGNAL)
    if sent < 0:
        code = raw.ffi.errno
        if code in AGAIN:
            raise BlockingIOError(code, os.strerror(code))
        raise OSError(code, os.strerror(code))
    return sent


def _loadSplice() -> Any:
    """C{splice(src, dst, count)} raising as C{os.splice} does; None where there is none."""
    flags = 3  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
    if hasattr(os, "splice"):

        def splice(src: int, dst: int, count: int) -> int:
            return os.splice(src, dst, count, flags=flags)

        return splice
    raw = RAW
    if raw is None or raw.splice is None or not hasattr(os, "pipe2"):
        return None
    call, null, ffi = raw.splice, raw.ffi.NULL, raw.ffi

    def rawSplice(src: int, dst: int, count: int) -> int:
        moved: int = call(src, null, dst, null, count, flags)
        if moved < 0:
            code = ffi.errno
            if code in AGAIN:
                raise BlockingIOError(code, os.strerror(code))
            raise OSError(code, os.strerror(code))
        return moved

    return rawSplice


SPLICE = _loadSplice()

# After a read of how many bytes a side moves its direction to splice(2);
# None: never. A full read marks a bulk stream. On where PyPy's raw I/O
# runs (CPython's readers paid more for pages passed on than it saved).
# Tests set 0: sides splice from their first read.
SPLICE_AFTER: int | None = READ_SIZE if RAW is not None else None


def splices() -> bool:
    """Whether relays here may splice, and so open pipes (L{SplicePipe})."""
    return SPLICE_AFTER is not None and SPLICE is not None


# fcntl's F_SETPIPE_SZ (Linux).
_F_SETPIPE_SZ = 1031


class SplicePipe:
    """
    The pipe one direction of a pair passes through once it splices: bytes
    go from the socket into the pipe and on to the peer's socket as
    references to the same pages, never copied into user memory.

    C{held} counts what the pipe holds for the peer: the side does not read
    while it holds any.
    """

    held = 0
    # The pipes open in the process: at most MAX_PIPES, whose descriptors
    # policy.RESERVED_FDS keeps aside so that accept() never fails for them.
    live = 0
    MAX_PIPES = SPLICE_PIPES

    def __init__(self) -> None:
        if SplicePipe.live >= self.MAX_PIPES:
            raise OSError(errno.EMFILE, "splice pipes all in use")
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        SplicePipe.live += 1
        # A whole read at once; a user past pipe-user-pages-soft gets
        # EPERM: the default size then.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.write, _F_SETPIPE_SZ, READ_SIZE)

    def close(self) -> None:
        SplicePipe.live -= 1
        os.close(self.read)
        os.close(self.write)

    def readOut(self, count: int) -> bytes:
        """Take C{count} bytes out of the pipe into memory."""
        chunks = []
        while count:
            chunk = os.read(self.read, count)
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)


# The reason a relay gives its transports when it closes them: as the
# reactor does, one Failure for all (its class tree worked out once).
CLOSED = Failure(error.ConnectionDone())
CLOSED.check(error.ConnectionDone)


def writable(transport: Any) -> bool:
    """Whether a transport is open for writing with nothing queued."""
    return not (
        transport._tempDataLen
        or transport.dataBuffer
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport._aborting
        or not transport.connected
    )


def send_now(transport: Any, data: bytes | memoryview) -> bool:
    """
    Write C{data} to a Twisted TCP transport, sending at once what the
    socket takes when nothing is queued ahead of it; only the unsent tail
    goes to C{write}, so the stream keeps its order and Twisted's buffering
    and producer pausing stay in charge of the rest.

    Any error other than a full socket is left to Twisted: the data goes
    to C{write}, whose next send ends the connection as usual. It returns
    True then: C{send} took the socket's pending error (a reset), so the
    caller must remember it (see L{FastSide.sendFailed}).
    """
    if not writable(transport):
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
        # bytes(): a view of the shared read buffer must be copied first.
        transport.write(bytes(data[sent:]))
    return False


def close_transport(transport: Any) -> None:
    """
    Close a transport that is done both ways, leaving it as Twisted's
    C{connectionLost} does (without calling the protocol). goma-pt's
    reactor closes the socket without an C{epoll_ctl}.
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
