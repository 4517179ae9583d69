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
from twisted.application import internet
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

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


class _Listener:
    """What goma-pt needs of a listening service besides starting it."""

    forward: Forward
    protocol: str
    _port: Any

    # The socket systemd passed for this listener, if any (socket activation).
    passed: PassedSocket | None = None

    @property
    def key(self) -> ListenKey:
        forward = self.forward
        return (self.protocol, forward.address, forward.port, forward.reuse_port)

    def getHost(self) -> Any:
        """The address actually bound (port 0 becomes a real port)."""
        return self._port.getHost()

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[misc]
        except CannotListenError as e:
            raise ListenError(_cannot_listen(self.forward, self.protocol, e)) from None

    def startService(self) -> None:
        try:
            super().startService()  # type: ignore[misc]
        except CannotListenError as e:
            raise ListenError(_cannot_listen(self.forward, self.protocol, e)) from None


class TCPForwardServer(_Listener, internet.TCPServer):
    protocol = "tcp"

    def __init__(
        self, forward: Forward, factory: TCPForwardFactory, relay: RelayChoice, **kwargs: Any
    ) -> None:
        self.forward = forward
        self.factory = factory
        self.relay = relay
        backlog = forward.backlog or system_backlog()
        super().__init__(forward.port, factory, backlog=backlog, **kwargs)

    def update(self, forward: Forward) -> None:
        """New settings for new connections; live ones keep theirs."""
        self.forward = forward
        self.factory.reconfigure(forward)

    def _getPort(self) -> Any:
        port, factory = self.args
        reactor = reactor_or_global(self.reactor)
        interface = self.kwargs.get("interface", "")
        backlog = self.kwargs["backlog"]
        if self.passed is not None:
            fd, family = self.passed.fd, self.passed.family
            if self.relay.adopt is not None:
                return self.relay.adopt(reactor, fd, family, factory)
            return reactor.adoptStreamPort(fd, family, factory)
        if self.forward.reuse_port:
            adopt = self.relay.adopt
            return reuseport.listen_tcp(reactor, port, factory, backlog, interface, adopt)
        if self.relay.listen is not None:
            return self.relay.listen(reactor, port, factory, backlog, interface)
        return super()._getPort()


class UDPForwardServer(_Listener, internet.UDPServer):
    protocol = "udp"

    def __init__(self, forward: Forward, relay: UDPForward, **kwargs: Any) -> None:
        self.forward = forward
        self.relay = relay
        super().__init__(forward.port, relay, maxPacketSize=MAX_DATAGRAM, **kwargs)

    def update(self, forward: Forward) -> None:
        """New settings for new sessions; open ones keep their target."""
        self.forward = forward
        self.relay.reconfigure(forward)

    def _getPort(self) -> Any:
        port, relay = self.args
        if self.passed is not None:
            size = self.kwargs.get("maxPacketSize", MAX_DATAGRAM)
            reactor = reactor_or_global(self.reactor)
            return reactor.adoptDatagramPort(self.passed.fd, self.passed.family, relay, size)
        if not self.forward.reuse_port:
            return super()._getPort()
        return reuseport.listen_udp(
            reactor_or_global(self.reactor),
            port,
            relay,
            self.kwargs.get("interface", ""),
            self.kwargs.get("maxPacketSize", MAX_DATAGRAM),
        )


Listener = Union[TCPForwardServer, UDPForwardServer]


class MetricsServer(internet.StreamServerEndpointService):
    """
    Serves C{/metrics}, C{/healthz} and C{/readyz}; a port it cannot listen
    on is a L{ListenError}.
    """

    port: Any = None

    def __init__(
        self,
        description: str,
        registry: CollectorRegistry,
        reactor: Any,
        readiness: Readiness | None = None,
    ) -> None:
        site = metrics_site(registry, readiness)
        super().__init__(serverFromString(reactor, description), site)
        self.description = description
        self.setName("metrics")

    def privilegedStartService(self) -> None:
        self._raiseSynchronously = True
        try:
            super().privilegedStartService()
            self._waitingForPort.addCallback(self._listening)  # type: ignore[union-attr]
        except (CannotListenError, OverflowError) as e:
            why = e.socketError if isinstance(e, CannotListenError) else e
            why = why.strerror if isinstance(why, OSError) and why.strerror else why
            raise ListenError(f"metrics {self.description}: {why}") from None

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port

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
