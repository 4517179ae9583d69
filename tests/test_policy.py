"""
Allow/deny, bounds, the descriptor budget and the refusal log, without sockets.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from goma_twisted import policy
from goma_twisted.policy import (
    AddressPolicy,
    Bounds,
    RefusalLog,
    parse_ip,
    parse_network,
    plan_budget,
)


def nets(*texts: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("example.com", None),
        ("", None),
    ],
)
def test_client_addresses_are_normalised(host: str, expected: str | None) -> None:
    address = parse_ip(host)
    assert (str(address) if address else None) == expected


ALLOW_DENY = AddressPolicy(
    allow=nets("10.0.0.0/8", "2001:db8::/32"), deny=nets("10.9.0.0/16", "2001:db8:bad::/48")
)


@pytest.mark.parametrize(
    ("host", "admitted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 client of a dual-stack listener
        ("10.9.1.1", False),  # in allow and deny: deny wins
        ("::ffff:10.9.1.1", False),
        ("192.0.2.1", False),  # not in the allow list
        ("2001:db8::1", True),
        ("2001:db8:bad::1", False),
        ("2001:db9::1", False),
    ],
)
def test_deny_wins_then_the_allow_list(host: str, admitted: bool) -> None:
    assert ALLOW_DENY.permits(parse_ip(host)) is admitted


def test_deny_only_admits_everyone_else() -> None:
    only_deny = AddressPolicy(deny=nets("192.0.2.0/24"))
    assert not only_deny.permits(parse_ip("192.0.2.200"))
    assert only_deny.permits(parse_ip("198.51.100.1"))
    assert only_deny.permits(parse_ip("::1"))


def test_no_lists_admit_everyone() -> None:
    assert AddressPolicy().permits(parse_ip("203.0.113.9"))
    assert AddressPolicy().permits(None)
    assert not ALLOW_DENY.permits(None)


@given(
    st.ip_addresses(),
    st.lists(st.ip_addresses().map(lambda a: ipaddress.ip_network(a)), max_size=4),
    st.lists(st.ip_addresses().map(lambda a: ipaddress.ip_network(a)), max_size=4),
)
def test_policy_is_order_free_and_deny_wins(
    address: Any, allow: list[Any], deny: list[Any]
) -> None:
    forward = AddressPolicy(tuple(allow), tuple(deny))
    backward = AddressPolicy(tuple(reversed(allow)), tuple(reversed(deny)))
    assert forward.permits(address) == backward.permits(address)
    if any(address in n for n in deny if n.version == address.version):
        assert not forward.permits(address)


@pytest.mark.parametrize(
    ("text", "network", "why"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", ""),
        ("10.1.2.3", "10.1.2.3/32", ""),
        ("2001:db8::/32", "2001:db8::/32", ""),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8", ""),
        ("::ffff:10.0.0.1", "10.0.0.1/32", ""),
        ("10.0.0.1/8", None, "did you mean 10.0.0.0/8?"),
        ("10.0.0.0/40", None, "not an IP address or CIDR block"),
        ("any", None, "not an IP address or CIDR block"),
    ],
)
def test_config_networks(text: str, network: str | None, why: str) -> None:
    parsed, message = parse_network(text)
    assert (str(parsed) if parsed else None) == network
    assert why in message


def test_bounds_total_and_per_address() -> None:
    bounds = Bounds(total=3, per_ip=2)
    a, b = parse_ip("192.0.2.1"), parse_ip("192.0.2.2")
    assert bounds.admit(a) is None
    assert bounds.admit(a) is None
    assert bounds.admit(a) == policy.AT_BOUND_PER_IP
    assert bounds.admit(b) is None
    assert bounds.admit(b) == policy.AT_BOUND
    assert bounds.full()
    bounds.release(a)
    assert bounds.admit(b) is None
    assert (bounds.open, bounds.by_ip) == (3, {"192.0.2.1": 1, "192.0.2.2": 2})
    for address in (a, b, b):
        bounds.release(address)
    assert (bounds.open, bounds.by_ip) == (0, {})


@pytest.mark.parametrize(
    ("host", "text"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("not an address", "None"),
    ],
)
def test_ip_text_is_the_text_of_the_parsed_address(host: str, text: str) -> None:
    assert policy.ip_text(host) == text == str(parse_ip(host))


def test_bounds_count_under_the_key_given() -> None:
    # A caller that has str(address) at hand (policy.ip_text) passes it.
    bounds = Bounds(total=3, per_ip=1)
    a = parse_ip("::ffff:192.0.2.1")
    assert bounds.admit(a, key=policy.ip_text("::ffff:192.0.2.1")) is None
    assert bounds.admit(parse_ip("192.0.2.1")) == policy.AT_BOUND_PER_IP
    assert bounds.by_ip == {"192.0.2.1": 1}
    bounds.release(a, key="192.0.2.1")
    assert (bounds.open, bounds.by_ip) == (0, {})


def test_bounds_counted_before_the_client_is_known() -> None:
    # A connection behind a load balancer counts from accept; its client
    # (from the PROXY header) is checked against the per-address bound later.
    bounds = Bounds(total=2, per_ip=1)
    bounds.count()
    assert bounds.admit(parse_ip("192.0.2.1"), counted=True) is None
    bounds.count()
    assert bounds.full()
    assert bounds.admit(parse_ip("192.0.2.1"), counted=True) == policy.AT_BOUND_PER_IP
    bounds.release(None, admitted=False)
    bounds.release(parse_ip("192.0.2.1"))
    assert (bounds.open, bounds.by_ip) == (0, {})


def test_budget_defaults_fit_the_descriptor_limit() -> None:
    budget = plan_budget(20000, 100, tcp=[None, None], udp=[None])
    usable = 20000 - 100 - policy.RESERVED_FDS
    assert budget.usable == usable
    [(t1, d1), (t2, d2)], [(u, du)] = budget.tcp, budget.udp
    assert d1 and d2 and du
    assert t1 == t2 == usable // 2 // 2 // 2
    assert u == usable - usable // 2
    assert budget.needed <= usable and not budget.overcommitted


def test_budget_shares_what_configured_bounds_leave() -> None:
    budget = plan_budget(1024, 24, tcp=[100, None], udp=[300])
    reserved = policy.RESERVED_FDS
    assert budget.tcp == ((100, False), ((1024 - 24 - reserved - 200 - 300) // 2, True))
    assert budget.udp == ((300, False),)
    assert not budget.overcommitted


def test_budget_says_when_configured_bounds_do_not_fit() -> None:
    budget = plan_budget(1024, 24, tcp=[1000], udp=[None])
    assert budget.tcp == ((1000, False),)
    assert budget.udp == ((policy.MIN_DEFAULT_BOUND, True),)
    assert budget.overcommitted


@given(
    st.integers(256, 1 << 20),
    st.integers(0, 200),
    st.lists(st.none(), max_size=5),
    st.lists(st.none(), max_size=5),
)
def test_default_bounds_never_exceed_the_limit(
    limit: int, in_use: int, tcp: list[None], udp: list[None]
) -> None:
    budget = plan_budget(limit, in_use, list(tcp), list(udp))
    # Whenever the limit leaves room for the smallest default bound of
    # each forward, the derived bounds all fit.
    if budget.usable >= policy.MIN_DEFAULT_BOUND * 2 * (2 * len(tcp) + len(udp)):
        assert not budget.overcommitted
    assert all(bound >= policy.MIN_DEFAULT_BOUND for bound, _ in budget.tcp + budget.udp)


def test_refusal_log_is_rate_limited() -> None:
    clock = Clock()
    events: list[dict[str, Any]] = []
    refusals = RefusalLog(lambda fmt, **kw: events.append(kw), clock, interval=10)
    for _ in range(1000):
        refusals.refused("tcp 22", "192.0.2.1:5000", policy.DENIED)
    refusals.refused("tcp 22", "192.0.2.1:5000", policy.AT_BOUND)
    assert [(e["refusal"], e["suppressed"]) for e in events] == [
        (policy.DENIED, 0),
        (policy.AT_BOUND, 0),
    ]
    clock.advance(10)
    refusals.refused("tcp 22", "192.0.2.9:5000", policy.DENIED)
    assert (events[-1]["client"], events[-1]["suppressed"]) == ("192.0.2.9:5000", 999)
    assert events[-1]["suppressedNote"] == " (999 more not logged in the last 10s)"


def test_refusal_details_do_not_escape_the_rate_limit() -> None:
    # The detail of a bad header comes from the peer's bytes: a flood of
    # different ones is still one event per interval.
    clock = Clock()
    events: list[dict[str, Any]] = []
    refusals = RefusalLog(lambda fmt, **kw: events.append(kw), clock, interval=10)
    for i in range(100):
        refusals.refused("tcp 443", "192.0.2.1:5000", policy.BAD_HEADER, f"detail {i}")
    assert [e["detail"] for e in events] == ["detail 0"]
    assert events[0]["detailNote"] == " (detail 0)"
