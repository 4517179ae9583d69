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

from .sockopts import SocketOption, apply_options


def _bound_socket(
    kind: int,
    interface: str,
    port: int,
    backlog: int = 0,
    options: list[SocketOption] = [],  # noqa: B006 (never changed)
) -> socket.socket:
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    skt = socket.socket(family, kind)
    try:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        skt.bind((interface, port))
        if kind == socket.SOCK_STREAM:
            # Before listen(), so every accepted socket inherits them.
            apply_options(skt, options)
            skt.listen(backlog)
        skt.setblocking(False)
    except OSError as e:
        skt.close()
        raise CannotListenError(interface, port, e) from e
    return skt


def listen_tcp(
    reactor: Any, port: int, factory: Any, backlog: int, interface: str = "", adopt: Any = None
) -> Any:
    """
    Like C{reactor.listenTCP}, on a C{SO_REUSEPORT} socket, with the
    factory's C{socketOptions} for accepted sockets to inherit.

    @param adopt: makes the listening port of the socket's descriptor, like
        (and by default) C{reactor.adoptStreamPort}.
    """
    options = getattr(factory, "socketOptions", [])
    skt = _bound_socket(socket.SOCK_STREAM, interface, port, backlog, options)
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
