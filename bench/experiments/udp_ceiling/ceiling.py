"""
The udp_dns ceiling experiment: dnsperf (-c 10, as the bench's udp_dns)
against nsd through each forwarder, with the queries per second and the CPU
per query of the forwarder, nsd and dnsperf, from /proc/PID/stat.

    flock /tmp/goma-bench.lock python3 bench/experiments/udp_ceiling/ceiling.py \\
        --peers direct,c-datagram,c-batched,nginx-tuned,goma-pt,goma-pt-pypy --reps 3

Forwarders: the bench's peers (goma-pt, goma-pt-pypy, nginx, nginx-tuned,
direct), cfwd.c compiled here (c-datagram: mode 0, c-batched: mode 3,
c-mode-N), and pyfloor.py (py-floor on this Python, py-floor-pypy on the
bench's PyPy venv). The peers take turns within each rep. Run it from the
repository root, under the bench lock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent))

from bench import backends, peers, procs  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
C_MODES = {"c-datagram": 0, "c-batched": 3}


def cpu(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of `pids` (the ones still there)."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        user += int(fields[11]) / HZ
        system += int(fields[12]) / HZ
    return user, system


def dnsperf(port: int, queries: Path, seconds: int) -> tuple[float, int, int, float]:
    """Queries per second, completed, lost, and dnsperf's own CPU seconds."""
    before = os.times()
    argv = ["dnsperf", "-s", procs.LOOPBACK, "-p", str(port), "-d", str(queries)]
    out = subprocess.run(
        [*argv, "-c", "10", "-l", str(seconds), "-t", "1"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    ).stdout
    after = os.times()
    found = [
        re.search(rf"{what}:\s+([\d.]+)", out)
        for what in ("Queries per second", "Queries completed", "Queries lost")
    ]
    if None in found:
        raise RuntimeError(f"dnsperf printed no rate: {out[-400:]}")
    qps, done, lost = (float(m.group(1)) for m in found if m is not None)
    spent = after.children_user - before.children_user
    spent += after.children_system - before.children_system
    return qps, int(done), int(lost), spent


def start(name: str, nsd: backends.Backend, workdir: Path, cfwd: Path, pypy: Path) -> Any:
    """Start forwarder `name`: (port, pids, stop)."""
    port = procs.free_port()
    argv: list[str] | None = None
    if name in C_MODES or name.startswith("c-mode-"):
        mode = C_MODES[name] if name in C_MODES else int(name.rsplit("-", 1)[1])
        argv = [str(cfwd), str(port), str(nsd.port), str(mode)]
    elif name.startswith("py-floor"):
        python = str(peers.pypy_python(pypy)) if name.endswith("pypy") else sys.executable
        argv = [python, str(HERE / "pyfloor.py"), str(port), str(nsd.port)]
    if argv is not None:
        popen = subprocess.Popen(argv)
        deadline = time.monotonic() + 20
        while not procs.is_bound(port, "udp") and time.monotonic() < deadline:
            time.sleep(0.05)

        def stop() -> None:
            popen.terminate()
            popen.wait(10)

        return port, [popen.pid], stop
    if name == peers.DIRECT:
        return nsd.port, [], lambda: None
    peer = peers.by_name([name], pypy=pypy)[0]
    running = peers.start_forwarder(peer, peers.Forward("udp", port, nsd.port), workdir / name)
    return port, running.pids(), lambda: peers.stop_forwarder(running)


def measure(name: str, nsd: backends.Backend, args: Any, workdir: Path, cfwd: Path) -> dict:
    port, pids, stop = start(name, nsd, workdir, cfwd, args.pypy)
    queries = nsd.files["queries"]
    nsd_pids = procs.process_tree(nsd.proc.pid)
    try:
        dnsperf(port, queries, args.warmup)
        fwd0, nsd0 = cpu(pids), cpu(nsd_pids)
        qps, done, lost, client = dnsperf(port, queries, args.seconds)
        fwd1, nsd1 = cpu(pids), cpu(nsd_pids)
    finally:
        stop()

    def us(seconds: float) -> float:
        return round(seconds * 1e6 / max(done, 1), 2)

    return {
        "peer": name,
        "qps": round(qps),
        "lost": lost,
        "fwd_us": us(fwd1[0] - fwd0[0] + fwd1[1] - fwd0[1]),
        "fwd_user_us": us(fwd1[0] - fwd0[0]),
        "fwd_sys_us": us(fwd1[1] - fwd0[1]),
        "nsd_us": us(nsd1[0] - nsd0[0] + nsd1[1] - nsd0[1]),
        "dnsperf_us": us(client),
    }


def summary(rows: list[dict]) -> None:
    """Medians per forwarder, and each one's rate over tuned nginx's."""
    med: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["peer"] for r in rows):
        mine = [r for r in rows if r["peer"] == name]
        med[name] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "peer"}
    nginx = med.get("nginx-tuned", {}).get("qps")
    for name, m in med.items():
        ratio = f"  {m['qps'] / nginx:.2f}x nginx-tuned" if nginx else ""
        print(
            f"{name:14s} {m['qps']:8.0f} q/s  forwarder {m['fwd_us']:5.2f} us/query "
            f"(user {m['fwd_user_us']:.2f}, sys {m['fwd_sys_us']:.2f})  nsd {m['nsd_us']:.2f}"
            f"  dnsperf {m['dnsperf_us']:.2f}{ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="direct,c-datagram,c-batched,nginx-tuned,goma-pt")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pypy", type=Path, default=peers.PYPY_VENV)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="udp-ceiling-") as tmp:
        workdir = Path(tmp)
        cfwd = workdir / "cfwd"
        subprocess.run(["gcc", "-O2", "-o", str(cfwd), str(HERE / "cfwd.c")], check=True)
        nsd = backends.nsd(workdir)
        try:
            for rep in range(args.reps):
                for name in args.peers.split(","):
                    rows.append(measure(name, nsd, args, workdir / f"rep{rep}", cfwd))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            nsd.stop()
    summary(rows)


if __name__ == "__main__":
    main()
