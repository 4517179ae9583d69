"""The parsers the e2e tests assert through, on output captured from the real
clients (dig 9.18, redis-benchmark 7.0, iperf3 3.12). No peer runs here."""

from __future__ import annotations

import json

import pytest

from .goma import forward
from .peers import parse_dig, parse_iperf3, parse_redis_benchmark, txt_value

DIG_TRUNCATED_THEN_TCP = """\
; <<>> DiG 9.18.49-1~deb12u3-Debian <<>> @::1 -p 25353 big.e2e.test TXT +noedns
; (1 server found)
;; global options: +cmd
;; Truncated, retrying in TCP mode.
;; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 57222
;; flags: qr aa rd; QUERY: 1, ANSWER: 2, AUTHORITY: 1, ADDITIONAL: 1
;; WARNING: recursion requested but not available

;; QUESTION SECTION:
;big.e2e.test.\t\t\tIN\tTXT

;; ANSWER SECTION:
big.e2e.test.\t\t300\tIN\tTXT\t"record-00-xx"
big.e2e.test.\t\t300\tIN\tTXT\t"record-01-xx"

;; AUTHORITY SECTION:
e2e.test.\t\t300\tIN\tNS\tns1.e2e.test.

;; Query time: 0 msec
;; SERVER: ::1#25353(::1) (TCP)
;; WHEN: Thu Nov 26 10:37:24 UTC 2026
;; MSG SIZE  rcvd: 2975
"""


def test_parse_dig_reads_answers_not_other_sections() -> None:
    res = parse_dig(DIG_TRUNCATED_THEN_TCP)
    assert res.retried_tcp
    assert (res.status, res.transport, res.size) == ("NOERROR", "TCP", 2975)
    assert res.flags == {"qr", "aa", "rd"}
    assert [txt_value(r) for r in res.rdata("TXT")] == ["record-00-xx", "record-01-xx"]
    assert res.rdata("NS") == []


def test_parse_dig_of_nothing_finds_nothing() -> None:
    """A dig that printed nothing must not look like an answer."""
    res = parse_dig("")
    assert (res.answers, res.status, res.transport) == ([], "", "")


def test_parse_redis_benchmark_skips_progress_lines() -> None:
    out = (
        "PING_INLINE: rps=0.0 (overall: -nan) avg_msec=-nan (overall: -nan)\r   \r"
        "PING_INLINE: 15037.59 requests per second, p50=0.119 msec\n"
        "SET: rps=4625.5 (overall: 29769.2) avg_msec=0.112 (overall: 0.112)\r   \r"
        "SET: 29850.75 requests per second, p50=0.111 msec\n"
    )
    assert parse_redis_benchmark(out) == ({"PING_INLINE": 15037.59, "SET": 29850.75}, [])


def test_parse_redis_benchmark_reports_errors() -> None:
    out = "Error from server: ERR max number of clients reached\nGET: 1.0 requests per second\n"
    assert parse_redis_benchmark(out) == (
        {"GET": 1.0},
        ["Error from server: ERR max number of clients reached"],
    )


def test_parse_iperf3_raises_on_error() -> None:
    doc = {"start": {"connected": []}, "intervals": [], "end": {}, "error": "unable to connect"}
    with pytest.raises(AssertionError, match="unable to connect"):
        parse_iperf3(json.dumps(doc))


def test_parse_iperf3_udp_counts_the_receivers_loss() -> None:
    sent = {"seconds": 2.0, "bytes": 2_500_000, "packets": 1786, "lost_packets": 0}
    received = {**sent, "seconds": 2.01, "bytes": 2_498_600, "lost_packets": 1}
    doc = {
        "start": {"test_start": {"protocol": "UDP"}},
        "end": {"sum_sent": sent, "sum_received": received},
    }
    res = parse_iperf3(json.dumps(doc))
    assert (res.protocol, res.packets, res.lost_packets) == ("UDP", 1786, 1)
    assert (res.sent_bytes, res.received_bytes) == (2_500_000, 2_498_600)


def test_forward_brackets_ipv6_targets() -> None:
    assert forward("tcp/udp", 5353, "::1", 53, address="::1", timeout=3) == {
        "protocol": "tcp/udp",
        "port": 5353,
        "target": "[::1]:53",
        "address": "::1",
        "timeout": 3,
    }
