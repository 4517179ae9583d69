"""The real servers behind the forwarders: iperf3, redis, nsd, and the hold/slow helpers."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
ZONE = "bench.test"
DNS_NAMES = ("www", "ns1", "mail", "api", "@")


@dataclass
class Backend:
    port: int
    proc: procs.Proc
    files: dict[str, Path] = field(default_factory=dict)

    def stop(self) -> None:
        procs.stop(self.proc)


def _started(
    name: str, argv: list[str], workdir: Path, port: int, proto: str, stdin_pipe: bool = False
) -> Backend:
    proc = procs.start(name, argv, workdir, stdin_pipe=stdin_pipe)
    try:
        procs.wait_bound(proc, port, proto)
    except BaseException:
        procs.stop(proc)
        raise
    return Backend(port, proc)


def iperf3(workdir: Path) -> Backend:
    port = procs.free_port()
    return _started(
        "iperf3-server",
        ["iperf3", "-s", "-B", procs.LOOPBACK, "-p", str(port)],
        workdir,
        port,
        "tcp",
    )


def redis(workdir: Path) -> Backend:
    port = procs.free_port()
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        procs.LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--dir",
        str(workdir),
        "--maxclients",
        "10000",
    ]
    return _started("redis-server", argv, workdir, port, "tcp")


def _nsd_files(workdir: Path, port: int) -> tuple[Path, Path]:
    zone = workdir / f"{ZONE}.zone"
    zone.write_text(
        f"$ORIGIN {ZONE}.\n$TTL 300\n"
        "@ IN SOA ns1 hostmaster 1 3600 900 604800 300\n@ IN NS ns1\n@ IN A 127.0.0.1\n"
        + "".join(f"{n} IN A 127.0.0.1\n" for n in DNS_NAMES if n != "@")
    )
    conf = workdir / "nsd.conf"
    conf.write_text(
        "server:\n"
        f"  ip-address: {procs.LOOPBACK}@{port}\n  port: {port}\n  server-count: 1\n"
        '  username: ""\n  chroot: ""\n  database: ""\n  do-ip6: no\n  verbosity: 0\n'
        # Debian's nsd has response rate limiting on (200 q/s per /24): off for a benchmark
        "  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n"
        f"  zonesdir: {workdir}\n  pidfile: {workdir}/nsd.pid\n"
        f"  xfrdfile: {workdir}/xfrd.state\n  zonelistfile: {workdir}/zone.list\n"
        f"  logfile: {workdir}/nsd-internal.log\n"
        "remote-control:\n  control-enable: no\n"
        f"zone:\n  name: {ZONE}\n  zonefile: {zone.name}\n"
    )
    queries = workdir / "queries.txt"
    queries.write_text("".join(f"{ZONE if n == '@' else n + '.' + ZONE} A\n" for n in DNS_NAMES))
    return conf, queries


def nsd(workdir: Path) -> Backend:
    port = procs.free_port()
    conf, queries = _nsd_files(workdir, port)
    backend = _started("nsd", ["nsd", "-d", "-c", str(conf)], workdir, port, "udp")
    backend.files["queries"] = queries
    return backend


def hold_server(workdir: Path) -> Backend:
    port = procs.free_port()
    status = workdir / "hold-server.json"
    backend = _started(
        "hold-server",
        [sys.executable, str(LOADGEN), "hold-server", str(port), str(status)],
        workdir,
        port,
        "tcp",
        stdin_pipe=True,
    )
    backend.files["status"] = status
    return backend


def slow_server(workdir: Path, rate: int, seconds: float) -> Backend:
    port = procs.free_port()
    return _started(
        "slow-server",
        [sys.executable, str(LOADGEN), "slow-server", str(port), str(rate), str(seconds)],
        workdir,
        port,
        "tcp",
    )
