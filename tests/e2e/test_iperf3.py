"""iperf3 through a `tcp/udp` forward: TCP both ways, and UDP, whose test traffic
goes over UDP while its control channel is TCP on the same port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from . import procs
from .goma import Route
from .peers import IperfSummary, parse_iperf3
from .procs import LOOPBACK4, Launcher, require_binary, run

pytestmark = pytest.mark.e2e

SECONDS = 2
UDP_RATE = 10_000_000  # 10 Mbit/s: modest, so any loss is the forwarder's
# Datagrams the size of real traffic, and the largest UDP payload over IPv4.
UDP_LENGTHS = [1400, 65507]


@dataclass(frozen=True)
class Iperf3:
    port: int
    binary: str

    def client(self, port: int, *options: str) -> IperfSummary:
        argv = [self.binary, "-c", LOOPBACK4, "-p", str(port), "-t", str(SECONDS), "--json"]
        out = run([*argv, *options], timeout=SECONDS + 30, check=False)
        return parse_iperf3(out.stdout.decode())  # errors are in the JSON


@pytest.fixture
def iperf3(launcher: Launcher) -> Iterator[Iperf3]:
    """One server per test: an iperf3 server runs one test at a time."""
    binary = require_binary("iperf3")
    port = procs.free_port("tcp/udp")
    argv = [binary, "-s", "-B", LOOPBACK4, "-p", str(port), "--forceflush"]
    proc = launcher.start("iperf3-server", argv)
    # Not a TCP probe: iperf3 would take it for a client, fail that "test", and
    # may reset the real client that connects meanwhile.
    procs.wait_for_log(proc, f"Server listening on {port}")
    yield Iperf3(port, binary)


@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_iperf3_tcp(iperf3: Iperf3, route: Route, reverse: bool) -> None:
    _, port = route("tcp/udp", LOOPBACK4, iperf3.port)
    res = iperf3.client(port, *(["-R"] if reverse else []))
    assert res.protocol == "TCP"
    assert res.seconds >= SECONDS * 0.9
    assert res.received_bytes > 10 * 1024 * 1024
    # What is still in flight in socket buffers when the test ends is all that may
    # differ between what one side sent and what the other counted.
    assert res.received_bytes >= 0.9 * res.sent_bytes


@pytest.mark.parametrize("length", UDP_LENGTHS)
def test_iperf3_udp(iperf3: Iperf3, route: Route, length: int) -> None:
    _, port = route("tcp/udp", LOOPBACK4, iperf3.port)
    res = iperf3.client(port, "-u", "-b", str(UDP_RATE), "-l", str(length))
    assert res.protocol == "UDP"
    expected_packets = UDP_RATE * SECONDS // (8 * length)
    assert res.packets >= 0.9 * expected_packets
    assert res.received_bytes >= 0.9 * UDP_RATE * SECONDS / 8
    # At most 1 %, and one datagram whatever the size (a 64 KB one is 2.6 % here).
    assert res.lost_packets <= max(1, res.packets // 100), (
        f"{res.lost_packets} of {res.packets} datagrams lost"
    )
