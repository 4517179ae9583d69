"""
Knobs for the bulk A/B (ab.py): run in a goma-pt twistd before it starts,
they change goma_twisted.tcp's module settings or wrap its relay, so one
checkout can be measured against itself with other sizes or socket options.

apply("read_size=2097152,splice_after=none,pipe_size=262144,sndbuf=4194304")
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Any

_F_SETPIPE_SZ = 1031
_SOCKOPTS = {
    "sndbuf": (socket.SOL_SOCKET, socket.SO_SNDBUF),
    "rcvbuf": (socket.SOL_SOCKET, socket.SO_RCVBUF),
    "notsent_lowat": (socket.IPPROTO_TCP, 25),  # TCP_NOTSENT_LOWAT
    "nodelay": (socket.IPPROTO_TCP, socket.TCP_NODELAY),
}


def apply(spec: str) -> None:
    """Set each knob of C{spec} ("name=value,..."), before the reactor runs."""
    from goma_twisted.accel import io as tcp

    options = []
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        if name == "read_size":
            tcp.READ_SIZE = int(value)
            # As tcp does at import for its own size: raise glibc's mmap
            # threshold above it, or every CPython recv is an mmap.
            bytes(2 * tcp.READ_SIZE)
        elif name == "splice_after":
            tcp.SPLICE_AFTER = None if value == "none" else int(value)
        elif name == "pipe_size":
            _pipeSize(tcp, int(value))
        elif name == "splice_more":
            _spliceMore(tcp)
        elif name == "rcvlowat_bulk":
            _rcvlowatBulk(tcp, int(value))
        else:
            level, option = _SOCKOPTS[name]
            options.append((level, option, int(value)))
    if options:
        _sockopts(tcp, options)


def _pipeSize(tcp: Any, size: int) -> None:
    """Splice pipes of C{size} bytes: a splice into one then moves at most that."""
    init = tcp.SplicePipe.__init__

    def sized(self: Any) -> None:
        init(self)
        fcntl.fcntl(self.write, _F_SETPIPE_SZ, size)

    tcp.SplicePipe.__init__ = sized


def _spliceMore(tcp: Any) -> None:
    """splice(2) with SPLICE_F_MORE as well (more data is coming)."""
    flags = 7  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE
    raw = tcp.RAW
    if raw is None:

        def splice(src: int, dst: int, count: int) -> int:
            return os.splice(src, dst, count, flags=flags)

        tcp.SPLICE = splice
        return
    call, null, ffi = raw.splice, raw.ffi.NULL, raw.ffi

    def rawSplice(src: int, dst: int, count: int) -> int:
        moved: int = call(src, null, dst, null, count, flags)
        if moved < 0:
            code = ffi.errno
            if code in tcp.AGAIN:
                raise BlockingIOError(code, os.strerror(code))
            raise OSError(code, os.strerror(code))
        return moved

    tcp.SPLICE = rawSplice


def _sockopts(tcp: Any, options: list[tuple[int, int, int]]) -> None:
    """Set C{options} on both sockets of every pair once it is linked."""
    from goma_twisted.accel.relay import FastSide

    accelerate = FastSide.accelerate

    def linkWithOptions(self: Any) -> None:
        accelerate(self)
        skt = getattr(self.transport, "socket", None)
        if skt is not None:
            for level, option, value in options:
                skt.setsockopt(level, option, value)

    FastSide.accelerate = linkWithOptions  # type: ignore[method-assign]


def _rcvlowatBulk(tcp: Any, lowat: int) -> None:
    """
    SO_RCVLOWAT on a side after its first full read: the kernel wakes the
    forwarder for that socket only once C{lowat} bytes wait. An experiment
    only: a sender that pauses with fewer queued would stall.
    """
    from goma_twisted.accel.relay import FastSide

    relayData = FastSide.relayData

    def relayDataLowat(self: Any, data: Any) -> None:
        if len(data) >= tcp.READ_SIZE and not getattr(self, "lowatSet", False):
            self.lowatSet = True
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        relayData(self, data)

    FastSide.relayData = relayDataLowat  # type: ignore[method-assign]
