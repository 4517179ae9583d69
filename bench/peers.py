"""How to start each forwarder under test: goma-pt and its peers.

Each peer writes its own config into a private temp dir and listens on 127.0.0.1 only.
`direct` is no forwarder at all: clients talk to the backend (the upper limit).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import procs

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
GOMA = "goma-pt"
DIRECT = "direct"
# twistd with the benchmark's own interpreter (`python -m twisted` is `twist`, not twistd)
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    "-n",
    "--pidfile=",
    "--logfile=-",
]


@dataclass(frozen=True)
class Forward:
    """One forward to set up: `proto` is "tcp" or "udp"."""

    proto: str
    listen_port: int
    target_port: int
    one_response: bool = False  # UDP: a session ends after one reply (DNS style)


@dataclass(frozen=True)
class Peer:
    name: str
    protocols: frozenset[str]
    argv: Callable[[Forward, Path], list[str]] | None  # None: direct, nothing to start
    requires: tuple[str, ...]  # executables or files that must exist
    note: str
    idle_cap: int | None = None  # idle_mem: at most this many connections

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None if it can."""
        for need in self.requires:
            if "/" in need:
                if not Path(need).exists():
                    return f"{need} not found"
            elif shutil.which(need) is None:
                return f"{need} not installed"
        return None


@dataclass
class Running:
    peer: Peer
    port: int  # where clients connect
    proc: procs.Proc | None

    def rss_kb(self) -> int:
        return procs.tree_rss_kb(self.proc.pid) if self.proc else 0


def _goma_argv(fwd: Forward, workdir: Path) -> list[str]:
    # goma-pt has no proxy_responses: its nearest equivalent for one-reply UDP sessions is a
    # short idle timeout (2 s, like socat's -T 2); otherwise Goma's defaults.
    idle = "\n          idleTimeout: 2" if fwd.one_response else ""
    (workdir / "goma-pt.yaml").write_text(
        "gateway:\n  entryPoints:\n    passThrough:\n      forwards:\n"
        f"        - protocol: {fwd.proto}\n          port: {fwd.listen_port}\n"
        f"          address: {procs.LOOPBACK}\n"
        f"          target: {procs.LOOPBACK}:{fwd.target_port}{idle}\n"
    )
    return [*TWISTD, "goma-pt", "--config", str(workdir / "goma-pt.yaml")]


def _portforward_argv(fwd: Forward, workdir: Path) -> list[str]:
    return [
        *TWISTD,
        "portforward",
        "-p",
        f"tcp:{fwd.listen_port}:interface={procs.LOOPBACK}",
        "-h",
        procs.LOOPBACK,
        "-d",
        str(fwd.target_port),
    ]


def _socat_argv(fwd: Forward, workdir: Path) -> list[str]:
    target = f"{procs.LOOPBACK}:{fwd.target_port}"
    if fwd.proto == "tcp":
        return [
            "socat",
            f"TCP-LISTEN:{fwd.listen_port},bind={procs.LOOPBACK},fork,reuseaddr,backlog=1024",
            f"TCP:{target}",
        ]
    # A child per client address (connected socket), like a UDP session; it idles out after -T.
    return [
        "socat",
        "-T",
        "2",
        f"UDP-LISTEN:{fwd.listen_port},bind={procs.LOOPBACK},fork,reuseaddr",
        f"UDP:{target}",
    ]


def _haproxy_argv(fwd: Forward, workdir: Path) -> list[str]:
    (workdir / "haproxy.cfg").write_text(
        "global\n  nbthread 1\n\n"
        "defaults\n  mode tcp\n  maxconn 20000\n  timeout connect 5s\n"
        "  timeout client 10m\n  timeout server 10m\n\n"
        f"listen fwd\n  bind {procs.LOOPBACK}:{fwd.listen_port}\n"
        f"  server backend {procs.LOOPBACK}:{fwd.target_port}\n"
    )
    return ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]


def _nginx_conf(fwd: Forward, workdir: Path, tuned: bool) -> str:
    udp = " udp" if fwd.proto == "udp" else ""
    extra = "    proxy_buffer_size 256k;\n" if tuned else ""
    if fwd.one_response:
        extra += "    proxy_responses 1;\n"
    return (
        f"load_module {NGINX_STREAM_MODULE};\n"
        f"daemon off;\nworker_processes 1;\nworker_rlimit_nofile {procs.nofile_hard_limit()};\n"
        f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n"
        "events { worker_connections 20000; }\n"
        "stream {\n  server {\n"
        f"    listen {procs.LOOPBACK}:{fwd.listen_port}{udp};\n"
        f"    proxy_pass {procs.LOOPBACK}:{fwd.target_port};\n{extra}"
        "  }\n}\n"
    )


def _nginx_argv(tuned: bool) -> Callable[[Forward, Path], list[str]]:
    def argv(fwd: Forward, workdir: Path) -> list[str]:
        (workdir / "nginx.conf").write_text(_nginx_conf(fwd, workdir, tuned))
        return [
            "nginx",
            "-p",
            str(workdir),
            "-c",
            str(workdir / "nginx.conf"),
            "-e",
            str(workdir / "error.log"),
        ]

    return argv


TCP = frozenset({"tcp"})
BOTH = frozenset({"tcp", "udp"})

PEERS: tuple[Peer, ...] = (
    Peer(
        GOMA,
        BOTH,
        _goma_argv,
        (str(REPO_ROOT / "goma_twisted" / "tap.py"),),
        "this project, one twistd process",
    ),
    Peer(
        "portforward",
        TCP,
        _portforward_argv,
        (sys.executable,),
        "twistd portforward (Twisted's own forwarder), TCP only",
    ),
    Peer(
        "socat",
        BOTH,
        _socat_argv,
        ("socat",),
        "socat fork: one child process per TCP connection / per UDP client (-T 2), "
        "default 8 KiB buffer; idle_mem capped at 1,000 connections (1,000 processes)",
        idle_cap=1000,
    ),
    Peer("haproxy", TCP, _haproxy_argv, ("haproxy",), "HAProxy mode tcp, nbthread 1, defaults"),
    Peer(
        "nginx",
        BOTH,
        _nginx_argv(tuned=False),
        ("nginx", str(NGINX_STREAM_MODULE)),
        "nginx stream, worker_processes 1, defaults (16k buffer)",
    ),
    Peer(
        "nginx-tuned",
        BOTH,
        _nginx_argv(tuned=True),
        ("nginx", str(NGINX_STREAM_MODULE)),
        "nginx stream, worker_processes 1, proxy_buffer_size 256k",
    ),
    Peer(DIRECT, BOTH, None, (), "no forwarder: client to backend (the limit)"),
)


def by_name(names: list[str] | None) -> list[Peer]:
    if not names:
        return list(PEERS)
    known = {p.name: p for p in PEERS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown peer(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


def start_forwarder(peer: Peer, fwd: Forward, workdir: Path) -> Running:
    """Start `peer` forwarding `fwd`, wait until it listens, and return it."""
    if peer.argv is None:
        return Running(peer, fwd.target_port, None)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(REPO_ROOT)} if peer.name == GOMA else None
    proc = procs.start(peer.name, peer.argv(fwd, workdir), workdir, env=env)
    try:
        procs.wait_bound(proc, fwd.listen_port, fwd.proto)
    except BaseException:
        procs.stop(proc)
        raise
    return Running(peer, fwd.listen_port, proc)


def stop_forwarder(running: Running) -> None:
    if running.proc is not None:
        procs.stop(running.proc)
