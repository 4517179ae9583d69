"""
goma-pt's listening port for the accelerated relay.

Replaces: Twisted's accept loop (a generator, a log-buffering context, and
C{socket.accept}'s enum conversions per connection) and the address object
C{buildProtocol} gets, with a loop on C{_accept} that builds
L{RelayConnection}s; the relay's socket options are set once on the
listening socket, for accepted sockets to inherit. Buys: part of the sixth
of the CPU per new connection that L{goma_twisted.accel.transports} saves.
At the descriptor limit it pauses accepting, as nginx does, rather than
spinning on a listener that stays readable.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python import log as legacy_log

from ..policy import NO_DESCRIPTORS
from ..sockopts import apply_options
from .transports import _LEAN_ACCEPT, RelayConnection, _Socket

log = Logger(namespace="goma_pt.tcp")

# accept()'s errors that mean the process or system is out of a resource:
# accepting pauses for ACCEPT_PAUSE seconds (nginx waits 500 ms too).
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
ACCEPT_PAUSE = 0.5


def accept_from(factory: Any) -> Callable[[str, int], Any] | None:
    """
    The factory's C{acceptFrom(host, port)}, its C{buildProtocol} without
    an address object, where that is what its C{buildProtocol} does: not
    when a subclass overrides C{buildProtocol} alone.
    """
    acceptFrom = getattr(factory, "acceptFrom", None)
    for klass in type(factory).__mro__:
        if "buildProtocol" in vars(klass):
            return acceptFrom if "acceptFrom" in vars(klass) else None
    return None


class RelayPort(tcp.Port):
    """Twisted's listening port, building L{RelayConnection}s."""

    transport = RelayConnection
    # The listening socket's family, type and protocol, as numbers.
    _numbers: tuple[int, int, int] | None = None
    _acceptFrom: Callable[[str, int], Any] | None = None
    _paused: Any = None

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = super().createInternetSocket()
        apply_options(skt, self._options())
        return skt

    def startListening(self) -> None:
        skt = self._preexistingSocket
        if skt is not None:
            apply_options(skt, self._options())
        super().startListening()
        if _LEAN_ACCEPT:
            skt = self.socket
            self._numbers = (int(skt.family), int(skt.type), skt.proto)
        self._acceptFrom = accept_from(self.factory)

    def _options(self) -> Any:
        return getattr(self.factory, "socketOptions", [])

    def doRead(self) -> None:
        """Accept what waits, up to C{numberAccepts}, scaling it as Twisted does."""
        numbers = self._numbers
        if numbers is None:
            super().doRead()
            return
        family, kind, proto = numbers
        accept = self.socket._accept  # type: ignore[union-attr]
        factory: Any = self.factory
        acceptFrom = self._acceptFrom
        limit = self.numberAccepts
        accepted = 0
        try:
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _EXHAUSTED:
                        self._pause(e)
                        break
                    if e.errno in (errno.ECONNABORTED, errno.EPERM, errno.EINTR):
                        continue
                    raise
                accepted += 1
                skt = _Socket(family, kind, proto, fd)
                if len(addr) == 4:
                    # IPv6: with the zone, as Twisted's loop does.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                if acceptFrom is not None:
                    protocol = acceptFrom(addr[0], addr[1])
                else:
                    protocol = factory.buildProtocol(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                number = self.sessionno
                self.sessionno = number + 1
                protocol.makeConnection(
                    self.transport(skt, protocol, addr, self, number, self.reactor)
                )
        except BaseException:
            legacy_log.deferr()
        if accepted == limit:
            self.numberAccepts = limit + 20
        else:
            self.numberAccepts = max(1, accepted)

    def _pause(self, why: OSError) -> None:
        """Stop accepting for L{ACCEPT_PAUSE} seconds; say so at a bounded rate."""
        if self._paused is not None and self._paused.active():
            return
        self.stopReading()
        reactor: Any = self.reactor
        self._paused = reactor.callLater(ACCEPT_PAUSE, self._resume)
        refused = getattr(self.factory, "refused", None)
        if refused is not None:
            code = errno.errorcode.get(why.errno or 0, str(why))
            refused("new clients", NO_DESCRIPTORS, f"{code}; accepting paused")

    def _resume(self) -> None:
        self._paused = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def connectionLost(self, reason: Any) -> None:
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        super().connectionLost(reason)


def listen_tcp(
    reactor: Any, port: int, factory: Any, backlog: int, interface: str = ""
) -> RelayPort:
    """Like C{reactor.listenTCP}, with a L{RelayPort}."""
    listening = RelayPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adopt_tcp_port(reactor: Any, fd: int, family: int, factory: Any) -> RelayPort:
    """Like C{reactor.adoptStreamPort}, with a L{RelayPort}."""
    listening = RelayPort._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening
