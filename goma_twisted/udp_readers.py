"""
How a UDP session's socket joins and leaves the reactor: the one place
the UDP relay asks its reactor for more than Twisted's public API.

goma-pt's own reactor offers two optional methods: C{addNewReader(reader,
fd)}, which registers a descriptor just opened without C{addReader}'s
look-ups, and C{closeSocket(reader, socket)}, which closes a socket and
forgets its reader without an C{epoll_ctl} call. They are looked up by
name on the reactor; any other reactor (Twisted's own, a test's) gets
Twisted's public C{addReader} and C{removeReader}, which do the same.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor


class Readers:
    """
    Registers and unregisters session sockets with C{reactor}, through its
    optional fast methods where it has both: L{add}C{(reader, fd)} and
    L{close}C{(reader, socket)}.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        # The reactor's hooks where it has them (called directly: a session
        # makes both calls once), else the public calls below.
        addNewReader: Any = getattr(reactor, "addNewReader", None)
        closeSocket: Any = getattr(reactor, "closeSocket", None)
        self.accelerated = addNewReader is not None and closeSocket is not None
        self.add: Callable[[IReadDescriptor, int], None] = (
            addNewReader if self.accelerated else self._add
        )
        self.close: Callable[[IReadDescriptor, socket.SocketType], None] = (
            closeSocket if self.accelerated else self._close
        )

    def _add(self, reader: IReadDescriptor, fd: int) -> None:
        """Start reading C{reader}, whose socket C{fd} was just opened."""
        self.reactor.addReader(reader)

    def resume(self, reader: IReadDescriptor) -> None:
        """Read C{reader} again after the reactor gave up on it."""
        self.reactor.addReader(reader)

    def _close(self, reader: IReadDescriptor, skt: socket.SocketType) -> None:
        """Stop reading C{reader} and close its socket C{skt}."""
        self.reactor.removeReader(reader)
        skt.close()
