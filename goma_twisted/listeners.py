"""
The listening services of a L{goma_twisted.service.PassThroughService}: one
per forward and protocol (L{TCPForwardServer}, L{UDPForwardServer}), on a
socket of their own, shared (C{reusePort}) or passed by systemd; and the
metrics server.
"""

from __future__ import annotations

import socket
from typing import Any, Union

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import reuseport
from ._reactor import reactor_or_global
from .activation import PassedSocket
from .config import Forward, format_address
from .metrics import Readiness, metrics_site
from .relaychoice import RelayChoice
from .sockopts import system_backlog
from .tcpfactory import TCPForwardFactory
from .udp import MAX_DATAGRAM, UDPForward

log = Logger(namespace="goma_pt")


class ListenError(Exception):
    """
    A forward cannot start listening. The message leads with the address
    and the reason, as twistd shows only its first 100 bytes when a daemon
    fails to start.
    """


ListenKey = tuple[str, str, int, bool]
"""
What a listener is known by across reloads: protocol, address, port, and
whether it shares the port (C{reusePort}, which needs a new socket).
"""


class _Listener(Service):
    """
    A forward's listening service for one protocol: it listens when started
    (at the privileged start under twistd, so before C{--uid} drops
    privileges), and stops listening when stopped. A port it cannot listen
    on is a L{ListenError}.
    """

    forward: Forward
    protocol: str
    # The listening port while it listens.
    port: Any = None
    # The socket systemd passed for this listener, if any (socket activation).
    passed: PassedSocket | None = None

    def __init__(self, forward: Forward, reactor: Any = None, interface: str = "") -> None:
        self.forward = forward
        self.reactor = reactor
        self.interface = interface

    @property
    def key(self) -> ListenKey:
        forward = self.forward
        return (self.protocol, forward.address, forward.port, forward.reuse_port)

    def getHost(self) -> Any:
        """The address actually bound (port 0 becomes a real port)."""
        return self.port.getHost()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        return succeed(None) if port is None else maybeDeferred(port.stopListening)

    def _listen(self) -> None:
        try:
            self.port = self.listen(reactor_or_global(self.reactor))
        except CannotListenError as e:
            raise ListenError(_cannot_listen(self.forward, self.protocol, e)) from None

    def listen(self, reactor: Any) -> Any:
        """Start listening; the listening port."""
        raise NotImplementedError


class TCPForwardServer(_Listener):
    protocol = "tcp"

    def __init__(
        self,
        forward: Forward,
        factory: TCPForwardFactory,
        relay: RelayChoice,
        reactor: Any = None,
        interface: str = "",
    ) -> None:
        super().__init__(forward, reactor, interface)
        self.factory = factory
        self.relay = relay
        self.backlog = forward.backlog or system_backlog()

    def update(self, forward: Forward) -> None:
        """New settings for new connections; live ones keep theirs."""
        self.forward = forward
        self.factory.reconfigure(forward)

    def listen(self, reactor: Any) -> Any:
        factory, relay = self.factory, self.relay
        if self.passed is not None:
            fd, family = self.passed.fd, self.passed.family
            if relay.adopt is not None:
                return relay.adopt(reactor, fd, family, factory)
            return reactor.adoptStreamPort(fd, family, factory)
        port, backlog, interface = self.forward.port, self.backlog, self.interface
        if self.forward.reuse_port:
            return reuseport.listen_tcp(reactor, port, factory, backlog, interface, relay.adopt)
        if relay.listen is not None:
            return relay.listen(reactor, port, factory, backlog, interface)
        return reactor.listenTCP(port, factory, backlog, interface)


class UDPForwardServer(_Listener):
    protocol = "udp"

    def __init__(
        self, forward: Forward, relay: UDPForward, reactor: Any = None, interface: str = ""
    ) -> None:
        super().__init__(forward, reactor, interface)
        self.relay = relay

    def update(self, forward: Forward) -> None:
        """New settings for new sessions; open ones keep their target."""
        self.forward = forward
        self.relay.reconfigure(forward)

    def listen(self, reactor: Any) -> Any:
        if self.passed is not None:
            fd, family = self.passed.fd, self.passed.family
            return reactor.adoptDatagramPort(fd, family, self.relay, MAX_DATAGRAM)
        port, interface = self.forward.port, self.interface
        if self.forward.reuse_port:
            return reuseport.listen_udp(reactor, port, self.relay, interface, MAX_DATAGRAM)
        return reactor.listenUDP(port, self.relay, interface, MAX_DATAGRAM)


Listener = Union[TCPForwardServer, UDPForwardServer]


class MetricsServer(Service):
    """
    Serves C{/metrics}, C{/healthz} and C{/readyz} on a server endpoint; a
    port it cannot listen on is a L{ListenError}.
    """

    port: Any = None

    def __init__(
        self,
        description: str,
        registry: CollectorRegistry,
        reactor: Any,
        readiness: Readiness | None = None,
    ) -> None:
        self.endpoint = serverFromString(reactor, description)
        self.site = metrics_site(registry, readiness)
        self.description = description
        self.setName("metrics")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        # A TCP endpoint listens at once: its Deferred has fired either way.
        outcome: list[Any] = []
        try:
            self.endpoint.listen(self.site).addBoth(outcome.append)
        except OverflowError as overflow:  # a port out of range
            outcome.append(Failure(overflow))
        [result] = outcome or [Failure(CannotListenError("", 0, "not listening yet"))]
        if isinstance(result, Failure):
            error = result.value
            why = error.socketError if isinstance(error, CannotListenError) else error
            why = why.strerror if isinstance(why, OSError) and why.strerror else why
            raise ListenError(f"metrics {self.description}: {why}") from None
        self.port = result

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        return succeed(None) if port is None else maybeDeferred(port.stopListening)

    def getHost(self) -> Any:
        """The address actually bound (port 0 becomes a real port)."""
        return self.port.getHost()


def service_name(listener: Listener) -> str:
    # Unique as the key is: a reload that turns reusePort on or off starts
    # the new listener before the old one leaves the MultiService.
    shared = " reusePort" if listener.forward.reuse_port else ""
    return f"{listener.protocol} {listener.forward.name}{shared}"


def listener_keys(forward: Forward) -> list[ListenKey]:
    return [
        (protocol, forward.address, forward.port, forward.reuse_port)
        for protocol in forward.protocols
    ]


def where(listener: Listener) -> str:
    """A listener as C{/readyz} names it: C{tcp 53}, C{udp 127.0.0.1:5353}."""
    forward = listener.forward
    where = format_address(forward.address, forward.port) if forward.address else forward.port
    return f"{listener.protocol} {where}"


def announce(listener: Listener) -> None:
    host = listener.getHost()
    log.info(
        "Forwarding {protocol} {listen} to {target}{passed}",
        protocol=listener.protocol,
        listen=format_address(host.host, host.port),
        target=str(listener.forward.target),
        forward=listener.forward.name,
        passed="" if listener.passed is None else " (a socket passed by systemd)",
    )


def _cannot_listen(forward: Forward, protocol: str, e: CannotListenError) -> str:
    where = format_address(e.interface or "*", e.port)
    why = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
    hint = ""
    if isinstance(e.socketError, OSError) and e.socketError.errno == 13 and forward.port < 1024:
        hint = (
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            "start as root with --uid/--gid to drop privileges after binding)"
        )
    return f"{protocol} {where}: {why}{hint}; forward to {forward.target}"


def default_interface() -> str:
    """
    Listen on every address, as Goma Gateway does: C{::} where the host has
    IPv6 (which also takes IPv4 unless net.ipv6.bindv6only is set), else
    every IPv4 address.
    """
    if not socket.has_ipv6:
        return ""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
    except OSError:
        return ""
    return "::"
