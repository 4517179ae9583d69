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


def _proc_net_ports(kind: str) -> set[int]:
    """Local ports bound in /proc/net/{kind}{,6}; for tcp only those in LISTEN."""
    ports: set[int] = set()
    for name in (kind, kind + "6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if kind == "tcp" and cols[3] != _TCP_LISTEN:
                continue
            ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def is_bound(port: int, proto: str) -> bool:
    """True if something listens on TCP `port` / has bound UDP `port`."""
    return port in _proc_net_ports("udp" if proto == "udp" else "tcp")


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


def wait_bound(proc: Proc, port: int, proto: str, timeout: float = 20.0) -> None:
    """Wait until `proc` has bound `port`; raise with its log tail if it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}): {proc.log_tail()}")
        if is_bound(port, proto):
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


def fd_count(pid: int) -> int:
    """Open file descriptors of one process (0 if it is gone)."""
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return 0
