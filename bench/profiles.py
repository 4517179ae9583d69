"""Profiling goma-pt with py-spy during the benchmark, and summarising the samples.

`python bench/run.py --profile DIR --peers goma-pt --workloads bulk_up tcp_rr` attaches
`py-spy record --format raw` to goma-pt in every cell it runs (never to the peers); the
collapsed stacks land in DIR/<workload>-r<round>.txt (one sampler, to disturb the least;
any flame graph tool that reads collapsed stacks can draw them).
A profiled run's numbers are slowed by the sampling: read its profiles, not its table.

  python bench/profiles.py DIR/*.txt [--top 25]

prints, per file, the functions with the most samples on-CPU at the top of the stack (self)
and anywhere on it (inclusive), as a share of all samples.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = "py-spy"
RATE = 250  # samples per second

# Python frames whose own time is (almost all) one system call made from that line: a
# sample on top of them is time in the kernel, not in Python. Approximate by design.
SYSCALL_FRAMES = {
    "Connection.doRead (tcp.py)": "recv",
    "untilConcludes (util.py)": "send",
    "EPollReactor.doPoll (epollreactor.py)": "epoll_wait",
    "EPollReactor._add (epollreactor.py)": "epoll_ctl",
    "EPollReactor._remove (epollreactor.py)": "epoll_ctl",
    "BaseClient.doConnect (tcp.py)": "connect",
    "Connection._closeWriteConnection (tcp.py)": "shutdown",
    "_SocketCloser._closeSocket (tcp.py)": "close",
    "socket._real_close (socket.py)": "close",
    "socket.accept (socket.py)": "accept",
    "socket.__init__ (socket.py)": "socket",
    "Port.doRead (udp.py)": "recvfrom",
    "Port.write (udp.py)": "sendto",
}


def start(pid: int, out_stem: Path) -> list[subprocess.Popen[bytes]]:
    """Attach py-spy to `pid` (collapsed stacks); empty if py-spy is missing."""
    if shutil.which(PY_SPY) is None:
        print("py-spy not installed: no profile (pip install '.[bench]')", file=sys.stderr)
        return []
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        PY_SPY,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE),
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out_stem.with_suffix(".txt")),
    ]
    return [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]


def stop(spies: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """py-spy writes its output when the target exits; interrupt it if it lingers."""
    for spy in spies:
        try:
            spy.wait(timeout)
        except subprocess.TimeoutExpired:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout)
        if spy.poll() is None:
            spy.kill()
            spy.wait()


def _frame_name(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`: lines vary, functions do not."""
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({module})" if module else name


def summarise(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, and samples per function as leaf (self) and anywhere (inclusive)."""
    total, own, inclusive = 0, Counter[str](), Counter[str]()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, own, inclusive


def split_kernel(own: Counter[str]) -> Counter[str]:
    """Leaf samples grouped as syscalls (by SYSCALL_FRAMES) or `python` for the rest."""
    groups = Counter[str]()
    for name, count in own.items():
        groups[SYSCALL_FRAMES.get(name, "python")] += count
    return groups


def render(path: Path, top: int) -> str:
    total, own, inclusive = summarise(path)
    if not total:
        return f"{path}: no samples"
    split = ", ".join(
        f"{name} {100 * n / total:.1f}%" for name, n in split_kernel(own).most_common()
    )
    lines = [
        f"== {path.name}: {total} samples",
        f"  by kind (approx.): {split}",
        "  self%  function (top of stack)",
    ]
    lines += [f"  {100 * n / total:5.1f}  {name}" for name, n in own.most_common(top)]
    lines.append("  incl%  function (anywhere on the stack)")
    lines += [f"  {100 * n / total:5.1f}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise py-spy raw profiles.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for path in args.files:
        print(render(path, args.top) + "\n")


if __name__ == "__main__":
    main()
