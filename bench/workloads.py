"""The workloads: which backend each needs and how its client measures one forwarder."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import backends, procs
from bench.peers import Running

Detail = dict[str, object]


@dataclass(frozen=True)
class Params:
    """Sizes of each workload; every loop is bounded by these counts and times."""

    bulk_seconds: int = 3
    ping_requests: int = 50_000
    conn_requests: int = 10_000
    udp_seconds: int = 3
    churn_max_queries: int = 40_000
    churn_parallel: int = 10
    # 10,000 is the goal, but a forwarder needs 2 fds per connection and the hard
    # RLIMIT_NOFILE here is 20,000: 9,900 is the largest round count that fits.
    idle_connections: int = 9_900
    slow_seconds: float = 3.0
    slow_rate: int = 4 << 20  # bytes/s the slow reader consumes
    slow_max_bytes: int = 512 << 20
    # load-client parallelism, N with --procs N: iperf3 -P N, dnsperf -T N, N udp-churn
    # processes (the same total in flight); redis-benchmark stays single-threaded
    clients: int = 1
    # The unmeasured warm-up run of the same workload before each measurement (every peer),
    # long enough for PyPy's JIT: goma-pt-pypy's CPU per new connection was 840 us over the
    # first 2,000, about 300 over the next 4,000 and 225-275 after 8,000; per request 41 us
    # over the first 10,000, 24 after 20,000; per churned UDP session 208 us over the first
    # 5,000, 100-118 after. Bulk and udp_dns showed no warm-up effect (1 s is plenty).
    warmup: bool = True
    warm_bulk_seconds: int = 1
    warm_udp_seconds: int = 2  # udp_dns, and udp_churn's time bound
    warm_ping_requests: int = 20_000
    warm_conn_requests: int = 10_000
    warm_churn_queries: int = 10_000


QUICK = Params(
    bulk_seconds=1,
    ping_requests=20_000,
    conn_requests=3_000,
    udp_seconds=1,
    churn_max_queries=5_000,
    idle_connections=1_000,
    slow_seconds=1.0,
    warm_udp_seconds=1,
    warm_ping_requests=10_000,
    warm_conn_requests=3_000,
    warm_churn_queries=3_000,
)


@dataclass
class Measurement:
    value: float
    detail: Detail = field(default_factory=dict)


Measure = Callable[[Running, backends.Backend, Params], Measurement]
StartBackend = Callable[[Path, Params], backends.Backend]


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    proto: str
    unit: str
    higher_is_better: bool
    start_backend: StartBackend
    measure: Measure
    one_response: bool = False  # UDP: ask forwarders to end a session after one reply
    needs_forwarder: bool = False  # meaningless for `direct`


def _iperf3(reverse: bool) -> Measure:
    def measure(fwd: Running, backend: backends.Backend, p: Params) -> Measurement:
        argv = [
            "iperf3",
            "-c",
            procs.LOOPBACK,
            "-p",
            str(fwd.port),
            "-t",
            str(p.bulk_seconds),
            "--json",
        ] + (["-R"] if reverse else [])
        if p.clients > 1:
            argv += ["-P", str(p.clients)]
        out = json.loads(procs.run_tool(argv, timeout=p.bulk_seconds + 30))
        received = out["end"]["sum_received"]
        return Measurement(
            received["bits_per_second"] / 8e9,
            {"bytes": received["bytes"], "seconds": received["seconds"], "streams": p.clients},
        )

    return measure


def _redis_benchmark(keepalive: bool) -> Measure:
    def measure(fwd: Running, backend: backends.Backend, p: Params) -> Measurement:
        requests = p.ping_requests if keepalive else p.conn_requests
        argv = [
            "redis-benchmark",
            "-h",
            procs.LOOPBACK,
            "-p",
            str(fwd.port),
            "-t",
            "ping_mbulk",
            "-c",
            "20",
            "-n",
            str(requests),
            "--csv",
        ] + ([] if keepalive else ["-k", "0"])
        # No --threads with --procs N: redis-benchmark 7.0's threaded mode ends its clock on a
        # 250 ms timer (rates come out as requests / k*0.25 s), and was slower here.
        out = procs.run_tool(argv, timeout=120)
        rows = [line.replace('"', "").split(",") for line in out.strip().splitlines()]
        data = dict(zip(rows[0], rows[-1], strict=False))
        return Measurement(
            float(data["rps"]),
            {"requests": requests, "p50_ms": float(data.get("p50_latency_ms", 0))},
        )

    return measure


def _dnsperf(fwd: Running, backend: backends.Backend, p: Params) -> Measurement:
    argv = [
        "dnsperf",
        "-s",
        procs.LOOPBACK,
        "-p",
        str(fwd.port),
        "-d",
        str(backend.files["queries"]),
        "-c",
        "10",
        "-l",
        str(p.udp_seconds),
        "-t",
        "1",
    ]
    if p.clients > 1:
        argv += ["-T", str(p.clients)]
    out = procs.run_tool(argv, timeout=p.udp_seconds + 30)
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    completed = re.search(r"Queries completed:\s+(\d+)", out)
    if qps is None:
        raise RuntimeError(f"dnsperf printed no rate: {out[-400:]}")
    return Measurement(
        float(qps.group(1)),
        {
            "lost": int(lost.group(1)) if lost else None,
            "completed": int(completed.group(1)) if completed else None,
        },
    )


def _udp_churn(fwd: Running, backend: backends.Backend, p: Params) -> Measurement:
    if p.clients > 1:
        return _udp_churn_parallel(fwd, p)
    argv = [
        sys.executable,
        str(backends.LOADGEN),
        "udp-churn",
        str(fwd.port),
        str(p.udp_seconds),
        str(p.churn_max_queries),
        str(p.churn_parallel),
    ]
    out = json.loads(procs.run_tool(argv, timeout=p.udp_seconds + 30))
    return Measurement(float(out["qps"]), {k: out[k] for k in ("sent", "answered", "lost")})


def _udp_churn_parallel(fwd: Running, p: Params) -> Measurement:
    """`p.clients` udp-churn processes at once, sharing the queries and the in-flight count."""
    argv = [
        sys.executable,
        str(backends.LOADGEN),
        "udp-churn",
        str(fwd.port),
        str(p.udp_seconds),
        str(p.churn_max_queries // p.clients),
        str(max(1, p.churn_parallel // p.clients)),
    ]
    clients = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(p.clients)
    ]
    outs: list[dict[str, float]] = []
    try:
        for client in clients:
            stdout, stderr = client.communicate(timeout=p.udp_seconds + 30)
            if client.returncode != 0:
                raise RuntimeError(f"udp-churn exited {client.returncode}: {stderr[-400:]!r}")
            outs.append(json.loads(stdout))
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    answered = sum(o["answered"] for o in outs)
    detail: Detail = {k: sum(o[k] for o in outs) for k in ("sent", "answered", "lost")}
    return Measurement(answered / max(o["seconds"] for o in outs), detail)


def _read_status(path: Path) -> dict[str, int]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _wait_held(status: Path, target: int, timeout: float = 150.0) -> int:
    """Wait until the backend holds `target` connections or the count stops growing."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        held = _read_status(status).get("held", 0)
        if held >= target:
            return held
        if held != last:
            last, last_change = held, time.monotonic()
        elif time.monotonic() - last_change > 10.0:
            break
        time.sleep(0.2)
    return max(last, 0)


def _idle_memory(fwd: Running, backend: backends.Backend, p: Params) -> Measurement:
    count = min(p.idle_connections, fwd.peer.idle_cap or p.idle_connections)
    base = fwd.rss_kb()
    workdir = backend.proc.log.parent
    client_status = workdir / "hold-client.json"
    client = procs.start(
        "hold-client",
        [
            sys.executable,
            str(backends.LOADGEN),
            "hold-client",
            str(fwd.port),
            str(count),
            str(client_status),
            str(backend.files["status"]),
        ],
        workdir,
        stdin_pipe=True,
    )
    try:
        held = _wait_held(backend.files["status"], count)
        time.sleep(1.0)
        held = _read_status(backend.files["status"]).get("held", held)
        rss = fwd.rss_kb()
        fds = sum(procs.fd_count(pid) for pid in fwd.pids())
    finally:
        procs.stop(client)
    if held <= 0:
        raise RuntimeError("no connection reached the backend")
    detail: Detail = {
        "held": held,
        "target": count,
        "base_kb": base,
        "rss_kb": rss,
        "forwarder_fds": fds,
        "client": _read_status(client_status),
    }
    return Measurement((rss - base) / held, detail)


def _slow_reader_memory(fwd: Running, backend: backends.Backend, p: Params) -> Measurement:
    base = fwd.rss_kb()
    argv = [
        sys.executable,
        str(backends.LOADGEN),
        "blast",
        str(fwd.port),
        str(p.slow_seconds),
        str(p.slow_max_bytes),
    ]
    sender = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = base
    try:
        deadline = time.monotonic() + p.slow_seconds + 20
        while sender.poll() is None and time.monotonic() < deadline:
            peak = max(peak, fwd.rss_kb())
            time.sleep(0.05)
    finally:
        if sender.poll() is None:
            sender.kill()
        out = sender.communicate(timeout=10)[0].decode(errors="replace")
    sent = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return Measurement((peak - base) / 1024, {"base_kb": base, "peak_kb": peak, **sent})


def _backend(start: Callable[[Path], backends.Backend]) -> StartBackend:
    return lambda workdir, _p: start(workdir)


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "bulk_up",
        "TCP bulk, client to server (iperf3)",
        "tcp",
        "GB/s",
        True,
        _backend(backends.iperf3),
        _iperf3(reverse=False),
    ),
    Workload(
        "bulk_down",
        "TCP bulk, server to client (iperf3 -R)",
        "tcp",
        "GB/s",
        True,
        _backend(backends.iperf3),
        _iperf3(reverse=True),
    ),
    Workload(
        "tcp_rr",
        "TCP request/response, 20 persistent conns (redis PING)",
        "tcp",
        "req/s",
        True,
        _backend(backends.redis),
        _redis_benchmark(keepalive=True),
    ),
    Workload(
        "tcp_connect",
        "TCP new connection per request (redis PING -k 0)",
        "tcp",
        "req/s",
        True,
        _backend(backends.redis),
        _redis_benchmark(keepalive=False),
    ),
    Workload(
        "udp_dns",
        "UDP request/response, 10 sockets (dnsperf -> nsd)",
        "udp",
        "q/s",
        True,
        _backend(backends.nsd),
        _dnsperf,
    ),
    Workload(
        "udp_churn",
        "UDP session churn, new source port per query (-> nsd)",
        "udp",
        "q/s",
        True,
        _backend(backends.nsd),
        _udp_churn,
        one_response=True,
    ),
    Workload(
        "idle_mem",
        "Memory per idle proxied TCP connection",
        "tcp",
        "KB/conn",
        False,
        _backend(backends.hold_server),
        _idle_memory,
        needs_forwarder=True,
    ),
    Workload(
        "slow_mem",
        "Peak RSS growth, bulk into a slow reader",
        "tcp",
        "MB",
        False,
        lambda workdir, p: backends.slow_server(workdir, p.slow_rate, p.slow_seconds + 5),
        _slow_reader_memory,
        needs_forwarder=True,
    ),
)


# Memory per connection does not change with the process count: left out of --procs N runs
# unless asked for (then RSS is summed over the processes).
MEMORY = ("idle_mem", "slow_mem")


def warmup_params(wl: Workload, p: Params) -> Params | None:
    """The sizes of `wl`'s warm-up run, or None when it has none.

    The memory workloads have none: they measure RSS growth from the forwarder's state at
    the start, not speed.
    """
    if not p.warmup or wl.key in MEMORY:
        return None
    return dataclasses.replace(
        p,
        bulk_seconds=p.warm_bulk_seconds,
        udp_seconds=p.warm_udp_seconds,
        ping_requests=p.warm_ping_requests,
        conn_requests=p.warm_conn_requests,
        churn_max_queries=p.warm_churn_queries,
    )


def by_key(keys: list[str] | None, procs: int = 1) -> list[Workload]:
    if not keys:
        if procs > 1:
            return [w for w in WORKLOADS if w.key not in MEMORY]
        return list(WORKLOADS)
    known = {w.key: w for w in WORKLOADS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[k] for k in keys]
