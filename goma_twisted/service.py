"""
The service a twistd plugin or a C{.tac} file runs: one listening service
per forward and protocol, under one L{MultiService}.
"""

from __future__ import annotations

import os
import resource
import socket
from typing import Any

from twisted.application import internet
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .config import Forward, GatewayConfig, format_address
from .policy import Budget, plan_budget
from .tcp import TCPForwardFactory
from .udp import MAX_DATAGRAM, UDPForward

log = Logger(namespace="goma_pt")


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


class PassThroughService(MultiService):
    """
    Forwards every port of a L{GatewayConfig}.

    Compose it into your own application::

        PassThroughService(load_config("goma.yml")).setServiceParent(application)

    @param reactor: listens, accepts and connects; the global one if None.
    @param clock: runs timeouts; the reactor if None (tests pass a Clock).
    """

    def __init__(self, config: GatewayConfig, reactor: Any = None, clock: Any = None) -> None:
        super().__init__()
        self.config = config
        self.listeners: list[TCPForwardServer | UDPForwardServer] = []
        extra = {} if reactor is None else {"reactor": reactor}
        for forward in config.forwards:
            interface = forward.address or default_interface()
            if "tcp" in forward.protocols:
                factory = TCPForwardFactory(forward, reactor, clock)
                self._add(TCPForwardServer(forward, factory, interface=interface, **extra))
            if "udp" in forward.protocols:
                relay = UDPForward(forward, forward.max_sessions or 1, reactor, clock)
                self._add(UDPForwardServer(forward, relay, interface=interface, **extra))

    def _add(self, listener: TCPForwardServer | UDPForwardServer) -> None:
        listener.setName(f"{listener.protocol} {listener.forward.name}")
        listener.setServiceParent(self)
        self.listeners.append(listener)

    def privilegedStartService(self) -> None:
        # Runs as root under twistd --uid/--gid: bind low ports here, and
        # stop what was bound if a later forward cannot listen.
        self._sizeBounds()
        try:
            super().privilegedStartService()
        except ListenError:
            self._unbind()
            raise

    def startService(self) -> None:
        self._sizeBounds()
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

    budget: Budget | None = None

    def _sizeBounds(self) -> None:
        """
        Raise the descriptor limit, then give each forward without a
        configured bound its share of it; log the figures once.
        """
        if self.budget is not None:
            return
        soft_before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = raise_fd_limit()
        tcp = [lst for lst in self.listeners if isinstance(lst, TCPForwardServer)]
        udp = [lst for lst in self.listeners if isinstance(lst, UDPForwardServer)]
        self.budget = budget = plan_budget(
            limit,
            open_fd_count(),
            [lst.forward.max_connections for lst in tcp],
            [lst.forward.max_sessions for lst in udp],
        )
        for listener, (bound, _) in zip(tcp, budget.tcp, strict=True):
            listener.factory.bounds.total = bound
        for udp_listener, (bound, _) in zip(udp, budget.udp, strict=True):
            udp_listener.relay.max_sessions = bound
        shares = [
            f"{lst.forward.name} {bound} connections" + (" (derived)" if derived else "")
            for lst, (bound, derived) in zip(tcp, budget.tcp, strict=True)
        ] + [
            f"{lst.forward.name} {bound} sessions" + (" (derived)" if derived else "")
            for lst, (bound, derived) in zip(udp, budget.udp, strict=True)
        ]
        raised = f" (raised from {soft_before})" if soft_before != limit else ""
        log.info(
            "File descriptors: limit {limit}{raised}, {inUse} open, {reserved} kept aside; "
            "bounds: {shares}",
            limit=limit,
            raised=raised,
            softBefore=soft_before,
            inUse=budget.in_use,
            reserved=budget.reserved,
            shares="; ".join(shares) or "none",
            needed=budget.needed,
        )
        if budget.overcommitted:
            log.warn(
                "The configured bounds need {needed} file descriptors with every connection "
                "and session open, more than the {usable} available: raise the limit "
                "(ulimit -n, systemd LimitNOFILE=) or lower maxConnections/maxSessions",
                needed=budget.needed,
                usable=budget.usable,
            )


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


def open_fd_count() -> int:
    """How many file descriptors the process has open now (0 if it cannot tell)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory))
        except OSError:
            continue
    return 0
