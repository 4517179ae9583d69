"""How to start each forwarder under test: goma-pt and its peers.

Each peer writes its own config into a private temp dir and listens on 127.0.0.1 only.
`direct` is no forwarder at all: clients talk to the backend (the upper limit).
`goma-pt-pypy` is goma-pt's own twistd, config and code run by PyPy from the venv that
bench/install.sh makes (`run.py --pypy` points at another).
`goma-pt` runs the relay goma-pt picks by default (`--relay auto`: the accelerated one where
it was tested), `goma-pt-plain` the same checkout with `--relay plain` (the relay on Twisted's
public API only), and `goma-pt-old` another goma-pt tree (`run.py --old-tree DIR`, e.g. an
older commit checked out apart): its code and its twistd plugin dropin come from that tree
through PYTHONPATH, for a paired A/B of two versions in the same run.

With `procs` > 1 (`run.py --procs N`) a peer that can use N cores is set up to: goma-pt as N
twistd processes on one config with `reusePort: true`, nginx with N workers and `reuseport`,
HAProxy with `nbthread N`; the one-process peers (socat, portforward) are skipped.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
GOMA = "goma-pt"
GOMA_ONE = "goma-pt-1p"  # one goma-pt process in a --procs N run: what the others add
GOMA_PYPY = "goma-pt-pypy"  # goma-pt's twistd, same code and config, on PyPy
GOMA_PLAIN = "goma-pt-plain"  # goma-pt with --relay plain
GOMA_PYPY_PLAIN = "goma-pt-pypy-plain"  # the same on PyPy
GOMA_OLD = "goma-pt-old"  # the goma-pt of another tree (run.py --old-tree)
DIRECT = "direct"
# The PyPy venv of bench/install.sh: goma-pt's runtime dependencies, not goma-pt itself
# (the checkout's code comes from PYTHONPATH, as for goma-pt). `run.py --pypy` overrides it.
PYPY_VENV = Path("/opt/goma-pt-pypy")
# goma-pt's default relay mode comes from this variable when set: the benchmark clears it, so
# that goma-pt is the default (auto) relay whatever the shell that runs the benchmark says.
RELAY_ENVIRONMENT = "GOMA_PT_RELAY"


def twistd(python: str) -> list[str]:
    """twistd run by `python` (`python -m twisted` is `twist`, not twistd)."""
    return [
        python,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        "--logfile=-",
    ]


# twistd with the benchmark's own interpreter
TWISTD = twistd(sys.executable)


@dataclass(frozen=True)
class Forward:
    """One forward to set up: `proto` is "tcp" or "udp"."""

    proto: str
    listen_port: int
    target_port: int
    one_response: bool = False  # UDP: a session ends after one reply (DNS style)
    procs: int = 1  # processes / workers / threads the forwarder may use


@dataclass(frozen=True)
class Peer:
    name: str
    protocols: frozenset[str]
    argv: Callable[[Forward, Path], list[str]] | None  # None: direct, nothing to start
    requires: tuple[str, ...]  # executables or files that must exist
    note: str
    idle_cap: int | None = None  # idle_mem: at most this many connections
    multi_note: str | None = None  # how it runs with procs > 1; None: it cannot (skipped)
    procs: int | None = None  # always this many processes, whatever the run's (a reference)
    tree: Path | None = None  # a goma-pt: the tree its twistd runs (its PYTHONPATH)
    default: bool = True  # in a run that names no peers (`--peers` can always name it)
    unavailable: str | None = None  # why it cannot run whatever is installed (an option unset)

    def describe(self, procs: int = 1) -> str:
        """The note for a run with `procs` processes per forwarder."""
        if procs == 1 or self.multi_note is None:
            return self.note
        return self.multi_note.replace("{n}", str(procs))

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None if it can."""
        if self.unavailable is not None:
            return self.unavailable
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
    more: list[procs.Proc] = field(default_factory=list)  # goma-pt's processes after the first
    metrics_ports: list[int] = field(default_factory=list)  # goma-pt with procs > 1: one each

    def pids(self) -> list[int]:
        """Every process of the forwarder (workers and children included)."""
        tops = ([self.proc] if self.proc else []) + self.more
        return [pid for top in tops for pid in procs.process_tree(top.pid)]

    def rss_kb(self) -> int:
        return sum(procs.rss_kb(pid) for pid in self.pids())


def goma_env(peer: Peer) -> dict[str, str] | None:
    """The environment a goma-pt peer's twistd adds: its tree first on the path."""
    if peer.tree is None:
        return None
    return {"PYTHONPATH": str(peer.tree), RELAY_ENVIRONMENT: ""}


def goma_config(fwd: Forward) -> str:
    """goma-pt's YAML for `fwd`: Goma's defaults, plus `reusePort` when processes share it."""
    # One-reply UDP sessions: udpResponses, goma-pt's proxy_responses.
    extra = "\n          udpResponses: 1" if fwd.one_response else ""
    if fwd.procs > 1:
        extra += "\n          reusePort: true"
    return (
        "gateway:\n  entryPoints:\n    passThrough:\n      forwards:\n"
        f"        - protocol: {fwd.proto}\n          port: {fwd.listen_port}\n"
        f"          address: {procs.LOOPBACK}\n"
        f"          target: {procs.LOOPBACK}:{fwd.target_port}{extra}\n"
    )


def _goma_argv(fwd: Forward, workdir: Path) -> list[str]:
    (workdir / "goma-pt.yaml").write_text(goma_config(fwd))
    return [*TWISTD, "goma-pt", "--config", str(workdir / "goma-pt.yaml")]


def _goma_plain_argv(fwd: Forward, workdir: Path) -> list[str]:
    return [*_goma_argv(fwd, workdir), "--relay", "plain"]


def goma_requires(tree: Path) -> tuple[str, ...]:
    """What a goma-pt tree needs for `twistd goma-pt`: the plugin's module and its dropin."""
    return (
        str(tree / "goma_twisted" / "tap.py"),
        str(tree / "twisted" / "plugins" / "goma_pt.py"),
    )


def pypy_python(venv: Path) -> Path:
    """The interpreter of a PyPy venv."""
    return venv / "bin" / "python"


def _goma_pypy_argv(venv: Path, plain: bool = False) -> Callable[[Forward, Path], list[str]]:
    def argv(fwd: Forward, workdir: Path) -> list[str]:
        (workdir / "goma-pt.yaml").write_text(goma_config(fwd))
        config = str(workdir / "goma-pt.yaml")
        relay = ["--relay", "plain"] if plain else []
        return [*twistd(str(pypy_python(venv))), "goma-pt", "--config", config, *relay]

    return argv


def goma_pypy(venv: Path, plain: bool = False) -> Peer:
    """goma-pt's twistd on the PyPy of `venv` (missing if that venv has no interpreter);
    with `plain`, its --relay plain (not a default peer)."""
    return Peer(
        GOMA_PYPY_PLAIN if plain else GOMA_PYPY,
        BOTH,
        _goma_pypy_argv(venv, plain),
        (*goma_requires(REPO_ROOT), str(pypy_python(venv))),
        f"this project on PyPy ({venv}), "
        + ("--relay plain, " if plain else "")
        + "one twistd process",
        tree=REPO_ROOT,
        default=not plain,
    )


def goma_old(tree: Path | None) -> Peer:
    """goma-pt from another tree (`run.py --old-tree`): its own code and twistd plugin dropin
    first on PYTHONPATH, its own default relay; unavailable without a tree."""
    return Peer(
        GOMA_OLD,
        BOTH,
        _goma_argv,
        goma_requires(tree) if tree is not None else (),
        f"goma-pt of the tree {tree}, its default relay, one twistd process",
        tree=tree,
        default=tree is not None,
        unavailable=None if tree is not None else "no tree given (run.py --old-tree DIR)",
    )


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
        f"global\n  nbthread {fwd.procs}\n\n"
        "defaults\n  mode tcp\n  maxconn 20000\n  timeout connect 5s\n"
        "  timeout client 10m\n  timeout server 10m\n\n"
        f"listen fwd\n  bind {procs.LOOPBACK}:{fwd.listen_port}\n"
        f"  server backend {procs.LOOPBACK}:{fwd.target_port}\n"
    )
    return ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]


def nginx_conf(fwd: Forward, workdir: Path, tuned: bool) -> str:
    """nginx's config for `fwd`; with several workers each gets its own `reuseport` socket."""
    udp = " udp" if fwd.proto == "udp" else ""
    if fwd.procs > 1:
        udp += " reuseport"
    extra = "    proxy_buffer_size 256k;\n" if tuned else ""
    if fwd.one_response:
        extra += "    proxy_responses 1;\n"
    return (
        f"load_module {NGINX_STREAM_MODULE};\n"
        f"daemon off;\nworker_processes {fwd.procs};\n"
        f"worker_rlimit_nofile {procs.nofile_hard_limit()};\n"
        f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n"
        "events { worker_connections 20000; }\n"
        "stream {\n  server {\n"
        f"    listen {procs.LOOPBACK}:{fwd.listen_port}{udp};\n"
        f"    proxy_pass {procs.LOOPBACK}:{fwd.target_port};\n{extra}"
        "  }\n}\n"
    )


def _nginx_argv(tuned: bool) -> Callable[[Forward, Path], list[str]]:
    def argv(fwd: Forward, workdir: Path) -> list[str]:
        (workdir / "nginx.conf").write_text(nginx_conf(fwd, workdir, tuned))
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
        goma_requires(REPO_ROOT),
        "this project, one twistd process",
        multi_note="this project, {n} twistd processes on one config, reusePort: true",
        tree=REPO_ROOT,
    ),
    Peer(
        GOMA_ONE,
        BOTH,
        _goma_argv,
        goma_requires(REPO_ROOT),
        "this project, one twistd process",
        multi_note="this project, one twistd process (the reference for goma-pt x{n})",
        procs=1,
        tree=REPO_ROOT,
    ),
    Peer(
        GOMA_PLAIN,
        BOTH,
        _goma_plain_argv,
        goma_requires(REPO_ROOT),
        "this project with --relay plain (Twisted's public API only), one twistd process",
        tree=REPO_ROOT,
    ),
    goma_pypy(PYPY_VENV),
    goma_pypy(PYPY_VENV, plain=True),
    goma_old(None),
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
    Peer(
        "haproxy",
        TCP,
        _haproxy_argv,
        ("haproxy",),
        "HAProxy mode tcp, nbthread 1, defaults",
        multi_note="HAProxy mode tcp, nbthread {n}, defaults",
    ),
    Peer(
        "nginx",
        BOTH,
        _nginx_argv(tuned=False),
        ("nginx", str(NGINX_STREAM_MODULE)),
        "nginx stream, worker_processes 1, defaults (16k buffer)",
        multi_note="nginx stream, worker_processes {n}, listen ... reuseport, defaults",
    ),
    Peer(
        "nginx-tuned",
        BOTH,
        _nginx_argv(tuned=True),
        ("nginx", str(NGINX_STREAM_MODULE)),
        "nginx stream, worker_processes 1, proxy_buffer_size 256k",
        multi_note="nginx stream, worker_processes {n}, listen ... reuseport, "
        "proxy_buffer_size 256k",
    ),
    Peer(
        DIRECT,
        BOTH,
        None,
        (),
        "no forwarder: client to backend (the limit)",
        multi_note="no forwarder: client to backend (the limit)",
    ),
)


# The default peers of a run with several processes per forwarder.
MULTI_DEFAULT = (GOMA, GOMA_ONE, "haproxy", "nginx", DIRECT)


def by_name(
    names: list[str] | None,
    procs: int = 1,
    pypy: Path | None = None,
    old_tree: Path | None = None,
) -> list[Peer]:
    """The peers to run, goma-pt-pypy(-plain) on the venv `pypy` (default PYPY_VENV) and
    goma-pt-old from `old_tree` (a default peer only when given)."""
    known = {p.name: p for p in PEERS}
    if pypy is not None:
        known[GOMA_PYPY] = goma_pypy(pypy)
        known[GOMA_PYPY_PLAIN] = goma_pypy(pypy, plain=True)
    if old_tree is not None:
        known[GOMA_OLD] = goma_old(old_tree)
    if not names:
        if procs > 1:
            return [p for p in known.values() if p.name in MULTI_DEFAULT]
        return [p for p in known.values() if p.procs is None and p.default]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown peer(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


def start_forwarder(peer: Peer, fwd: Forward, workdir: Path) -> Running:
    """Start `peer` forwarding `fwd`, wait until it listens, and return it."""
    if peer.argv is None:
        return Running(peer, fwd.target_port, None)
    workdir.mkdir(parents=True, exist_ok=True)
    if peer.name == GOMA and fwd.procs > 1:
        return _start_gomas(peer, fwd, workdir)
    proc = procs.start(peer.name, peer.argv(fwd, workdir), workdir, env=goma_env(peer))
    try:
        # nginx with reuseport: one listening socket per worker
        sockets = fwd.procs if peer.name.startswith("nginx") else 1
        procs.wait_bound(proc, fwd.listen_port, fwd.proto, sockets=sockets)
    except BaseException:
        procs.stop(proc)
        raise
    return Running(peer, fwd.listen_port, proc)


def _start_gomas(peer: Peer, fwd: Forward, workdir: Path) -> Running:
    """`fwd.procs` twistd goma-pt processes on one config, each with its own /metrics port."""
    assert peer.argv is not None
    argv = peer.argv(fwd, workdir)
    env = goma_env(peer)
    started: list[procs.Proc] = []
    ports: list[int] = []
    try:
        for i in range(1, fwd.procs + 1):
            ports.append(procs.free_port())
            metrics = ["--metrics", f"tcp:{ports[-1]}:interface={procs.LOOPBACK}"]
            # twistd's own options before the plugin name, the plugin's after it
            cmd = [*argv[: argv.index(GOMA) + 1], *metrics, *argv[argv.index(GOMA) + 1 :]]
            started.append(procs.start(f"{peer.name}-{i}", cmd, workdir, env=env))
            # one at a time: each must hold its own socket on the shared port
            procs.wait_bound(started[-1], fwd.listen_port, fwd.proto, sockets=i)
    except BaseException:
        for proc in started:
            procs.stop(proc)
        raise
    return Running(peer, fwd.listen_port, started[0], started[1:], ports)


def stop_forwarder(running: Running) -> None:
    for proc in ([running.proc] if running.proc else []) + running.more:
        procs.stop(proc)


# goma-pt's counters that show how the kernel spread the work over its processes
SPLIT_COUNTERS = {
    "goma_pt_tcp_connections_accepted_total": "connections",
    "goma_pt_udp_sessions_created_total": "sessions",
    "goma_pt_udp_datagrams_total": "datagrams",
    "goma_pt_bytes_total": "bytes",
}


def split_counts(page: str) -> dict[str, int]:
    """Sum each of SPLIT_COUNTERS over its series in a Prometheus text page."""
    out = dict.fromkeys(SPLIT_COUNTERS.values(), 0)
    for line in page.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in SPLIT_COUNTERS and not line.startswith("#"):
            out[SPLIT_COUNTERS[name]] += int(float(line.rsplit(" ", 1)[1]))
    return out


def scrape_split(running: Running) -> list[dict[str, int]]:
    """Each goma-pt process's share of the work, from its /metrics (procs > 1 only)."""
    out = []
    for port in running.metrics_ports:
        url = f"http://{procs.LOOPBACK}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            out.append(split_counts(page.read().decode()))
    return out
