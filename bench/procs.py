"""Process, port and memory helpers shared by the benchmark modules.

Everything here is loopback-only and bounded in time: every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
_TCP_LISTEN = "0A"
_used_ports: set[int] = set()


def free_port() -> int:
    """Return a port that is free for both TCP and UDP on loopback right now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = int(tcp.getsockname()[1])
            if port in _used_ports:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((LOOPBACK, port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port found")


def raise_nofile() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (used as a preexec_fn)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _proc_net_ports(kind: str) -> Counter[int]:
    """Sockets per local port bound in /proc/net/{kind}{,6}; for tcp only those in LISTEN."""
    ports: Counter[int] = Counter()
    for name in (kind, kind + "6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if kind == "tcp" and cols[3] != _TCP_LISTEN:
                continue
            ports[int(cols[1].rsplit(":", 1)[1], 16)] += 1
    return ports


def is_bound(port: int, proto: str, sockets: int = 1) -> bool:
    """True if `sockets` sockets (SO_REUSEPORT) listen on TCP `port` / have bound UDP `port`."""
    return _proc_net_ports("udp" if proto == "udp" else "tcp")[port] >= sockets


@dataclass
class Proc:
    """A started server process whose output goes to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    stdin_pipe: bool = False,
) -> Proc:
    """Start `argv` in its own session with stdout/stderr to workdir/<name>.log."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=raise_nofile,
        )
    return Proc(name, popen, log)


def stop(proc: Proc, grace: float = 3.0) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL it after `grace` seconds."""
    if proc.popen.stdin is not None:
        with contextlib.suppress(OSError):
            proc.popen.stdin.close()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(grace)
    # children that left the group (none expected) or forked workers still exiting
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(grace)


def wait_bound(proc: Proc, port: int, proto: str, timeout: float = 20.0, sockets: int = 1) -> None:
    """Wait until `port` has `sockets` sockets bound (the last of them by `proc`).

    Raise with the log tail of `proc` if it died or the time ran out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}): {proc.log_tail()}")
        if is_bound(port, proto, sockets):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not bind {proto}/{port} in {timeout}s: {proc.log_tail()}")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (read from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        cur = todo.pop()
        tree.append(cur)
        todo.extend(children.get(cur, []))
    return tree


def rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over `pid` and its descendants, in KiB."""
    return sum(rss_kb(p) for p in process_tree(pid))


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run a client tool to completion (bounded by `timeout`) and return its stdout."""
    done = subprocess.run(
        list(argv), capture_output=True, timeout=timeout, check=False, preexec_fn=raise_nofile
    )
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()[-400:]
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {err}")
    return done.stdout.decode(errors="replace")


def task_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of `pid`, in seconds (empty if it is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command: state is field 3 of stat(5), utime 14 and stime 15
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def machine_cpu_seconds(backend_pid: int) -> dict[str, float]:
    """CPU seconds so far, all cores: the machine's `busy` and `idle` time, and within busy,
    what the backend (with its children) and this process's finished clients used.

    Busy counts every process and the kernel's own work (interrupts, softirq); idle includes
    waiting for I/O. `client` is every child tool this process has waited for, so a
    difference across one measurement is the client tool of that measurement.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    idle = fields[3] + fields[4]
    busy = sum(fields[:8]) - idle
    tick = os.sysconf("SC_CLK_TCK")
    clients = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "busy": busy / tick,
        "idle": idle / tick,
        "client": clients.ru_utime + clients.ru_stime,
        "backend": sum(sum(task_cpu_seconds(p).values()) for p in process_tree(backend_pid)),
    }


def fd_count(pid: int) -> int:
    """Open file descriptors of one process (0 if it is gone)."""
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return 0
