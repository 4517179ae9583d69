"""
The socket options of a relayed TCP connection's two sockets: no Nagle
delay, and keepalive probes with Go's figures (what Goma Gateway's
runtime sets), so that a peer gone without a FIN is found.
"""

from __future__ import annotations

import fcntl
import socket
import sys
import termios
from typing import Any

# Go's net package: the first probe after 15 s idle, then every 15 s; Linux
# gives up after 9 unanswered probes.
KEEPALIVE_SECONDS = 15.0
KEEPALIVE_PROBES = 9

SocketOption = tuple[int, int, int]


def keepalive_options(seconds: float | None) -> list[SocketOption]:
    """
    The options that turn keepalive on with C{seconds} of idle time before
    the first probe and between probes (those this platform has), or off
    for None.
    """
    if seconds is None:
        return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]
    return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), *keepalive_timing(seconds)]


def keepalive_timing(seconds: float | None) -> list[SocketOption]:
    """When keepalive probes go (those of the options this platform has)."""
    if seconds is None:
        return []
    whole = max(1, round(seconds))
    options = []
    for name, value in (
        ("TCP_KEEPIDLE", whole),
        ("TCP_KEEPINTVL", whole),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    return options


def relay_options(keepalive: float | None) -> list[SocketOption]:
    """Every option a relayed socket gets."""
    return [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), *keepalive_options(keepalive)]


def apply_options(skt: Any, options: list[SocketOption]) -> None:
    """Set C{options} on C{skt}."""
    for level, option, value in options:
        skt.setsockopt(level, option, value)


def system_backlog(path: str = "/proc/sys/net/core/somaxconn", fallback: int = 4096) -> int:
    """The system's cap on a listen backlog (C{net.core.somaxconn}), or C{fallback}."""
    try:
        with open(path) as f:
            return max(1, int(f.read().strip()))
    except (OSError, ValueError):
        return fallback


def unread(skt: Any) -> int:
    """How many received bytes wait in C{skt} (0 if it cannot say)."""
    try:
        count = fcntl.ioctl(skt.fileno(), termios.FIONREAD, bytes(4))
    except (OSError, ValueError):  # ValueError: closed (no descriptor)
        return 0
    return int.from_bytes(count, sys.byteorder)
