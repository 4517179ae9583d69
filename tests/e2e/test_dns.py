"""nsd through a `tcp/udp` forward: UDP, TCP, a 3 KB EDNS answer over UDP, and
dig's fallback to TCP on a truncated answer, over IPv4 and IPv6."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import procs
from .goma import GomaPt, Route, forward
from .peers import (
    WWW_A,
    ZONE,
    DigResult,
    big_txt_records,
    nsd_conf,
    parse_dig,
    txt_value,
    zone_file,
)
from .procs import LOOPBACK4, LOOPBACK6, Launcher, Proc, require_binary, run

pytestmark = pytest.mark.e2e

FAMILIES = pytest.mark.parametrize("host", [LOOPBACK4, LOOPBACK6], ids=["ipv4", "ipv6"])
BIG = big_txt_records()


@dataclass(frozen=True)
class Nsd:
    port: int
    dig_bin: str
    argv: list[str]  # to start it again
    proc: Proc

    def dig(
        self, host: str, port: int, name: str, rtype: str, *options: str, check: bool = True
    ) -> DigResult:
        """One query, one try, bounded: dig's own retries would hide lost datagrams."""
        argv = [self.dig_bin, f"@{host}", "-p", str(port), "+tries=1", "+time=2"]
        out = run([*argv, *options, name, rtype], timeout=20, check=check)
        return parse_dig(out.stdout.decode())


def start_nsd(launcher: Launcher, argv: list[str], port: int) -> Proc:
    proc = launcher.start("nsd", argv)
    procs.wait_for_log(proc, "nsd started")
    procs.wait_for_tcp(proc, LOOPBACK4, port)
    return proc


@pytest.fixture
def nsd(launcher: Launcher, tmp_path: Path) -> Iterator[Nsd]:
    """Authoritative nsd for e2e.test. on 127.0.0.1 and ::1, UDP and TCP."""
    nsd_bin, dig_bin = require_binary("nsd"), require_binary("dig")
    d = tmp_path / "nsd"
    d.mkdir()
    (d / "e2e.test.zone").write_text(zone_file(big=BIG))
    port = procs.free_port("tcp/udp", [LOOPBACK4, LOOPBACK6])
    cfg = d / "nsd.conf"
    cfg.write_text(nsd_conf(port, [LOOPBACK4, LOOPBACK6], d, "e2e.test.zone"))
    argv = [nsd_bin, "-d", "-c", str(cfg)]
    yield Nsd(port, dig_bin, argv, start_nsd(launcher, argv, port))


def assert_big_complete(res: DigResult) -> None:
    assert res.status == "NOERROR"
    assert sorted(txt_value(r) for r in res.rdata("TXT")) == sorted(BIG)


@FAMILIES
def test_dns_answers_over_udp_and_tcp(nsd: Nsd, route: Route, host: str) -> None:
    dial_host, port = route("tcp/udp", host, nsd.port)
    www = f"www.{ZONE}"

    udp = nsd.dig(dial_host, port, www, "A")
    assert (udp.transport, udp.status, "aa" in udp.flags) == ("UDP", "NOERROR", True)
    assert udp.answers == [(www, "A", WWW_A)]

    tcp = nsd.dig(dial_host, port, www, "AAAA", "+tcp")
    assert (tcp.transport, tcp.status) == ("TCP", "NOERROR")
    assert tcp.answers == [(www, "AAAA", "::42")]

    missing = nsd.dig(dial_host, port, f"nope.{ZONE}", "A")
    assert (missing.status, missing.answers) == ("NXDOMAIN", [])


@FAMILIES
def test_dns_edns_answer_over_512_bytes_by_udp(nsd: Nsd, route: Route, host: str) -> None:
    """A 3 KB answer in one UDP datagram: +ignore keeps dig from quietly using TCP."""
    dial_host, port = route("tcp/udp", host, nsd.port)
    res = nsd.dig(dial_host, port, f"big.{ZONE}", "TXT", "+bufsize=4096", "+ignore")
    assert res.transport == "UDP"
    assert "tc" not in res.flags
    assert not res.retried_tcp
    assert res.size > 1232  # over plain DNS's 512 and the usual EDNS default
    assert_big_complete(res)


@FAMILIES
def test_dns_truncated_udp_answer_retries_over_tcp(nsd: Nsd, route: Route, host: str) -> None:
    """Without EDNS the answer does not fit 512 bytes: nsd sets TC, dig asks again
    over TCP on the same forward, and gets every record."""
    dial_host, port = route("tcp/udp", host, nsd.port)
    res = nsd.dig(dial_host, port, f"big.{ZONE}", "TXT", "+noedns")
    assert res.retried_tcp
    assert res.transport == "TCP"
    assert "tc" not in res.flags
    assert_big_complete(res)


def _assert_www_both_ways(nsd: Nsd, host: str, port: int) -> None:
    www = f"www.{ZONE}"
    for options, transport in (((), "UDP"), (("+tcp",), "TCP")):
        res = nsd.dig(host, port, www, "A", *options)
        assert (res.transport, res.answers) == (transport, [(www, "A", WWW_A)])


def test_dns_forward_without_address_takes_ipv4_and_ipv6(nsd: Nsd, goma_pt: GomaPt) -> None:
    """An operator's forward names no address: goma-pt listens on every address,
    and IPv4 (to a dual-stack socket) and IPv6 clients both get answers."""
    port = procs.free_port("tcp/udp", ["0.0.0.0", "::"])
    goma_pt(forward("tcp/udp", port, LOOPBACK4, nsd.port))
    for host in (LOOPBACK4, LOOPBACK6):
        _assert_www_both_ways(nsd, host, port)


def test_dns_hostname_target(nsd: Nsd, goma_pt: GomaPt) -> None:
    """A target named by hostname is resolved per connection and per UDP session;
    nsd listens on both loopbacks, so either address `localhost` gives will do."""
    port = procs.free_port("tcp/udp")
    goma_pt(forward("tcp/udp", port, "localhost", nsd.port, address=LOOPBACK4))
    _assert_www_both_ways(nsd, LOOPBACK4, port)


def test_dns_udp_session_expires_and_comes_back(nsd: Nsd, goma_pt: GomaPt) -> None:
    """With `timeout: 1` a client's UDP session ends after a second of silence; the
    same client address (dig -b pins the source port) then gets a fresh session."""
    port = procs.free_port("tcp/udp")
    proc = goma_pt(forward("tcp/udp", port, LOOPBACK4, nsd.port, address=LOOPBACK4, timeout=1))
    source = ("-b", f"{LOOPBACK4}#{procs.free_port('udp')}")
    www = f"www.{ZONE}"
    assert nsd.dig(LOOPBACK4, port, www, "A", *source).rdata("A") == [WWW_A]
    procs.wait_for_log(proc, "idle timeout", timeout=5)
    assert nsd.dig(LOOPBACK4, port, www, "A", *source).rdata("A") == [WWW_A]


def test_dns_udp_session_survives_a_target_restart(
    nsd: Nsd, goma_pt: GomaPt, launcher: Launcher
) -> None:
    """nsd restarts under a live UDP session: queries while it is down go
    unanswered (ICMP port unreachable on the session's socket), and once it is
    back the same client, on the same session, is answered again."""
    port = procs.free_port("tcp/udp")
    goma_pt(forward("tcp/udp", port, LOOPBACK4, nsd.port, address=LOOPBACK4))
    source = ("-b", f"{LOOPBACK4}#{procs.free_port('udp')}")
    www = f"www.{ZONE}"
    assert nsd.dig(LOOPBACK4, port, www, "A", *source).rdata("A") == [WWW_A]

    procs.stop(nsd.proc)
    assert nsd.dig(LOOPBACK4, port, www, "A", *source, check=False).answers == []
    start_nsd(launcher, nsd.argv, nsd.port)
    assert nsd.dig(LOOPBACK4, port, www, "A", *source).rdata("A") == [WWW_A]
