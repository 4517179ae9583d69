"""
The service a twistd plugin or a C{.tac} file runs: one listening service
per forward and protocol, under one L{MultiService}.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from collections.abc import Iterator
from enum import Enum
from typing import Any, Union

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from twisted.application import internet
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from . import reuseport
from ._reactor import reactor_or_global
from .activation import Activation, PassedSocket
from .config import ConfigError, Forward, GatewayConfig, format_address, load_config
from .metrics import ForwardCollector, Readiness, metrics_site
from .policy import Budget, plan_budget, reserved_fds
from .relaychoice import RelayChoice, choose_relay
from .sockopts import system_backlog
from .stats import TCPStats, UDPStats
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
        backlog = getattr(forward, "backlog", None) or system_backlog()
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

DEFAULT_DRAIN_TIMEOUT = 5.0


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


class Phase(Enum):
    """Where a L{PassThroughService} is in its life; C{/readyz} reports it."""

    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


class PassThroughService(MultiService):
    """
    Forwards every port of a L{GatewayConfig}.

    Compose it into your own application::

        PassThroughService(load_config("goma.yml")).setServiceParent(application)

    @param reactor: listens, accepts and connects; the global one if None.
    @param clock: runs timeouts; the reactor if None (tests pass a Clock).
    @param drain_timeout: at a stop, and for forwards a reload removes,
        how long live TCP connections may go on before they are closed.
    @param reload_signal: a signal (e.g. C{signal.SIGHUP}) on which to
        re-read the config file while running; none if None.
    @param metrics: a server endpoint string (C{tcp:9108:interface=127.0.0.1})
        where to serve C{/metrics}, C{/healthz} and C{/readyz}; none if
        None. The metrics are in C{registry} and the readiness is
        L{readiness} either way, to serve from a site of your own.
    @param relay: the TCP relay: C{"auto"} (accelerated where it was tested,
        else plain), C{"plain"}, C{"accelerated"} (L{RelayUnavailableError}
        where it cannot run), a L{RelayChoice} already made, or None:
        C{$GOMA_PT_RELAY}, else auto.
    @param activation: the listening sockets systemd passed (socket
        activation: L{Activation.fromEnvironment}); a listener takes the one
        of its protocol, port and address instead of binding its own.
    """

    metrics: MetricsServer | None = None
    phase = Phase.STARTING

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any = None,
        clock: Any = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        reload_signal: int | None = None,
        metrics: str | None = None,
        relay: str | RelayChoice | None = None,
        activation: Activation | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation if activation is not None else Activation([])
        if not isinstance(relay, RelayChoice):
            relay = choose_relay(relay, reactor_or_global(reactor))
        self.relay = relay
        self.config = config
        self.drain_timeout = drain_timeout
        self.reload_signal = reload_signal
        self._reactor = reactor
        self._clock = clock
        self._listeners: dict[ListenKey, Listener] = {}
        self._draining: set[Deferred[None]] = set()
        self.registry = CollectorRegistry()
        self.registry.register(ForwardCollector(self.stats))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        for forward in config.forwards:
            for listener in self._build(forward):
                self._adopt(listener)
        if metrics is not None:
            # Last, so a forward that cannot listen stops the start first.
            self.metrics = MetricsServer(
                metrics, self.registry, reactor_or_global(reactor), self.readiness
            )
            self.metrics.setServiceParent(self)

    def stats(self) -> Iterator[TCPStats | UDPStats]:
        """The counters of every forward now listening, for the metrics."""
        for listener in self.listeners:
            if isinstance(listener, TCPForwardServer):
                total = listener.factory.bounds.total
                listener.factory.stats.max_connections = total or 0
                yield listener.factory.stats
            else:
                listener.relay.stats.max_sessions = listener.relay.max_sessions
                yield listener.relay.stats

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners.values())

    def _build(self, forward: Forward) -> list[Listener]:
        interface = forward.address or default_interface()
        extra = {} if self._reactor is None else {"reactor": self._reactor}
        built: list[Listener] = []
        if "tcp" in forward.protocols:
            factory = self.relay.factoryClass(forward, self._reactor, self._clock)
            server = TCPForwardServer(forward, factory, self.relay, interface=interface, **extra)
            built.append(server)
        if "udp" in forward.protocols:
            relay = UDPForward(forward, forward.max_sessions or 1, self._reactor, self._clock)
            built.append(UDPForwardServer(forward, relay, interface=interface, **extra))
        for listener in built:
            listener.passed = self.activation.find(
                listener.protocol, forward.address, forward.port
            )
        return built

    def _adopt(self, listener: Listener) -> None:
        listener.setName(_service_name(listener))
        listener.setServiceParent(self)
        self._listeners[listener.key] = listener

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
                "{source}: goma-pt acts on gateway.entryPoints.passThrough only; "
                "left to Goma Gateway: {ignored}",
                ignored=", ".join(self.config.ignored),
                source=self.config.source,
            )
        log.info("Relay: {relay}", relay=self.relay.describe(), kind=self.relay.kind.value)
        wanted = [(lst.protocol, lst.forward.address, lst.forward.port) for lst in self.listeners]
        for passed in self.activation.unmatched(wanted):
            log.warn("systemd passed a socket no forward listens on: {socket}", socket=str(passed))
        for listener in self.listeners:
            _announce(listener)
        if self.metrics is not None:
            host = self.metrics.getHost()
            if hasattr(host, "port"):
                where = f"http://{format_address(host.host, host.port)}/metrics"
            else:
                where = f"{self.metrics.description}, path /metrics"
            log.info("Serving metrics at {where}", where=where)
        self.phase = Phase.SERVING
        log.info("goma-pt ready: {count} listeners", count=len(self._listeners))
        if self.reload_signal is not None:
            self._installReloadSignal(self.reload_signal)

    def readiness(self) -> tuple[bool, str]:
        """
        Whether this process should get new traffic (C{/readyz}), and why
        not: it is ready while serving with every listener bound; it is
        not while starting, nor from the stop on, while it drains.
        """
        if self.phase is Phase.STOPPING:
            tcp = [lst for lst in self.listeners if isinstance(lst, TCPForwardServer)]
            live = sum(len(lst.factory.relays) for lst in tcp)
            return False, f"draining, {live} connection{'' if live == 1 else 's'} open"
        unbound = [_where(lst) for lst in self.listeners if lst._port is None]
        if unbound:
            return False, "not listening: " + ", ".join(unbound)
        if self.phase is Phase.STARTING:
            return False, "starting"
        return True, "ready"

    def stopService(self) -> Deferred[Any]:
        """
        Close the listeners at once, let live TCP connections finish up to
        the drain deadline, then close what is left. The metrics server
        stops last, so that C{/readyz} answers "draining" meanwhile.
        """
        self.phase = Phase.STOPPING
        stopped = self._stopAllBut(self.metrics)
        factories = [lst.factory for lst in self.listeners if isinstance(lst, TCPForwardServer)]
        live = sum(len(factory.relays) for factory in factories)
        if live:
            log.info(
                "Stopping: {connections} may finish within {seconds}s",
                connections=f"{live} connection" + ("" if live == 1 else "s"),
                seconds=f"{self.drain_timeout:.15g}",
                live=live,
                timeout=self.drain_timeout,
            )
        drains = [self._drain(factory) for factory in factories]
        return gatherResults([stopped, *drains, *self._draining]).addBoth(self._stopMetrics)

    def _stopAllBut(self, kept: Service | None) -> Deferred[Any]:
        """L{MultiService.stopService}, leaving C{kept} running."""
        Service.stopService(self)
        children = [child for child in reversed(list(self)) if child is not kept]
        return DeferredList([maybeDeferred(child.stopService) for child in children])

    def _stopMetrics(self, result: Any) -> Any:
        if self.metrics is None:
            return result
        return maybeDeferred(self.metrics.stopService).addBoth(lambda _: result)

    def _drain(self, factory: TCPForwardFactory) -> Deferred[None]:
        drained = factory.drain(self.drain_timeout)
        self._draining.add(drained)
        drained.addBoth(_passthrough(self._draining.discard, drained))
        return drained

    # Reloading

    def reload(self, path: str | None = None) -> Deferred[bool]:
        """
        Re-read the config file (the one loaded first, unless C{path} is
        given) and apply it; see L{apply}. A file that does not load is
        logged and changes nothing.

        @return: a Deferred that fires with True once applied, else False.
        """
        source = path or self.config.source
        try:
            config = load_config(source)
        except ConfigError as e:
            log.error(
                "Reload rejected; the running forwards stay as they were: {error}", error=str(e)
            )
            return succeed(False)
        return Deferred.fromCoroutine(self.apply(config))

    async def apply(self, config: GatewayConfig) -> bool:
        """
        Make the running forwards those of C{config}. Unchanged forwards
        keep their listeners, connections and sessions. A forward whose
        settings changed keeps its listener; new connections get the new
        settings. Removed forwards stop listening and their connections
        drain. If a new listener cannot bind, the old listeners are back as
        they were; one exception: a new listener that needed the port of a
        removed one could only try once that one had stopped, so the UDP
        sessions of the removed forward have ended by then (its TCP
        connections are kept).
        """
        wanted = {
            listener_key: forward for forward in config.forwards for listener_key in _keys(forward)
        }
        removed = [self._listeners[key] for key in self._listeners if key not in wanted]
        # A new listener on the port of one being removed can bind only once
        # the old socket is closed; the others bind first, before anything stops.
        freed = {(lst.protocol, lst.forward.port) for lst in removed}
        added = [key for key in wanted if key not in self._listeners]
        now = [key for key in added if (key[0], key[2]) not in freed]
        later = [key for key in added if (key[0], key[2]) in freed]
        started: list[Listener] = []
        try:
            self._startListeners(now, wanted, started)
            await gatherResults([_stop(listener) for listener in removed])
            self._startListeners(later, wanted, started)
        except ListenError as e:
            for listener in started:
                self.removeService(listener)
            for listener in removed:
                listener.startService()
            log.error(
                "Reload rejected; the running forwards stay as they were: {error}", error=str(e)
            )
            return False
        self._commit(config, wanted, removed, started)
        return True

    def _startListeners(
        self, keys: list[ListenKey], wanted: dict[ListenKey, Forward], started: list[Listener]
    ) -> None:
        for key in keys:
            [listener] = [lst for lst in self._build(wanted[key]) if lst.protocol == key[0]]
            listener.setName(_service_name(listener))
            try:
                listener.setServiceParent(self)
            except ListenError:
                self.removeService(listener)
                raise
            started.append(listener)

    def _commit(
        self,
        config: GatewayConfig,
        wanted: dict[ListenKey, Forward],
        removed: list[Listener],
        started: list[Listener],
    ) -> None:
        changed = 0
        for key, listener in self._listeners.items():
            if key in wanted and listener.forward != wanted[key]:
                listener.update(wanted[key])
                changed += 1
        for listener in removed:
            del self._listeners[listener.key]
            self.removeService(listener)
            if isinstance(listener, TCPForwardServer):
                self._drain(listener.factory)
        for listener in started:
            self._listeners[listener.key] = listener
            _announce(listener)
        self.config = config
        self._sizeBounds(replan=True)
        log.info(
            "Reloaded {source}: {added} listeners added, {removed} removed, "
            "{changed} changed, {count} in all",
            source=config.source,
            added=len(started),
            removed=len(removed),
            changed=changed,
            count=len(self._listeners),
        )

    def _installReloadSignal(self, signum: int) -> None:
        reactor = reactor_or_global(self._reactor)

        def reload_soon(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload)

        signal.signal(signum, reload_soon)

    def _unbind(self) -> None:
        for listener in self.listeners:
            if getattr(listener, "_port", None) is not None:
                listener._port.stopListening()
                listener._port = None

    budget: Budget | None = None

    def _sizeBounds(self, replan: bool = False) -> None:
        """
        Raise the descriptor limit, then give each forward without a
        configured bound its share of it; log the figures. At start this
        is done once; a reload (C{replan}) shares the limit again among the
        forwards it leaves, counting the descriptors open at start, not the
        live connections', which their bounds already count.
        """
        if self.budget is not None and not replan:
            return
        soft_before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = raise_fd_limit()
        in_use = self.budget.in_use if self.budget is not None else open_fd_count()
        tcp = [lst for lst in self.listeners if isinstance(lst, TCPForwardServer)]
        udp = [lst for lst in self.listeners if isinstance(lst, UDPForwardServer)]
        self.budget = budget = plan_budget(
            limit,
            in_use,
            [lst.forward.max_connections for lst in tcp],
            [lst.forward.max_sessions for lst in udp],
            reserved_fds(splicing=self.relay.splices),
        )
        for listener, (bound, _) in zip(tcp, budget.tcp):
            listener.factory.bounds.total = bound
        for udp_listener, (bound, _) in zip(udp, budget.udp):
            udp_listener.relay.max_sessions = bound
        shares = [
            f"{lst.forward.name} {bound} connections" + (" (derived)" if derived else "")
            for lst, (bound, derived) in zip(tcp, budget.tcp)
        ] + [
            f"{lst.forward.name} {bound} sessions" + (" (derived)" if derived else "")
            for lst, (bound, derived) in zip(udp, budget.udp)
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


def _service_name(listener: Listener) -> str:
    # Unique as the key is: a reload that turns reusePort on or off starts
    # the new listener before the old one leaves the MultiService.
    shared = " reusePort" if listener.forward.reuse_port else ""
    return f"{listener.protocol} {listener.forward.name}{shared}"


def _keys(forward: Forward) -> list[ListenKey]:
    return [
        (protocol, forward.address, forward.port, forward.reuse_port)
        for protocol in forward.protocols
    ]


def _where(listener: Listener) -> str:
    """A listener as C{/readyz} names it: C{tcp 53}, C{udp 127.0.0.1:5353}."""
    forward = listener.forward
    where = format_address(forward.address, forward.port) if forward.address else forward.port
    return f"{listener.protocol} {where}"


def _stop(listener: Listener) -> Deferred[Any]:
    return maybeDeferred(listener.stopService)


def _passthrough(call: Any, argument: Any) -> Any:
    def both(result: Any) -> Any:
        call(argument)
        return result

    return both


def _announce(listener: Listener) -> None:
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
