"""
Listening sockets with C{SO_REUSEPORT}, made by hand and adopted by the
reactor (Twisted's C{listenTCP}/C{listenUDP} cannot set the option), so
that several goma-pt processes can listen on one port and the kernel
spreads new connections and UDP clients across them.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import CannotListenError

# Twisted's listenTCP backlog.
BACKLOG = 50


def _bound_socket(kind: int, interface: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    skt = socket.socket(family, kind)
    try:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        skt.bind((interface, port))
        if kind == socket.SOCK_STREAM:
            # Before listen(), so every accepted socket inherits them.
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            skt.listen(BACKLOG)
        skt.setblocking(False)
    except OSError as e:
        skt.close()
        raise CannotListenError(interface, port, e) from e
    return skt


def listen_tcp(
    reactor: Any, port: int, factory: Any, interface: str = "", adopt: Any = None
) -> Any:
    """
    Like C{reactor.listenTCP}, on a C{SO_REUSEPORT} socket.

    @param adopt: makes the listening port of the socket's descriptor, like
        (and by default) C{reactor.adoptStreamPort}.
    """
    skt = _bound_socket(socket.SOCK_STREAM, interface, port)
    try:
        if adopt is not None:
            return adopt(reactor, skt.fileno(), skt.family, factory)
        return reactor.adoptStreamPort(skt.fileno(), skt.family, factory)
    finally:
        skt.close()  # the port has a duplicate of the descriptor


def listen_udp(
    reactor: Any, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
) -> Any:
    """Like C{reactor.listenUDP}, on a C{SO_REUSEPORT} socket."""
    skt = _bound_socket(socket.SOCK_DGRAM, interface, port)
    try:
        return reactor.adoptDatagramPort(skt.fileno(), skt.family, protocol, maxPacketSize)
    finally:
        skt.close()
