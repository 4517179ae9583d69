"""
The service a twistd plugin or a C{.tac} file runs: one listening service
per forward and protocol, under one L{MultiService}.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from enum import Enum
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.logger import Logger

from ._reactor import reactor_or_global
from .activation import Activation
from .config import ConfigError, Forward, GatewayConfig, format_address, load_config
from .descriptors import open_fd_count, raise_fd_limit, size_bounds
from .listeners import (
    Listener,
    ListenError,
    ListenKey,
    MetricsServer,
    TCPForwardServer,
    UDPForwardServer,
    announce,
    default_interface,
    listener_keys,
    service_name,
    where,
)
from .metrics import ForwardCollector
from .policy import Budget
from .relaychoice import RelayChoice, choose_relay
from .reloading import REJECTED, LatestWins, rejecting
from .stats import TCPStats, UDPStats
from .tcpfactory import TCPForwardFactory
from .udp import UDPForward
from .watch import ConfigWatcher

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT", "ListenError", "PassThroughService", "TCPForwardServer",
    "UDPForwardServer", "default_interface", "open_fd_count", "raise_fd_limit",
]  # fmt: skip

log = Logger(namespace="goma_pt")


DEFAULT_DRAIN_TIMEOUT = 5.0


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
    @param watch: reload, as on the reload signal, when the config file
        changes (L{goma_twisted.watch}).
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
        watch: bool = False,
    ) -> None:
        super().__init__()
        self.activation = activation if activation is not None else Activation([])
        if not isinstance(relay, RelayChoice):
            relay = choose_relay(relay, reactor_or_global(reactor))
        self.relay = relay
        self.config = config
        self.drain_timeout = drain_timeout
        self.reload_signal = reload_signal
        self.watch = watch
        self._watcher: ConfigWatcher | None = None
        self._reactor = reactor
        self._clock = clock
        self._listeners: dict[ListenKey, Listener] = {}
        self._draining: set[Deferred[None]] = set()
        self._reloads: LatestWins[bool] = LatestWins()
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
                yield listener.relay.refreshStats()

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
        listener.setName(service_name(listener))
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
            announce(listener)
        if self.metrics is not None:
            host = self.metrics.getHost()
            if hasattr(host, "port"):
                where = f"http://{format_address(host.host, host.port)}/metrics"
            else:
                where = f"{self.metrics.description}, path /metrics"
            log.info("Serving metrics at {where}", where=where)
        if self.reload_signal is not None:
            self._installReloadSignal(self.reload_signal)
        if self.watch and self._watcher is None:
            reactor = reactor_or_global(self._reactor)
            self._watcher = ConfigWatcher(self.config.source, self._changed, reactor)
            how = self._watcher.start()
            log.info("Watching {path} for changes ({how})", path=self.config.source, how=how)
        # Last: what waits for this line finds every other one before it.
        self.phase = Phase.SERVING
        log.info("goma-pt ready: {count} listeners", count=len(self._listeners))

    def _changed(self) -> None:
        log.info("{path} changed: reloading", path=self.config.source)
        self.reload()

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
        unbound = [where(lst) for lst in self.listeners if lst.port is None]
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
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
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
        logged and changes nothing. Reloads run one at a time: one asked
        for while another runs (a burst of SIGHUPs) reads the file once
        that one is done, so the file's latest content wins.

        @return: a Deferred that fires with True once applied, else False.
        """
        return self._reloads.run(lambda: rejecting(self._reload(path)))

    def apply(self, config: GatewayConfig) -> Deferred[bool]:
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

        Runs after any reload or apply under way; of several asked for
        meanwhile, only the last runs, and each caller gets its result.

        @return: a Deferred that fires with True once applied, else False
            (the reason is logged as a rejected reload).
        """
        return self._reloads.run(lambda: rejecting(self._apply(config)))

    async def _reload(self, path: str | None) -> bool:
        source = path or self.config.source
        try:
            config = load_config(source)
        except ConfigError as e:
            log.error(REJECTED, error=str(e))
            return False
        return await self._apply(config)

    async def _apply(self, config: GatewayConfig) -> bool:
        if self.phase is Phase.STOPPING:
            # A SIGHUP or a --watch change during the drain: nothing may
            # listen again, and the listeners are stopped already.
            log.warn("Reload not applied: goma-pt is stopping")
            return False
        wanted = {
            listener_key: forward
            for forward in config.forwards
            for listener_key in listener_keys(forward)
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
        except Exception as e:
            for listener in started:
                self.removeService(listener)
            for listener in removed:
                listener.startService()
            if not isinstance(e, ListenError):
                raise
            log.error(REJECTED, error=str(e))
            return False
        self._commit(config, wanted, removed, started)
        return True

    def _startListeners(
        self, keys: list[ListenKey], wanted: dict[ListenKey, Forward], started: list[Listener]
    ) -> None:
        for key in keys:
            [listener] = [lst for lst in self._build(wanted[key]) if lst.protocol == key[0]]
            listener.setName(service_name(listener))
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
            announce(listener)
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

    budget: Budget | None = None

    def _sizeBounds(self, replan: bool = False) -> None:
        """Share the descriptor limit among the forwards: once at start, again at a reload."""
        if self.budget is None or replan:
            self.budget = size_bounds(self.listeners, self.budget, self.relay.splices)

    def _unbind(self) -> None:
        for listener in self.listeners:
            if listener.port is not None:
                listener.port.stopListening()
                listener.port = None


def _stop(listener: Listener) -> Deferred[Any]:
    return maybeDeferred(listener.stopService)


def _passthrough(call: Any, argument: Any) -> Any:
    def both(result: Any) -> Any:
        call(argument)
        return result

    return both
