"""Start, watch and stop the programs of the end-to-end suite.

Every child writes its output to a log file, never to a pipe: a pipe nobody reads
fills up and stalls the child, while a file can be read at any time, polled for a
readiness line, and attached to the pytest report when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

LOOPBACK4 = "127.0.0.1"
LOOPBACK6 = "::1"

# Below Linux's ephemeral range (32768-60999), so a port we pick is not also
# handed out by the kernel to some outgoing connection in the meantime.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


# The processes a test started, for the report hook that attaches their logs.
STARTED = pytest.StashKey[list["Proc"]]()


class PeerError(AssertionError):
    """A child process misbehaved: it exited early or never became ready."""


def _missing(what: str) -> None:
    """Fail under CI (a peer is part of the suite there); skip on a dev machine."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required with CI set; run .ci/install-peers", pytrace=False)
    pytest.skip(
        f"{what} is not installed (.ci/install-peers installs it)", allow_module_level=True
    )


def require_binary(name: str) -> str:
    """Return the path of program `name`, also looking in sbin (sshd, nsd)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        _missing(f"program {name!r}")
        raise AssertionError("unreachable")  # pytest.skip/fail raised
    return path


def require_module(name: str) -> ModuleType:
    """Import Python module `name`, or fail/skip like require_binary."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"Python module {name!r}")
        raise AssertionError("unreachable") from None


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(port: int, kinds: Iterable[int], hosts: Iterable[str]) -> bool:
    for host in hosts:
        for kind in kinds:
            with socket.socket(family_of(host), kind) as s:
                try:
                    s.bind((host, port))
                except OSError as e:
                    if e.errno in (errno.EADDRINUSE, errno.EACCES):
                        return False
                    raise
    return True


def free_port(protocol: str = "tcp", hosts: Sequence[str] = (LOOPBACK4,)) -> int:
    """A port free right now for `protocol` ("tcp", "udp", "tcp/udp") on every host.

    Never returns the same port twice in one run, so two fixtures that pick ports
    before either binds cannot collide.
    """
    kinds = [{"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[p] for p in protocol.split("/")]
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port not in _handed_out and _bindable(port, kinds, hosts):
            _handed_out.add(port)
            return port
    raise PeerError(f"no free {protocol} port on {list(hosts)}")


def bracket(host: str) -> str:
    """Host as it appears before ':port' in a target or URL."""
    return f"[{host}]" if ":" in host else host


@dataclass
class Proc:
    """A running child with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False  # by `stop`, whose second call must not signal anything

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.popen.poll() is None


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start `argv` in its own session, output (stdout and stderr) into `log`.

    Its own session gives it its own process group, so `stop` can also end the
    children it forks (sshd's per-connection processes) and nothing else.
    """
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def wait_until(proc: Proc, ready: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `ready` until true; fail early with the log if `proc` dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if not proc.running:
            raise PeerError(
                f"{proc.name} exited with {proc.popen.returncode} before {what}:\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise PeerError(f"{proc.name}: no {what} within {timeout:g} s:\n{proc.tail()}")
        time.sleep(0.05)


def wait_for_log(proc: Proc, needle: str, timeout: float = 10.0) -> None:
    wait_until(proc, lambda: needle in proc.log_text(), f"log line {needle!r}", timeout)


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_tcp(proc: Proc, host: str, port: int, timeout: float = 10.0) -> None:
    wait_until(proc, lambda: tcp_open(host, port), f"TCP listener on {host} port {port}", timeout)


def stop(proc: Proc, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; then clear its process group.

    Returns the exit status of the SIGTERM (negative: killed by that signal).
    Stopping a stopped process only returns its status again.
    """
    if proc.stopped:
        return proc.popen.returncode
    proc.stopped = True
    if proc.running:
        proc.popen.send_signal(signal.SIGTERM)
    try:
        rc = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout)
        rc = -signal.SIGKILL
    # Leftover children of its own group only (the group id is the child's pid).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    return rc


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion within `timeout`; on failure show its output."""
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise PeerError(
            f"{argv[0]} took over {timeout:g} s\nstdout: {e.stdout!r:.2000}\n"
            f"stderr: {e.stderr!r:.2000}"
        ) from None
    if check and done.returncode != 0:
        raise PeerError(
            f"{' '.join(argv)} exited {done.returncode}\n"
            f"stdout: {done.stdout[-4000:].decode(errors='replace')}\n"
            f"stderr: {done.stderr[-4000:].decode(errors='replace')}"
        )
    return done


class Launcher:
    """Starts a test's processes, each logging to a file in tmp_path, and stops them."""

    def __init__(self, tmp: Path, item: pytest.Item) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []
        self._item = item
        item.stash.setdefault(STARTED, [])

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.tmp / f"{name}-{len(self.started)}.log"
        proc = start(name, argv, log, env=env, cwd=cwd)
        self.started.append(proc)
        self._item.stash[STARTED].append(proc)
        return proc

    def stop_all(self) -> None:
        # Last started first: goma-pt goes before the peers it forwards to.
        for proc in reversed(self.started):
            stop(proc)
