"""
Alternating A/B of one-stream TCP bulk (iperf3, as the bench's bulk_up and
bulk_down) through several forwarders at once: every variant has its own
iperf3 server and stays up for the whole run, and the reps go A B C, C B A,
... so drifts in the shared machine's load fall on all of them alike. It
prints per variant the median rate, its median ratio to the first variant
paired rep by rep, and per GB: the forwarder's CPU, the iperf3 ends' CPU,
the whole machine's busy CPU (/proc/stat) and its idle share, and the
forwarder's voluntary and involuntary context switches per MB.

Variants, --v NAME=SPEC:
  nginx                         nginx stream, worker_processes 1, proxy_buffer_size 256k
  direct                        no forwarder
  PYTHON[@REPO][:KNOBS]         goma-pt's twistd run by PYTHON on REPO's code
                                (default: this checkout), with knobs.apply(KNOBS)

Run from the repository root under the bench lock, e.g.

  flock /tmp/goma-bench.lock python3 bench/experiments/bulk_ab/ab.py \\
      --v cpy=python3 --v pypy=/opt/goma-pt-pypy/bin/python \\
      --v pypy-copy=/opt/goma-pt-pypy/bin/python:splice_after=none --v nginx=nginx --reps 6

--nice N (root) runs the whole test at nice N and its autogroup at N, so
that other work on the machine outside the lock gets what the test leaves.
--perf counts context switches, migrations and wake-ups per MB of each of
the three processes (perf stat), printed per rep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
HZ = os.sysconf("SC_CLK_TCK")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """C{pid} and its descendants."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                pids += tree(int(child))
    except FileNotFoundError:
        pass
    return pids


def cpu(pid: int | None) -> tuple[float, int, int]:
    """CPU seconds, voluntary and involuntary context switches of a process tree."""
    total, voluntary, involuntary = 0.0, 0, 0
    for p in tree(pid) if pid else []:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / HZ
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total, voluntary, involuntary


def machine() -> tuple[float, float]:
    """All cores' total and idle seconds (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) / HZ, (fields[3] + fields[4]) / HZ


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} not up")


class Variant:
    def __init__(self, name: str, spec: str, workdir: Path) -> None:
        self.name = name
        self.serverPort = free_port()
        self.server = subprocess.Popen(
            ["iperf3", "-s", "-p", str(self.serverPort)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.serverPort
        if spec == "direct":
            return
        self.port = free_port()
        env = None
        if spec == "nginx":
            conf = workdir / f"{name}.conf"
            conf.write_text(
                f"load_module {NGINX_STREAM_MODULE};\ndaemon off;\nworker_processes 1;\n"
                f"pid {workdir}/{name}.pid;\nerror_log {workdir}/{name}.err warn;\n"
                "events { worker_connections 2000; }\nstream {\n  server {\n"
                f"    listen 127.0.0.1:{self.port};\n"
                f"    proxy_pass 127.0.0.1:{self.serverPort};\n"
                "    proxy_buffer_size 256k;\n  }\n}\n"
            )
            argv = ["nginx", "-p", str(workdir), "-c", str(conf), "-e", f"{workdir}/{name}.err"]
        else:
            python, _, knobs = spec.partition(":")
            python, _, repo = python.partition("@")
            config = workdir / f"{name}.yaml"
            config.write_text(
                "gateway:\n  entryPoints:\n    passThrough:\n      forwards:\n"
                f"        - protocol: tcp\n          port: {self.port}\n"
                f"          address: 127.0.0.1\n          target: 127.0.0.1:{self.serverPort}\n"
            )
            code = (
                f"import sys; sys.path.insert(0, {str(HERE)!r}); import knobs; "
                f"knobs.apply({knobs!r}); from twisted.scripts.twistd import run; "
                "sys.argv[0] = 'twistd'; run()"
            )
            argv = [python, "-c", code, "-n", "--pidfile=", f"--logfile={workdir}/{name}.log"]
            argv += ["goma-pt", "--config", str(config)]
            env = dict(os.environ, PYTHONPATH=repo or str(REPO))
        out = (workdir / f"{name}.out").open("w")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        for proc in (self.proc, self.server):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def perfStat(pid: str, out: Path) -> subprocess.Popen[bytes]:
    events = "context-switches,cpu-migrations,sched:sched_wakeup"
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-e", events, "-p", pid, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def rep(
    v: Variant, reverse: bool, seconds: int, workdir: Path, perf: bool
) -> dict[str, Any] | None:
    """One iperf3 run through C{v}; None if iperf3 failed (its server still busy)."""
    pid = v.proc.pid if v.proc else None
    fwd0, srv0, mach0 = cpu(pid), cpu(v.server.pid), machine()
    ends0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(v.port), "-t", str(seconds), "--json"]
    client = subprocess.Popen(argv + (["-R"] if reverse else []), stdout=subprocess.PIPE)
    perfs = []
    if perf:
        roles: list[tuple[str, Any]] = [("client", client.pid), ("server", v.server.pid)]
        if pid:
            roles.append(("forwarder", ",".join(map(str, tree(pid)))))
        perfs = [(role, perfStat(str(p), workdir / f"perf-{role}")) for role, p in roles]
    out, _ = client.communicate(timeout=seconds + 30)
    counts = {}
    for role, proc in perfs:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        for line in (workdir / f"perf-{role}").read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 3 and fields[0].replace(".", "").isdigit():
                counts[f"{role}.{fields[2].split(':')[-1]}"] = float(fields[0])
    ends1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    fwd1, srv1, mach1 = cpu(pid), cpu(v.server.pid), machine()
    result = json.loads(out)
    received = result.get("end", {}).get("sum_received")
    if "error" in result or not received:
        return None
    gb = received["bytes"] / 1e9
    client_cpu = ends1.ru_utime + ends1.ru_stime - ends0.ru_utime - ends0.ru_stime
    total, idle = mach1[0] - mach0[0], mach1[1] - mach0[1]
    if counts:
        per_mb = {k: round(n / gb / 1000, 2) for k, n in sorted(counts.items())}
        print(f"    {v.name} {'down' if reverse else 'up'} per MB: {per_mb}", flush=True)
    return {
        "rate": received["bits_per_second"] / 8e9,
        "fwd": (fwd1[0] - fwd0[0]) / gb,
        "ends": (srv1[0] - srv0[0] + client_cpu) / gb,
        "machine": (total - idle) / gb,
        "idle": idle / total,
        "vcs": (fwd1[1] - fwd0[1]) / gb / 1000,
        "ivcs": (fwd1[2] - fwd0[2]) / gb / 1000,
    }


def steady(v: Variant, reverse: bool, seconds: int, workdir: Path, perf: bool) -> dict[str, Any]:
    for _ in range(4):
        result = rep(v, reverse, seconds, workdir, perf)
        if result is not None:
            return result
        time.sleep(1)
    raise SystemExit(f"iperf3 through {v.name} kept failing")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--v", action="append", required=True, metavar="NAME=SPEC")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("-t", "--seconds", type=int, default=2)
    parser.add_argument("--dirs", default="up,down")
    parser.add_argument("--nice", type=int)
    parser.add_argument("--perf", action="store_true")
    args = parser.parse_args()
    if args.nice is not None:
        os.nice(args.nice)
        Path("/proc/self/autogroup").write_text(str(args.nice))
    workdir = Path(tempfile.mkdtemp(prefix="bulk-ab-"))
    variants = []
    for spec in args.v:
        name, _, what = spec.partition("=")
        variants.append(Variant(name, what, workdir))
    try:
        for v in variants:
            wait_port(v.serverPort)
            wait_port(v.port)
        for direction in args.dirs.split(","):
            reverse = direction == "down"
            for v in variants:
                steady(v, reverse, 1, workdir, False)  # warm-up (PyPy's JIT, autotuning)
            results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
            for i in range(args.reps):
                for v in variants if i % 2 == 0 else variants[::-1]:
                    results[v.name].append(steady(v, reverse, args.seconds, workdir, args.perf))
            print(f"== bulk_{direction} ({args.reps} reps of {args.seconds} s)")
            base = results[variants[0].name]
            for name, reps in results.items():

                def median(key: str, reps: list[dict[str, Any]] = reps) -> float:
                    return statistics.median(r[key] for r in reps)

                ratio = statistics.median(r["rate"] / b["rate"] for r, b in zip(reps, base))
                print(
                    f"{name:>12}: {median('rate'):.2f} GB/s (x{ratio:.3f} paired)"
                    f" {[round(r['rate'], 2) for r in reps]}  s/GB: forwarder {median('fwd'):.3f}"
                    f" ends {median('ends'):.3f} machine {median('machine'):.3f}"
                    f" idle {median('idle') * 100:.0f}%  cs/MB {median('vcs'):.2f} vol"
                    f" {median('ivcs'):.2f} invol"
                )
            sys.stdout.flush()
    finally:
        for v in variants:
            v.stop()
        for log in sorted(workdir.glob("*.log")) + sorted(workdir.glob("*.out")):
            text = log.read_text(errors="replace")
            if "Traceback" in text or "Unhandled" in text:
                print(f"errors in {log}:\n{text[-2000:]}")


if __name__ == "__main__":
    main()
