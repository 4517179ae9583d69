"""
The service a twistd plugin or a C{.tac} file runs: one listening service
per forward and protocol, under one L{MultiService}.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from twisted.application import internet
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from ._reactor import reactor_or_global
from .config import Forward, GatewayConfig, format_address
from .metrics import ForwardCollector, metrics_site
from .stats import TCPStats, UDPStats
from .tcp import TCPForwardFactory
from .udp import MAX_DATAGRAM, UDPForward

log = Logger(namespace="goma_pt")

# File descriptors kept aside for the process itself (logs, DNS, listeners).
RESERVED_FDS = 64


class ListenError(Exception):
    """
    A forward cannot start listening. The message leads with the address
    and the reason, as twistd shows only its first 100 bytes when a daemon
    fails to start.
    """


class _Listener:
    """What goma-pt needs of a listening service besides starting it."""

    forward: Forward
    protocol: str
    _port: Any

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

    def __init__(self, forward: Forward, factory: TCPForwardFactory, **kwargs: Any) -> None:
        self.forward = forward
        self.factory = factory
        super().__init__(forward.port, factory, **kwargs)


class UDPForwardServer(_Listener, internet.UDPServer):
    protocol = "udp"

    def __init__(self, forward: Forward, relay: UDPForward, **kwargs: Any) -> None:
        self.forward = forward
        self.relay = relay
        super().__init__(forward.port, relay, maxPacketSize=MAX_DATAGRAM, **kwargs)


class MetricsServer(internet.StreamServerEndpointService):
    """Serves C{/metrics}; a port it cannot listen on is a L{ListenError}."""

    port: Any = None

    def __init__(self, description: str, registry: CollectorRegistry, reactor: Any) -> None:
        super().__init__(serverFromString(reactor, description), metrics_site(registry))
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


class PassThroughService(MultiService):
    """
    Forwards every port of a L{GatewayConfig}.

    Compose it into your own application::

        PassThroughService(load_config("goma.yml")).setServiceParent(application)

    @param reactor: listens, accepts and connects; the global one if None.
    @param clock: runs timeouts; the reactor if None (tests pass a Clock).
    @param metrics: a server endpoint string (C{tcp:9108:interface=127.0.0.1})
        where to serve C{/metrics}; none if None. The metrics are in
        C{registry} either way, to serve from a site of your own.
    """

    metrics: MetricsServer | None = None

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any = None,
        clock: Any = None,
        metrics: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.listeners: list[TCPForwardServer | UDPForwardServer] = []
        self.registry = CollectorRegistry()
        self.registry.register(ForwardCollector(self.stats))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        extra = {} if reactor is None else {"reactor": reactor}
        for forward in config.forwards:
            interface = forward.address or default_interface()
            if "tcp" in forward.protocols:
                factory = TCPForwardFactory(forward, reactor, clock)
                self._add(TCPForwardServer(forward, factory, interface=interface, **extra))
            if "udp" in forward.protocols:
                relay = UDPForward(forward, forward.max_sessions or 1, reactor, clock)
                self._add(UDPForwardServer(forward, relay, interface=interface, **extra))
        if metrics is not None:
            # Last, so a forward that cannot listen stops the start first.
            self.metrics = MetricsServer(metrics, self.registry, reactor_or_global(reactor))
            self.metrics.setServiceParent(self)

    def stats(self) -> Iterator[TCPStats | UDPStats]:
        """The counters of every forward now listening, for the metrics."""
        for listener in self.listeners:
            if isinstance(listener, TCPForwardServer):
                yield listener.factory.stats
            else:
                listener.relay.stats.max_sessions = listener.relay.max_sessions
                yield listener.relay.stats

    def _add(self, listener: TCPForwardServer | UDPForwardServer) -> None:
        listener.setName(f"{listener.protocol} {listener.forward.name}")
        listener.setServiceParent(self)
        self.listeners.append(listener)

    def privilegedStartService(self) -> None:
        # Runs as root under twistd --uid/--gid: bind low ports here, and
        # stop what was bound if a later forward cannot listen.
        self._sizeSessionTables()
        try:
            super().privilegedStartService()
        except ListenError:
            self._unbind()
            raise

    def startService(self) -> None:
        self._sizeSessionTables()
        try:
            super().startService()
        except ListenError:
            self.running = False
            self._unbind()
            raise
        if self.config.ignored:
            log.info(
                "Not acting on {ignored} of {source}: goma-pt forwards passThrough only",
                ignored=", ".join(self.config.ignored),
                source=self.config.source,
            )
        for listener in self.listeners:
            host = listener.getHost()
            log.info(
                "Forwarding {protocol} {listen} to {target}",
                protocol=listener.protocol,
                listen=format_address(host.host, host.port),
                target=str(listener.forward.target),
                forward=listener.forward.name,
            )
        if self.metrics is not None:
            host = self.metrics.getHost()
            if hasattr(host, "port"):
                where = f"http://{format_address(host.host, host.port)}/metrics"
            else:
                where = f"{self.metrics.description}, path /metrics"
            log.info("Serving metrics at {where}", where=where)
        log.info("goma-pt ready: {count} listeners", count=len(self.listeners))

    def stopService(self) -> Deferred[Any]:
        """Close the listeners first, then the live connections and sessions."""
        stopped = super().stopService()
        closing = [
            listener.factory.closeAll()
            for listener in self.listeners
            if isinstance(listener, TCPForwardServer)
        ]
        return gatherResults([stopped, *closing])

    def _unbind(self) -> None:
        for listener in self.listeners:
            if getattr(listener, "_port", None) is not None:
                listener._port.stopListening()
                listener._port = None

    def _sizeSessionTables(self) -> None:
        relays = [
            listener.relay for listener in self.listeners if isinstance(listener, UDPForwardServer)
        ]
        if not relays:
            return
        bound = default_max_sessions(raise_fd_limit(), len(relays))
        for relay in relays:
            relay.max_sessions = relay.config.max_sessions or bound


def _cannot_listen(forward: Forward, protocol: str, e: CannotListenError) -> str:
    where = format_address(e.interface or "*", e.port)
    why = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
    hint = ""
    if isinstance(e.socketError, OSError) and e.socketError.errno == 13 and forward.port < 1024:
        hint = " (ports below 1024 need root; run as root with --uid/--gid to drop privileges)"
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


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_sessions(fd_limit: int, udp_forwards: int) -> int:
    """
    The session bound of each UDP forward when the config gives none: half
    of the process's descriptors, shared by its UDP forwards, the other half
    left to TCP connections (two descriptors each).
    """
    usable = max(fd_limit - RESERVED_FDS, 32)
    return max(16, min(65536, usable // 2 // max(udp_forwards, 1)))
