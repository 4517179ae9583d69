"""The benchmark harness's config generation for several processes per forwarder (bench/)."""

from __future__ import annotations

from pathlib import Path

from bench import peers
from goma_twisted.config import parse_config


def test_goma_config_shares_the_port_only_with_several_processes() -> None:
    one = parse_config(peers.goma_config(peers.Forward("udp", 5300, 5301, one_response=True)))
    two = parse_config(peers.goma_config(peers.Forward("tcp", 5300, 5301, procs=2)))
    assert [(f.reuse_port, f.udp_responses) for f in one.forwards] == [(False, 1)]
    assert [(f.reuse_port, f.port) for f in two.forwards] == [(True, 5300)]


def test_nginx_gets_a_reuseport_socket_per_worker(tmp_path: Path) -> None:
    one = peers.nginx_conf(peers.Forward("tcp", 5300, 5301), tmp_path, tuned=False)
    two = peers.nginx_conf(peers.Forward("udp", 5300, 5301, procs=2), tmp_path, tuned=False)
    assert "worker_processes 1;" in one and "listen 127.0.0.1:5300;" in one
    assert "worker_processes 2;" in two and "listen 127.0.0.1:5300 udp reuseport;" in two


def test_split_counts_sums_each_counter_over_its_series() -> None:
    page = (
        "# HELP goma_pt_bytes_total Payload bytes.\n"
        'goma_pt_bytes_total{direction="to_target",port="1"} 10.0\n'
        'goma_pt_bytes_total{direction="to_client",port="1"} 5.0\n'
        'goma_pt_tcp_connections_accepted_total{port="1"} 3.0\n'
        'goma_pt_tcp_connections_active{port="1"} 1.0\n'
    )
    assert peers.split_counts(page) == {
        "connections": 3,
        "sessions": 0,
        "datagrams": 0,
        "bytes": 15,
    }
