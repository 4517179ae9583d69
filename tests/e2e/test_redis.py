"""redis-server through a `tcp` forward: a 1 MB value, and redis-benchmark with 50 clients."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import procs
from .goma import Route
from .peers import parse_redis_benchmark
from .procs import LOOPBACK4, Launcher, require_binary, run

pytestmark = pytest.mark.e2e

REQUESTS, CLIENTS = 20_000, 50
BENCH_TESTS = {"PING_INLINE", "PING_MBULK", "SET", "GET"}  # what -t ping,set,get runs


@dataclass(frozen=True)
class Redis:
    port: int
    cli_bin: str
    benchmark_bin: str

    def cli(self, port: int, *args: str, input: bytes | None = None) -> bytes:
        return run([self.cli_bin, "-h", LOOPBACK4, "-p", str(port), *args], input=input).stdout

    def stats(self) -> dict[str, str]:
        """INFO stats, asked of the server itself, not through the forward."""
        text = self.cli(self.port, "INFO", "stats").decode()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


@pytest.fixture
def redis(launcher: Launcher, tmp_path: Path) -> Iterator[Redis]:
    server = require_binary("redis-server")
    cli, bench = require_binary("redis-cli"), require_binary("redis-benchmark")
    port = procs.free_port("tcp")
    argv = [server, "--port", str(port), "--bind", LOOPBACK4, "--save", "", "--appendonly", "no"]
    argv += ["--daemonize", "no", "--dir", str(tmp_path), "--maxclients", "200"]
    proc = launcher.start("redis-server", argv)
    procs.wait_for_log(proc, "Ready to accept connections")
    yield Redis(port, cli, bench)


def test_redis_set_get_1mb_value(redis: Redis, route: Route) -> None:
    _, port = route("tcp", LOOPBACK4, redis.port)
    value = os.urandom(512 * 1024).hex().encode()  # 1 MiB, printable: no CLI quoting
    assert redis.cli(port, "-x", "SET", "e2e:big", input=value).strip() == b"OK"

    got = redis.cli(port, "GET", "e2e:big")
    assert got.removesuffix(b"\n") == value
    # The server itself holds exactly what went in.
    assert redis.cli(redis.port, "STRLEN", "e2e:big").strip() == str(len(value)).encode()
    stored = redis.cli(redis.port, "GET", "e2e:big").removesuffix(b"\n")
    assert hashlib.sha256(stored).digest() == hashlib.sha256(value).digest()


def test_redis_benchmark_50_clients(redis: Redis, route: Route) -> None:
    _, port = route("tcp", LOOPBACK4, redis.port)
    before = redis.stats()
    argv = [redis.benchmark_bin, "-h", LOOPBACK4, "-p", str(port)]
    argv += ["-n", str(REQUESTS), "-c", str(CLIENTS), "-t", "ping,set,get", "-q"]
    out = run(argv, timeout=120)
    rates, errors = parse_redis_benchmark(out.stdout.decode() + out.stderr.decode())
    assert errors == []
    assert set(rates) == BENCH_TESTS
    assert all(rate > 0 for rate in rates.values())

    after = redis.stats()
    commands = int(after["total_commands_processed"]) - int(before["total_commands_processed"])
    connections = int(after["total_connections_received"]) - int(
        before["total_connections_received"]
    )
    assert commands >= REQUESTS * len(BENCH_TESTS)
    assert connections >= CLIENTS * len(BENCH_TESTS)
    assert after["rejected_connections"] == "0"
