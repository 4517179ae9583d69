"""
/metrics after real traffic: known byte, connection and datagram counts
go through a running service on loopback sockets, then a real HTTP client
scrapes the endpoint and the counters must match exactly.
"""

from __future__ import annotations

import gzip
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from goma_twisted import GatewayConfig, metrics
from goma_twisted.service import ListenError, PassThroughService
from goma_twisted.stats import TCPStats

from .support import (
    Echo,
    FakeResolver,
    Recorder,
    ResolvingReactor,
    UDPEcho,
    bound_port,
    captured_logs,
    connect,
    forward,
    free_port,
    goma_pt_running,
    listen_tcp,
    start_service,
    udp_relay,
    wait_for,
    write_config,
)
from .test_udp import Selective, UDPClient

TIMEOUT = 20

# Twisted's own readBody warns about its own HTTP client's transport.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport")
METRICS = "tcp:0:interface=127.0.0.1"


@pytest.fixture
def cleanup(reactor: Any) -> Any:
    """Services and ports a test started, stopped after it."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, PassThroughService):
            pytest_twisted.blockon(thing.stopService())
        else:
            pytest_twisted.blockon(thing.stopListening())


async def scrape(
    reactor: Any, service: PassThroughService, path: str = "/metrics", **headers: str
) -> tuple[int, Headers, bytes]:
    assert service.metrics is not None
    url = f"http://127.0.0.1:{service.metrics.getHost().port}{path}".encode()
    request_headers = Headers({k.replace("_", "-"): [v] for k, v in headers.items()})
    response = (
        await Agent(reactor).request(b"GET", url, request_headers).addTimeout(TIMEOUT, reactor)
    )
    body = await readBody(response)
    return response.code, response.headers, body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Values:
    """Sample values by name and labels, from one scrape."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = samples(text)

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]


async def until(reactor: Any, predicate: Any, what: str) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_scraped_counters_match_the_traffic_exactly(
    reactor: Any, cleanup: list[Any]
) -> None:
    clock = Clock()
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    cleanup.append(echo)
    dead = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    dead_port = dead.getHost().port
    await dead.stopListening()
    udp_echo = reactor.listenUDP(0, UDPEcho(b"echo:"), interface="127.0.0.1")
    cleanup.append(udp_echo)
    echo_port, udp_port = echo.getHost().port, udp_echo.getHost().port
    ports = [free_port(), free_port(), free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)]
    service = start_service(
        forward(target=("127.0.0.1", echo_port), port=ports[0]),
        forward(target=("127.0.0.1", dead_port), port=ports[1]),
        forward(("udp",), ("127.0.0.1", udp_port), port=ports[2], udp_idle_timeout=60.0),
        forward(("udp",), ("127.0.0.1", udp_port), port=ports[3], max_sessions=1),
        clock=clock,
        metrics=METRICS,
    )
    cleanup.append(service)
    base = {"address": "127.0.0.1"}
    tcp_ok = base | {"protocol": "tcp", "port": str(ports[0]), "target": f"127.0.0.1:{echo_port}"}
    tcp_refused = base | {
        "protocol": "tcp",
        "port": str(ports[1]),
        "target": f"127.0.0.1:{dead_port}",
    }
    udp_labels = base | {
        "protocol": "udp",
        "port": str(ports[2]),
        "target": f"127.0.0.1:{udp_port}",
    }
    bounded = udp_labels | {"port": str(ports[3])}

    # Five TCP clients send 1, 10, 100, 1000, 100000 bytes each; the echo
    # sends all of it back. Three more are refused by the dead target.
    sizes = [1, 10, 100, 1000, 100_000]
    clients = [Recorder(send=b"x" * size, halfClose=True) for size in sizes]
    for client in clients:
        connect(reactor, bound_port(service, "tcp", 0), client)
    failed = [Recorder(send=b"hello") for _ in range(3)]
    for client in failed:
        connect(reactor, bound_port(service, "tcp", 1), client)
    for client in [*clients, *failed]:
        await client.lost.addTimeout(TIMEOUT, reactor)
    assert [len(c.received) for c in clients] == sizes
    factories = [lst.factory for lst in service.listeners if lst.protocol == "tcp"]  # type: ignore[union-attr]
    await until(reactor, lambda: not any(f.relays for f in factories), "the relays to end")

    # Four UDP clients send 1, 2, 3, 4 datagrams of 7 bytes each; each
    # comes back with 5 more bytes. On the bounded forward one client gets
    # the one session, another is refused three times.
    udp_clients = []
    for count in range(1, 5):
        c = UDPClient()
        cleanup.append(reactor.listenUDP(0, c, interface="127.0.0.1"))
        udp_clients.append(c)
        for _ in range(count):
            c.send(b"datagram", bound_port(service, "udp", 0))
            await c.reply(reactor)
    inside, outside = UDPClient(), UDPClient()
    for c in (inside, outside):
        cleanup.append(reactor.listenUDP(0, c, interface="127.0.0.1"))
    inside.send(b"in", bound_port(service, "udp", 1))
    await inside.reply(reactor)
    for _ in range(3):
        outside.send(b"let me in", bound_port(service, "udp", 1))
    await until(reactor, lambda: udp_relay(service, 1).refusedAtBound == 3, "refusals")

    code, headers, body = await scrape(reactor, service)
    assert code == 200
    [content_type] = headers.getRawHeaders(b"content-type", [])
    assert content_type.startswith(b"text/plain; version=0.0.4")
    value = Values(body.decode())
    assert value("goma_pt_tcp_connections_accepted_total", **tcp_ok) == 5
    assert value("goma_pt_tcp_connections_active", **tcp_ok) == 0
    assert value("goma_pt_tcp_connections_max", **tcp_ok) == factories[0].bounds.total
    assert value("goma_pt_tcp_connections_max", **tcp_ok) > 0
    assert value("goma_pt_bytes_total", **tcp_ok, direction="to_target") == sum(sizes)
    assert value("goma_pt_bytes_total", **tcp_ok, direction="to_client") == sum(sizes)
    assert value("goma_pt_tcp_connections_closed_total", **tcp_ok, reason="client closed") == 5
    assert value("goma_pt_tcp_connect_seconds_count", **tcp_ok) == 5
    # The relays' clock is a Clock that did not move: every connect took 0 s.
    assert value("goma_pt_tcp_connect_seconds_bucket", **tcp_ok, le="0.0005") == 5
    assert value("goma_pt_tcp_connect_seconds_sum", **tcp_ok) == 0
    assert value("goma_pt_tcp_connections_accepted_total", **tcp_refused) == 3
    assert (
        value("goma_pt_tcp_connect_failures_total", **tcp_refused, reason="connect refused") == 3
    )
    assert (
        value("goma_pt_tcp_connections_closed_total", **tcp_refused, reason="connect refused") == 3
    )
    assert value("goma_pt_tcp_connect_seconds_count", **tcp_refused) == 0
    assert value("goma_pt_bytes_total", **tcp_refused, direction="to_target") == 0

    assert value("goma_pt_udp_sessions_created_total", **udp_labels) == 4
    assert value("goma_pt_udp_sessions_active", **udp_labels) == 4
    assert value("goma_pt_udp_datagrams_total", **udp_labels, direction="to_target") == 10
    assert value("goma_pt_udp_datagrams_total", **udp_labels, direction="to_client") == 10
    assert value("goma_pt_bytes_total", **udp_labels, direction="to_target") == 10 * 8
    assert value("goma_pt_bytes_total", **udp_labels, direction="to_client") == 10 * 13
    assert value("goma_pt_udp_sessions_refused_total", **udp_labels, reason="at bound") == 0
    assert value("goma_pt_udp_sessions_created_total", **bounded) == 1
    assert value("goma_pt_udp_sessions_max", **bounded) == 1
    assert value("goma_pt_udp_sessions_refused_total", **bounded, reason="at bound") == 3
    assert value("goma_pt_udp_datagrams_total", **bounded, direction="to_target") == 1
    assert value("goma_pt_bytes_total", **bounded, direction="to_client") == len(b"echo:in")

    # The unbounded forward's sessions expire after 60 idle seconds.
    clock.advance(60)
    await deferLater(reactor, 0.01)
    _, _, body = await scrape(reactor, service)
    value = Values(body.decode())
    assert value("goma_pt_udp_sessions_active", **udp_labels) == 0
    assert value("goma_pt_udp_sessions_ended_total", **udp_labels, reason="idle timeout") == 4
    # The bounded one has the default 300 s.
    assert value("goma_pt_udp_sessions_active", **bounded) == 1
    assert value("goma_pt_udp_sessions_ended_total", **bounded, reason="idle timeout") == 0
    assert "process_open_fds" in value.text


@pytest_twisted.ensureDeferred
async def test_connect_time_in_the_end_event_and_the_histogram(
    reactor: Any, cleanup: list[Any]
) -> None:
    # The target's name takes 2.5 s to resolve on the relays' clock.
    clock = Clock()
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    cleanup.append(echo)
    resolver = FakeResolver(clock, {"backend.test": ["127.0.0.1"]}, delay=2.5)
    service = start_service(
        forward(target=("backend.test", echo.getHost().port)),
        reactor=ResolvingReactor(reactor, resolver),
        clock=clock,
        metrics=METRICS,
    )
    cleanup.append(service)
    client = Recorder(send=b"hello", halfClose=True)
    with captured_logs() as logs:
        connect(reactor, bound_port(service), client)
        await until(reactor, lambda: resolver.lookups, "the lookup")
        clock.advance(2.5)
        assert await client.lost.addTimeout(TIMEOUT, reactor) == b"hello"
        await until(reactor, lambda: logs.ends(), "the end event")
    [end] = logs.ends()
    assert end["connectTime"] == 2.5
    assert end["duration"] == 2.5
    from twisted.logger import formatEvent

    assert formatEvent(end).endswith("5 bytes sent, 5 received, 2.500s (connect 2.500s)")
    _, _, body = await scrape(reactor, service)
    value = Values(body.decode())
    labels = {
        "protocol": "tcp",
        "address": "127.0.0.1",
        "port": "0",
        "target": f"backend.test:{echo.getHost().port}",
    }
    assert value("goma_pt_tcp_connect_seconds_bucket", **labels, le="1.0") == 0
    assert value("goma_pt_tcp_connect_seconds_bucket", **labels, le="2.5") == 1
    assert value("goma_pt_tcp_connect_seconds_sum", **labels) == 2.5


@pytest_twisted.ensureDeferred
async def test_openmetrics_gzip_and_only_metrics_path(reactor: Any, cleanup: list[Any]) -> None:
    service = start_service(forward(target=("127.0.0.1", 9)), metrics=METRICS)
    cleanup.append(service)
    code, headers, body = await scrape(
        reactor, service, accept="application/openmetrics-text; version=1.0.0"
    )
    assert code == 200
    [content_type] = headers.getRawHeaders(b"content-type", [])
    assert content_type.startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    code, headers, body = await scrape(reactor, service, accept_encoding="gzip")
    assert headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert b"goma_pt_tcp_connections_accepted_total" in gzip.decompress(body)
    code, _, _ = await scrape(reactor, service, path="/")
    assert code == 404


def test_metrics_port_in_use_is_a_listen_error_and_nothing_stays_bound() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        service = PassThroughService(
            GatewayConfig("test", (forward(target=("127.0.0.1", 9)),)),
            metrics=f"tcp:{taken}:interface=127.0.0.1",
        )
        with pytest.raises(ListenError) as caught:
            service.startService()
    assert str(caught.value) == (
        f"metrics tcp:{taken}:interface=127.0.0.1: Address already in use"
    )
    assert all(listener.port is None for listener in service.listeners)


def test_without_metrics_there_is_no_server_but_a_registry() -> None:
    service = PassThroughService(GatewayConfig("test", (forward(target=("127.0.0.1", 9)),)))
    assert service.metrics is None
    assert [c for c in service if c.name == "metrics"] == []
    [stats] = list(service.stats())
    assert isinstance(stats, TCPStats)
    labels = {"protocol": "tcp", "address": "127.0.0.1", "port": "0", "target": "127.0.0.1:9"}
    assert service.registry.get_sample_value("goma_pt_tcp_connections_active", labels) == 0


@pytest_twisted.ensureDeferred
async def test_the_registry_served_from_a_site_of_your_own(
    reactor: Any, cleanup: list[Any]
) -> None:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from goma_twisted.metrics import metrics_resource

    service = start_service(forward(target=("127.0.0.1", 9)))
    cleanup.append(service)
    root = Resource()
    root.putChild(b"metrics", metrics_resource(service.registry))
    site = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    cleanup.append(site)
    url = f"http://127.0.0.1:{site.getHost().port}/metrics".encode()
    response = await Agent(reactor).request(b"GET", url).addTimeout(TIMEOUT, reactor)
    value = Values((await readBody(response)).decode())
    labels = {"protocol": "tcp", "address": "127.0.0.1", "port": "0", "target": "127.0.0.1:9"}
    assert value("goma_pt_tcp_connections_accepted_total", **labels) == 0


@pytest_twisted.ensureDeferred
async def test_udp_drops_are_counted_by_reason(reactor: Any, cleanup: list[Any]) -> None:
    # Two hostname targets on the relays' clock: one resolves after 5 s,
    # while 70 datagrams wait (64 are kept); the other never resolves.
    clock = Clock()
    backend = UDPEcho()
    udp_echo = reactor.listenUDP(0, backend, interface="127.0.0.1")
    cleanup.append(udp_echo)
    echo_port = udp_echo.getHost().port
    resolver = FakeResolver(clock, {"slow.test": ["127.0.0.1"]}, delay=5)
    service = start_service(
        forward(("udp",), ("slow.test", echo_port)),
        forward(("udp",), ("nowhere.test", 53), port=free_port(socket.SOCK_DGRAM)),
        reactor=ResolvingReactor(reactor, resolver),
        clock=clock,
    )
    cleanup.append(service)
    slow, nowhere = UDPClient(), UDPClient()
    for c in (slow, nowhere):
        cleanup.append(reactor.listenUDP(0, c, interface="127.0.0.1"))
    for i in range(70):
        slow.send(b"%02d" % i, bound_port(service, "udp", 0))
    for _ in range(3):
        nowhere.send(b"lost", bound_port(service, "udp", 1))
    await until(reactor, lambda: len(resolver.lookups) == 2, "both lookups")
    await deferLater(reactor, 0.05)
    clock.advance(5)
    await until(reactor, lambda: len(backend.received) == 64, "the queued datagrams")

    def value(name: str, index: int, **labels: str) -> float | None:
        relay = udp_relay(service, index)
        labels |= {"protocol": "udp", "address": "127.0.0.1"}
        labels |= {"port": str(relay.config.port), "target": str(relay.config.target)}
        return service.registry.get_sample_value(name, labels)

    dropped = "goma_pt_udp_datagrams_dropped_total"
    assert value(dropped, 0, reason="queue full") == 6
    assert value("goma_pt_udp_datagrams_total", 0, direction="to_target") == 64
    assert value("goma_pt_udp_sessions_created_total", 1) == 1
    assert value("goma_pt_udp_sessions_ended_total", 1, reason="resolve failed") == 1
    assert value(dropped, 1, reason="resolve failed") == 3
    assert value("goma_pt_udp_datagrams_total", 1, direction="to_target") == 0


@pytest.mark.parametrize(
    "description", ["tcp:99999", "tcp6:port=-1", "tcp:65536:interface=127.0.0.1"]
)
def test_an_endpoint_port_out_of_range_is_refused_before_start(description: str) -> None:
    with pytest.raises(ValueError, match=r"port -?\d+ is not 0 to 65535; e\.g\. tcp:9108"):
        metrics.check_endpoint(description)


@pytest.mark.parametrize("description", ["tcp:0", "tcp:65535:interface=127.0.0.1", "unix:/tmp/m"])
def test_an_endpoint_in_range_passes(description: str) -> None:
    metrics.check_endpoint(description)


@pytest_twisted.ensureDeferred
async def test_udp_evictions_and_unanswered_sessions_are_counted(
    reactor: Any, cleanup: list[Any]
) -> None:
    target = Selective()
    target_port = reactor.listenUDP(0, target, interface="127.0.0.1")
    cleanup.append(target_port)
    service = start_service(
        forward(("udp",), ("127.0.0.1", target_port.getHost().port), max_sessions=3)
    )
    cleanup.append(service)
    listen = bound_port(service, "udp")
    answered = UDPClient()
    flood = [UDPClient() for _ in range(4)]
    for c in (answered, *flood):
        cleanup.append(reactor.listenUDP(0, c, interface="127.0.0.1"))
    answered.send(b"query", listen)
    await answered.reply(reactor)
    for c in flood:
        c.send(b"flood", listen)
    await until(reactor, lambda: target.dropped == 4, "the flood at the target")

    relay = udp_relay(service)
    labels = {"protocol": "udp", "address": "127.0.0.1"}
    labels |= {"port": str(relay.config.port), "target": str(relay.config.target)}

    def value(name: str, **more: str) -> float | None:
        return service.registry.get_sample_value(name, labels | more)

    # Two flood sessions filled the table; the other two took their places.
    assert value("goma_pt_udp_sessions_ended_total", reason="evicted") == 2
    assert value("goma_pt_udp_sessions_unanswered") == 2
    assert value("goma_pt_udp_sessions_active") == 3
    assert value("goma_pt_udp_sessions_refused_total", reason="at bound") == 0


# /healthz and /readyz: the same server, real HTTP requests.


def _plain(headers: Headers) -> None:
    """The health pages' headers: plain text that no cache keeps."""
    assert headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]


@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz_answer_200_while_serving(
    reactor: Any, cleanup: list[Any]
) -> None:
    service = start_service(
        forward(target=("127.0.0.1", 9)),
        forward(("tcp", "udp"), ("127.0.0.1", 9), port=free_port()),
        metrics=METRICS,
    )
    cleanup.append(service)
    assert service.readiness() == (True, "ready")
    code, headers, body = await scrape(reactor, service, "/healthz")
    assert (code, body) == (200, b"ok\n")
    _plain(headers)
    code, headers, body = await scrape(reactor, service, "/readyz")
    assert (code, body) == (200, b"ready\n")
    _plain(headers)
    code, _, _ = await scrape(reactor, service, "/readyz/more")
    assert code == 200  # a leaf: Kubernetes and load balancers send the path as given
    code, _, _ = await scrape(reactor, service, "/ready")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_while_a_listener_is_not_bound(
    reactor: Any, cleanup: list[Any]
) -> None:
    tcp_port, both_port = free_port(), free_port()
    service = PassThroughService(
        GatewayConfig(
            "test",
            (
                forward(target=("127.0.0.1", 9), port=tcp_port),
                forward(("tcp", "udp"), ("127.0.0.1", 9), port=both_port),
            ),
        ),
        drain_timeout=0,
        metrics=METRICS,
    )
    # Before the start: the metrics server alone is up, no forward is.
    assert service.metrics is not None
    service.metrics.startService()
    cleanup.append(service)
    code, headers, body = await scrape(reactor, service, "/readyz")
    assert code == 503
    _plain(headers)
    unbound = f"tcp 127.0.0.1:{tcp_port}, tcp 127.0.0.1:{both_port}, udp 127.0.0.1:{both_port}"
    assert body == f"not listening: {unbound}\n".encode()
    code, _, body = await scrape(reactor, service, "/healthz")
    assert (code, body) == (200, b"ok\n")
    # The forwards start too (the metrics server already listens).
    service.startService()
    code, _, body = await scrape(reactor, service, "/readyz")
    assert (code, body) == (200, b"ready\n")
    # One listener of a running service stops listening.
    [udp] = [lst for lst in service.listeners if lst.protocol == "udp"]
    await udp.stopService()
    code, _, body = await scrape(reactor, service, "/readyz")
    assert (code, body) == (503, f"not listening: udp 127.0.0.1:{both_port}\n".encode())


def test_readiness_is_starting_until_the_start_completes() -> None:
    # Every listener bound by privilegedStartService (as twistd does before
    # --uid), startService not run yet: not ready.
    service = PassThroughService(
        GatewayConfig("test", (forward(target=("127.0.0.1", 9)),)), drain_timeout=0
    )
    service.privilegedStartService()
    try:
        assert service.readiness() == (False, "starting")
        service.startService()
        assert service.readiness() == (True, "ready")
    finally:
        service.stopService()
    assert service.readiness() == (False, "draining, 0 connections open")


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_during_the_drain_and_the_server_stops_last(
    reactor: Any, cleanup: list[Any]
) -> None:
    # A live connection through a service that drains for up to 30 s on
    # its own clock: between stopService and the deadline, the forward's
    # port is closed, /readyz answers 503 and /metrics still serves.
    clock = Clock()
    echo = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    cleanup.append(echo)
    service = PassThroughService(
        GatewayConfig("test", (forward(target=("127.0.0.1", echo.getHost().port)),)),
        reactor=reactor,
        clock=clock,
        drain_timeout=30,
        metrics=METRICS,
    )
    service.startService()
    forward_port = bound_port(service)
    metrics_port = service.metrics.getHost().port  # type: ignore[union-attr]
    factory = service.listeners[0].factory  # type: ignore[union-attr]
    client = Recorder(send=b"hello")
    connect(reactor, forward_port, client)
    await until(reactor, lambda: client.received == b"hello", "the echo")

    stopped = service.stopService()
    code, headers, body = await scrape(reactor, service, "/readyz")
    assert (code, body) == (503, b"draining, 1 connection open\n")
    _plain(headers)
    code, _, body = await scrape(reactor, service, "/healthz")
    assert (code, body) == (200, b"ok\n")
    code, _, body = await scrape(reactor, service, "/metrics")
    assert code == 200
    labels = {
        "protocol": "tcp",
        "address": "127.0.0.1",
        "port": "0",
        "target": f"127.0.0.1:{echo.getHost().port}",
    }
    assert Values(body.decode())("goma_pt_tcp_connections_active", **labels) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", forward_port), timeout=5).close()
    assert not stopped.called
    assert len(factory.relays) == 1

    # The deadline closes the connection; then, last, the metrics server.
    clock.advance(30)
    await client.lost.addTimeout(TIMEOUT, reactor)
    await stopped.addTimeout(TIMEOUT, reactor)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=5).close()


def test_sigterm_turns_readyz_503_while_twistd_drains(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    def get(path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    port, metrics_port = free_port(), free_port()
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen()
        target.settimeout(10)
        target_port = target.getsockname()[1]
        config = write_config(
            tmp_path / "goma.yml",
            [{"protocol": "tcp", "port": port, "address": "127.0.0.1",
              "target": f"127.0.0.1:{target_port}"}],
        )  # fmt: skip
        log = tmp_path / "goma.log"
        metrics_option = f"--metrics=tcp:{metrics_port}:interface=127.0.0.1"
        with goma_pt_running(config, log, "--drain=60", metrics_option) as proc:
            assert get("/readyz") == (200, b"ready\n")
            live = socket.create_connection(("127.0.0.1", port), timeout=10)
            upstream, _ = target.accept()
            live.sendall(b"hello")
            assert upstream.recv(5) == b"hello"
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: get("/readyz")[0] == 503, timeout=10, what="/readyz to turn 503")
            assert get("/readyz") == (503, b"draining, 1 connection open\n")
            assert get("/healthz") == (200, b"ok\n")
            assert proc.poll() is None
            # The connection still relays while the process drains.
            upstream.sendall(b"still here")
            live.settimeout(10)
            assert live.recv(10) == b"still here"
            live.close()
            upstream.close()
            proc.wait(30)  # exits once the connection is gone
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=5).close()
    assert "Stopping: 1 connection may finish within 60s" in log.read_text()


@pytest_twisted.ensureDeferred
async def test_a_site_without_readiness_serves_healthz_but_no_readyz(
    reactor: Any, cleanup: list[Any]
) -> None:
    from prometheus_client import CollectorRegistry

    site = reactor.listenTCP(0, metrics.metrics_site(CollectorRegistry()), interface="127.0.0.1")
    cleanup.append(site)
    base = f"http://127.0.0.1:{site.getHost().port}"

    async def request(method: bytes, path: str) -> tuple[int, bytes]:
        url = f"{base}{path}".encode()
        response = await Agent(reactor).request(method, url).addTimeout(TIMEOUT, reactor)
        return response.code, await readBody(response)

    assert await request(b"GET", "/healthz") == (200, b"ok\n")
    # Load balancers that check with HEAD get the code without the body.
    assert await request(b"HEAD", "/healthz") == (200, b"")
    code, _ = await request(b"GET", "/readyz")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_a_reload_that_changes_a_target_relabels_its_series() -> None:
    port = free_port()
    service = start_service(forward(("tcp", "udp"), target=("127.0.0.1", 9000), port=port))
    try:
        moved = forward(("tcp", "udp"), target=("127.0.0.1", 9010), port=port)
        assert await service.apply(GatewayConfig("test", (moved,)))
        for protocol in ("tcp", "udp"):
            labels = {
                "protocol": protocol,
                "address": "127.0.0.1",
                "port": str(port),
                "target": "127.0.0.1:9010",
            }
            name = "goma_pt_bytes_total"
            value = service.registry.get_sample_value(name, {**labels, "direction": "to_target"})
            assert value == 0
    finally:
        await service.stopService()
