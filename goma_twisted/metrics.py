"""
Prometheus metrics: a collector that reads the forwards' plain counters
(L{goma_twisted.stats}) when scraped, and a C{twisted.web} resource that
serves a registry in the Prometheus text format; next to it, the health
pages C{/healthz} and C{/readyz} for load balancers and Kubernetes probes.

The resource renders in the reactor's thread, not in a thread pool as
C{prometheus_client.twisted.MetricsResource} does: the counters are
updated by the reactor without locks, so reading them there gives a
consistent scrape (a histogram's count matches its buckets, no dict
changes size while it is read), and importing this module does not
import the global reactor, which would pre-empt C{twistd --reactor}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet.endpoints import serverFromString
from twisted.web.pages import notFound
from twisted.web.resource import EncodingResourceWrapper, IResource, Resource
from twisted.web.server import GzipEncoderFactory, Request, Site

from .stats import TCPStats, UDPStats

# Every series of a forward carries these labels: which forward (its
# listening address and port; the address is "*" for every address),
# which protocol, and the target as configured.
LABELS = ("protocol", "address", "port", "target")

Stats = Union[TCPStats, UDPStats]


def forward_labels(stats: Stats) -> list[str]:
    forward = stats.forward
    return [stats.protocol, forward.address or "*", str(forward.port), str(forward.target)]


class ForwardCollector:
    """
    Yields the metrics of every forward that C{sources} returns, at each
    scrape; forwards added or removed later (a reload) show up or vanish.
    """

    def __init__(self, sources: Callable[[], Iterable[Stats]]) -> None:
        self.sources = sources

    def describe(self) -> Iterator[Metric]:
        # The names, so that a registry refuses a second collector that
        # would produce the same series.
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(list(self.sources()))

    def _families(self, sources: list[Stats]) -> Iterator[Metric]:
        tcp = [s for s in sources if isinstance(s, TCPStats)]
        udp = [s for s in sources if isinstance(s, UDPStats)]
        yield from _both(tcp, udp)
        yield from _tcp(tcp)
        yield from _udp(udp)


def _counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=[*LABELS, *extra])


def _gauge(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=LABELS)


def _by_reason(family: CounterMetricFamily, labels: list[str], counts: dict[str, int]) -> None:
    for reason, count in sorted(counts.items()):
        family.add_metric([*labels, reason], count)


def _both(tcp: list[TCPStats], udp: list[UDPStats]) -> Iterator[Metric]:
    size = _counter(
        "goma_pt_bytes",
        "Payload bytes relayed, by direction: to_target (from clients) or to_client.",
        ("direction",),
    )
    both: list[Stats] = [*tcp, *udp]
    for s in both:
        labels = forward_labels(s)
        size.add_metric([*labels, "to_target"], s.bytes_to_target)
        size.add_metric([*labels, "to_client"], s.bytes_to_client)
    yield size


def _tcp(sources: list[TCPStats]) -> Iterator[Metric]:
    accepted = _counter("goma_pt_tcp_connections_accepted", "TCP connections accepted.")
    active = _gauge("goma_pt_tcp_connections_active", "TCP connections open now.")
    bound = _gauge("goma_pt_tcp_connections_max", "The bound on open TCP connections.")
    closed = _counter(
        "goma_pt_tcp_connections_closed",
        "TCP connections ended, by the reason their log line gives.",
        ("reason",),
    )
    failures = _counter(
        "goma_pt_tcp_connect_failures",
        "Connections whose target could not be reached, by reason.",
        ("reason",),
    )
    refused = _counter(
        "goma_pt_tcp_connections_refused",
        "TCP connections turned away before relaying, by reason.",
        ("reason",),
    )
    connect = HistogramMetricFamily(
        "goma_pt_tcp_connect_seconds",
        "Time from accepting a client to being connected to its target (resolving included).",
        labels=LABELS,
    )
    for s in sources:
        labels = forward_labels(s)
        accepted.add_metric(labels, s.accepted)
        active.add_metric(labels, s.active)
        bound.add_metric(labels, s.max_connections)
        _by_reason(closed, labels, s.closed)
        _by_reason(failures, labels, s.connect_failures)
        _by_reason(refused, labels, s.refused)
        histogram = s.connect_time
        buckets = [(floatToGoString(le), n) for le, n in histogram.cumulative()]
        connect.add_metric(labels, buckets, histogram.sum)
    yield from (accepted, active, bound, closed, failures, refused, connect)


def _udp(sources: list[UDPStats]) -> Iterator[Metric]:
    active = _gauge("goma_pt_udp_sessions_active", "UDP sessions open now.")
    bound = _gauge("goma_pt_udp_sessions_max", "The bound on open UDP sessions.")
    unanswered = _gauge(
        "goma_pt_udp_sessions_unanswered",
        "UDP sessions open now that have had no answer from the target; "
        "in a full table they give way to new clients.",
    )
    created = _counter("goma_pt_udp_sessions_created", "UDP sessions started.")
    ended = _counter(
        "goma_pt_udp_sessions_ended",
        "UDP sessions ended, by reason (idle timeout and unanswered are expiries; "
        "evicted: gave way to a new client in a full table).",
        ("reason",),
    )
    refused = _counter(
        "goma_pt_udp_sessions_refused",
        "Datagrams from clients without a session that got none, by reason "
        "(at bound: the session table was full); each was dropped.",
        ("reason",),
    )
    datagrams = _counter(
        "goma_pt_udp_datagrams",
        "Datagrams relayed, by direction: to_target or to_client.",
        ("direction",),
    )
    dropped = _counter(
        "goma_pt_udp_datagrams_dropped",
        "Datagrams dropped on the way, by reason.",
        ("reason",),
    )
    unreachable = _counter(
        "goma_pt_udp_target_unreachable",
        "ICMP port-unreachable errors from the target (rate-limited by the kernel).",
    )
    for s in sources:
        labels = forward_labels(s)
        active.add_metric(labels, s.sessions_active)
        bound.add_metric(labels, s.max_sessions)
        unanswered.add_metric(labels, s.sessions_unanswered)
        created.add_metric(labels, s.sessions_created)
        _by_reason(ended, labels, s.sessions_ended)
        _by_reason(refused, labels, s.sessions_refused)
        datagrams.add_metric([*labels, "to_target"], s.datagrams_to_target)
        datagrams.add_metric([*labels, "to_client"], s.datagrams_to_client)
        _by_reason(dropped, labels, s.dropped)
        unreachable.add_metric(labels, s.unreachable)
    yield from (
        active,
        bound,
        unanswered,
        created,
        ended,
        refused,
        datagrams,
        dropped,
        unreachable,
    )


class MetricsPage(Resource):
    """
    Serves a registry in the format the scraper asks for (Prometheus text,
    or OpenMetrics), rendered in the reactor's thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        registry: Any = self.registry
        names = request.args.get(b"name[]") if request.args else None
        if names:
            registry = registry.restricted_registry([n.decode() for n in names])
        request.setHeader("content-type", content_type)
        return bytes(encoder(registry))


class MetricsSite(Site):
    """A site that keeps each scrape out of the log."""

    noisy = False

    def logPrefix(self) -> str:
        return "goma-pt metrics"

    def log(self, request: Any) -> None:
        pass


def metrics_resource(registry: CollectorRegistry) -> IResource:
    """The C{/metrics} page, gzipped for scrapers that accept it; mount it in your own site."""
    return EncodingResourceWrapper(MetricsPage(registry), [GzipEncoderFactory()])


Readiness = Callable[[], tuple[bool, str]]
"""Whether to send this process new traffic, and a short reason."""


class _PlainPage(Resource):
    """A short plain-text answer that no cache keeps."""

    isLeaf = True

    def answer(self, request: Request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader("content-type", "text/plain; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        return f"{text}\n".encode()


class HealthPage(_PlainPage):
    """
    C{/healthz}: 200 whenever it answers, as answering takes a running
    reactor. It stays 200 while the service drains: the process is
    healthy, only not to be sent new traffic (that is C{/readyz}).
    """

    def render_GET(self, request: Request) -> bytes:
        return self.answer(request, 200, "ok")


class ReadinessPage(_PlainPage):
    """C{/readyz}: 200 when C{readiness} says ready, else 503; the body says why."""

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        ready, why = self.readiness()
        return self.answer(request, 200 if ready else 503, why)


class _Root(Resource):
    def getChild(self, path: bytes, request: Any) -> IResource:
        return notFound()


def metrics_site(registry: CollectorRegistry, readiness: Readiness | None = None) -> Site:
    """
    A web site serving C{registry} at C{/metrics}, C{/healthz}, and, given
    C{readiness} (e.g. L{PassThroughService.readiness
    <goma_twisted.service.PassThroughService.readiness>}), C{/readyz};
    nothing else.
    """
    root = _Root()
    root.putChild(b"metrics", metrics_resource(registry))
    root.putChild(b"healthz", HealthPage())
    if readiness is not None:
        root.putChild(b"readyz", ReadinessPage(readiness))
    return MetricsSite(root)


def check_endpoint(description: str) -> None:
    """
    Parse a server endpoint string the way the service will, without
    listening.

    @raise ValueError: with a sentence saying what is wrong.
    """
    try:
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, IndexError, ImportError, OSError) as e:
        raise ValueError(
            f"{description!r} is not a server endpoint ({e}); e.g. tcp:9108:interface=127.0.0.1"
        ) from None
    # Twisted takes any integer as a TCP port and fails only when listening,
    # after the forwards have started: the port is checked here.
    port = _endpoint_port(description)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(
            f"{description!r}: port {port} is not 0 to 65535; e.g. tcp:9108:interface=127.0.0.1"
        )


def _endpoint_port(description: str) -> int | None:
    """The port of a C{tcp:PORT} or C{tcp:port=PORT} endpoint string, if it names one."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    for index, token in enumerate(rest.split(":")):
        name, equals, value = token.partition("=")
        text = value if equals else name if index == 0 else ""
        if (equals and name == "port") or (not equals and index == 0):
            try:
                return int(text)
            except ValueError:
                return None
    return None
