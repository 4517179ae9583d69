"""
The per-forward counters and the collector that turns them into
Prometheus samples, without sockets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from goma_twisted import ending, policy, udp
from goma_twisted.metrics import ForwardCollector
from goma_twisted.stats import Histogram, TCPStats, UDPStats

from .support import forward


def test_histogram_buckets_hold_values_up_to_their_bound() -> None:
    histogram = Histogram((0.1, 1.0, 10.0))
    for value in (0.0, 0.1, 0.10001, 1.0, 9.0, 10.5, 99.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1, 2]
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (10.0, 5), (float("inf"), 7)]
    assert histogram.count == 7
    assert histogram.sum == 0.0 + 0.1 + 0.10001 + 1.0 + 9.0 + 10.5 + 99.0


def test_tcp_stats_count_opens_ends_and_reasons() -> None:
    stats = TCPStats(forward(), ending.TCP_END_REASONS, ending.CONNECT_FAILURES)
    for _ in range(4):
        stats.opened()
    stats.ended(ending.CLIENT_CLOSED)
    stats.ended(ending.CONNECT_REFUSED, connect_failed=True)
    stats.count_refused("denied")
    stats.count_refused("denied")
    stats.count_refused("limit")
    assert (stats.accepted, stats.active) == (4, 2)
    assert stats.closed[ending.CLIENT_CLOSED] == 1
    assert stats.closed[ending.IDLE_TIMEOUT] == 0
    assert stats.connect_failures == {
        ending.CONNECT_REFUSED: 1,
        ending.CONNECT_TIMEOUT: 0,
        ending.RESOLVE_FAILED: 0,
        ending.CONNECT_FAILED: 0,
    }
    assert stats.refused == {"denied": 2, "limit": 1}


def test_udp_stats_count_sessions_and_drops() -> None:
    stats = UDPStats(forward(("udp",)), udp.END_REASONS, udp.DROP_REASONS)
    for _ in range(3):
        stats.opened()
    stats.ended(udp.IDLE_TIMEOUT)
    stats.count_refused(policy.AT_BOUND, 5)
    stats.count_dropped(udp.QUEUE_FULL)
    stats.count_dropped(udp.RESOLVE_FAILED, 2)
    assert (stats.sessions_created, stats.sessions_active) == (3, 2)
    assert stats.sessions_ended[udp.IDLE_TIMEOUT] == 1
    assert stats.sessions_refused == {"at bound": 5}  # not seeded here
    assert stats.dropped == {
        udp.QUEUE_FULL: 1,
        udp.SEND_FAILED: 0,
        udp.REPLY_FAILED: 0,
        udp.RESOLVE_FAILED: 2,
    }


def _registry(*stats: TCPStats | UDPStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ForwardCollector(lambda: stats))
    return registry


TCP_LABELS = {"protocol": "tcp", "address": "127.0.0.1", "port": "8080", "target": "10.0.0.1:80"}
UDP_LABELS = TCP_LABELS | {"protocol": "udp", "address": "*", "port": "53", "target": "dns:53"}


def test_collector_reads_the_counters_at_each_scrape() -> None:
    tcp_stats = TCPStats(forward(port=8080, target=("10.0.0.1", 80)), ending.TCP_END_REASONS)
    udp_stats = UDPStats(forward(("udp",), ("dns", 53), port=53, address=""))
    registry = _registry(tcp_stats, udp_stats)
    value = registry.get_sample_value
    assert value("goma_pt_tcp_connections_accepted_total", TCP_LABELS) == 0
    assert value("goma_pt_tcp_connections_closed_total", TCP_LABELS | {"reason": "shutdown"}) == 0
    for _ in range(3):
        tcp_stats.opened()
    tcp_stats.bytes_to_target += 1000
    tcp_stats.bytes_to_client += 70
    tcp_stats.connected(0.003)
    tcp_stats.connected(0.2)
    tcp_stats.ended(ending.RESOLVE_FAILED, connect_failed=True)
    tcp_stats.count_refused("denied")
    udp_stats.max_sessions = 100
    udp_stats.opened()
    udp_stats.datagrams_to_target += 2
    udp_stats.bytes_to_target += 30
    udp_stats.datagrams_to_client += 1
    udp_stats.bytes_to_client += 12
    udp_stats.count_refused(policy.AT_BOUND, 4)
    udp_stats.count_dropped(udp.SEND_FAILED)
    udp_stats.unreachable += 1

    assert value("goma_pt_tcp_connections_accepted_total", TCP_LABELS) == 3
    assert value("goma_pt_tcp_connections_active", TCP_LABELS) == 2
    assert value("goma_pt_bytes_total", TCP_LABELS | {"direction": "to_target"}) == 1000
    assert value("goma_pt_bytes_total", TCP_LABELS | {"direction": "to_client"}) == 70
    failed = TCP_LABELS | {"reason": "resolve failed"}
    assert value("goma_pt_tcp_connect_failures_total", failed) == 1
    assert value("goma_pt_tcp_connections_closed_total", failed) == 1
    refused = TCP_LABELS | {"reason": "denied"}
    assert value("goma_pt_tcp_connections_refused_total", refused) == 1
    assert value("goma_pt_tcp_connect_seconds_count", TCP_LABELS) == 2
    assert value("goma_pt_tcp_connect_seconds_sum", TCP_LABELS) == 0.203
    bucket = "goma_pt_tcp_connect_seconds_bucket"
    assert value(bucket, TCP_LABELS | {"le": "0.0025"}) == 0
    assert value(bucket, TCP_LABELS | {"le": "0.005"}) == 1
    assert value(bucket, TCP_LABELS | {"le": "0.25"}) == 2
    assert value(bucket, TCP_LABELS | {"le": "+Inf"}) == 2

    assert value("goma_pt_udp_sessions_created_total", UDP_LABELS) == 1
    assert value("goma_pt_udp_sessions_active", UDP_LABELS) == 1
    assert value("goma_pt_udp_sessions_max", UDP_LABELS) == 100
    assert value("goma_pt_udp_datagrams_total", UDP_LABELS | {"direction": "to_target"}) == 2
    assert value("goma_pt_udp_datagrams_total", UDP_LABELS | {"direction": "to_client"}) == 1
    assert value("goma_pt_bytes_total", UDP_LABELS | {"direction": "to_target"}) == 30
    assert value("goma_pt_bytes_total", UDP_LABELS | {"direction": "to_client"}) == 12
    bound = UDP_LABELS | {"reason": "at bound"}
    assert value("goma_pt_udp_sessions_refused_total", bound) == 4
    dropped = UDP_LABELS | {"reason": "send failed"}
    assert value("goma_pt_udp_datagrams_dropped_total", dropped) == 1
    assert value("goma_pt_udp_target_unreachable_total", UDP_LABELS) == 1


def test_the_exposition_parses_and_has_help_and_types() -> None:
    tcp_stats = TCPStats(forward(port=8080, target=("10.0.0.1", 80)), ending.TCP_END_REASONS)
    tcp_stats.opened()
    text = generate_latest(_registry(tcp_stats)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["goma_pt_tcp_connections_accepted"].type == "counter"
    assert families["goma_pt_tcp_connections_active"].type == "gauge"
    assert families["goma_pt_tcp_connect_seconds"].type == "histogram"
    assert "# HELP goma_pt_tcp_connections_active TCP connections open now." in text
    # No UDP forward, no UDP series (the families are still described).
    assert families["goma_pt_udp_sessions_active"].samples == []


def test_a_registry_refuses_a_second_collector_of_the_same_series() -> None:
    import pytest

    registry = _registry()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(ForwardCollector(lambda: []))
