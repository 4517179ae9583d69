"""Pure helpers for the peers: their config files, and parsers for their clients' output.

Kept free of I/O so what a test asserts on (a parsed dig answer, a benchmark
line) can be checked against sample output without running anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---- SSH --------------------------------------------------------------------

SSH_HOST_ALIAS = "goma-e2e-sshd"


def sshd_config(
    port: int, hosts: Sequence[str], host_key: Path, authorized_keys: Path, pidfile: Path
) -> str:
    """Key-only sshd for the test's own user; no PAM, no system files touched."""
    lines = [f"Port {port}"]
    lines += [f"ListenAddress {h}" for h in hosts]
    lines += [
        f"HostKey {host_key}",
        f"PidFile {pidfile}",
        f"AuthorizedKeysFile {authorized_keys}",
        "UsePAM no",
        "StrictModes no",  # tmp_path is not owned the way sshd wants a home
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp",  # scp speaks SFTP since OpenSSH 9.0
        "LogLevel VERBOSE",
    ]
    return "\n".join(lines) + "\n"


def ssh_options(client_key: Path, known_hosts: Path) -> list[str]:
    """Client options: only our files, no prompts, and the host key pinned.

    The pin is by alias, not by host:port, so it holds whichever port (sshd's own
    or goma-pt's) the client dials, and proves that sshd is who answered.
    """
    opts = {
        "IdentitiesOnly": "yes",
        "IdentityFile": str(client_key),
        "BatchMode": "yes",
        "HostKeyAlias": SSH_HOST_ALIAS,
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "ConnectTimeout": "10",
        "LogLevel": "ERROR",
    }
    out = ["-F", "/dev/null"]
    for k, v in opts.items():
        out += ["-o", f"{k}={v}"]
    return out


def known_hosts_line(host_pub: str) -> str:
    keytype, key = host_pub.split()[:2]
    return f"{SSH_HOST_ALIAS} {keytype} {key}\n"


# ---- DNS --------------------------------------------------------------------

ZONE = "e2e.test."
WWW_A = "127.0.0.42"


def big_txt_records(count: int = 40) -> list[str]:
    """TXT strings whose RRset is about 3 KB: over 512 (plain UDP) and 1232 bytes."""
    return [f"record-{i:02d}-" + "x" * 50 for i in range(count)]


def zone_file(origin: str = ZONE, big: Sequence[str] = ()) -> str:
    lines = [
        f"$ORIGIN {origin}",
        "$TTL 300",
        "@ IN SOA ns1 hostmaster 1 3600 600 86400 300",
        "@ IN NS ns1",
        "ns1 IN A 127.0.0.1",
        f"www IN A {WWW_A}",
        "www IN AAAA ::42",
    ]
    lines += [f'big IN TXT "{txt}"' for txt in big]
    return "\n".join(lines) + "\n"


def nsd_conf(port: int, hosts: Sequence[str], workdir: Path, zonefile: str) -> str:
    """nsd in the foreground as the current user, every state file in `workdir`."""
    server = [
        f"port: {port}",
        *[f"ip-address: {h}" for h in hosts],
        f"do-ip6: {'yes' if any(':' in h for h in hosts) else 'no'}",
        'username: ""',
        'chroot: ""',
        f'zonesdir: "{workdir}"',
        f'pidfile: "{workdir}/nsd.pid"',
        'database: ""',
        f'xfrdfile: "{workdir}/xfrd.state"',
        f'zonelistfile: "{workdir}/zone.list"',
        f'xfrdir: "{workdir}"',
        "server-count: 1",
        "verbosity: 1",
        "log-only-syslog: no",
        # Default 1232 would truncate our 3 KB answer even when dig offers 4096.
        "ipv4-edns-size: 4096",
        "ipv6-edns-size: 4096",
    ]
    body = ["server:", *[f"    {s}" for s in server]]
    body += ["remote-control:", "    control-enable: no"]
    body += ["zone:", f"    name: {ZONE}", f'    zonefile: "{zonefile}"']
    return "\n".join(body) + "\n"


@dataclass
class DigResult:
    """What a test needs from dig's default (commented) output."""

    answers: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, rdata
    flags: set[str] = field(default_factory=set)
    status: str = ""
    transport: str = ""  # "UDP" or "TCP": how the final answer arrived
    size: int = 0
    retried_tcp: bool = False  # dig saw TC over UDP and asked again over TCP

    def rdata(self, rtype: str) -> list[str]:
        return [r for _, t, r in self.answers if t == rtype]


_FLAGS = re.compile(r"^;; flags: ([a-z ]*);")
_STATUS = re.compile(r"status: ([A-Z]+)")
_SERVER = re.compile(r"^;; SERVER: .*\((UDP|TCP)\)\s*$")
_SIZE = re.compile(r"^;; MSG SIZE\s+rcvd: (\d+)")


def parse_dig(text: str) -> DigResult:
    res = DigResult()
    section = ""
    for line in text.splitlines():
        if line.startswith(";; Truncated, retrying in TCP mode"):
            res.retried_tcp = True
        elif m := _FLAGS.match(line):
            res.flags = set(m.group(1).split())
        elif line.startswith(";; ->>HEADER<<-") and (m := _STATUS.search(line)):
            res.status = m.group(1)
        elif m := _SERVER.match(line):
            res.transport = m.group(1)
        elif m := _SIZE.match(line):
            res.size = int(m.group(1))
        elif line.startswith(";; ") and line.endswith(" SECTION:"):
            section = line[3:-9]
        elif not line.strip():
            section = ""
        elif section == "ANSWER" and not line.startswith(";"):
            name, _ttl, _cls, rtype, rdata = line.split(None, 4)
            res.answers.append((name, rtype, rdata))
    return res


def txt_value(rdata: str) -> str:
    """A one-string TXT rdata as dig prints it, without its quotes."""
    return rdata.strip().removeprefix('"').removesuffix('"')


# ---- Redis ------------------------------------------------------------------

_BENCH = re.compile(r"^([A-Z_]+(?: \([^)]*\))?): ([\d.]+) requests per second")


def parse_redis_benchmark(text: str) -> tuple[dict[str, float], list[str]]:
    """`redis-benchmark -q` output -> ({test: requests/s}, error lines).

    Progress lines are separated by carriage returns; only finished lines count.
    """
    rates: dict[str, float] = {}
    errors: list[str] = []
    for raw in re.split(r"[\r\n]+", text):
        line = raw.strip()
        if m := _BENCH.match(line):
            rates[m.group(1)] = float(m.group(2))
        elif "error" in line.lower():
            errors.append(line)
    return rates, errors


# ---- iperf3 -----------------------------------------------------------------


@dataclass(frozen=True)
class IperfSummary:
    protocol: str
    sent_bytes: int
    received_bytes: int
    seconds: float
    packets: int = 0  # UDP only
    lost_packets: int = 0  # UDP only, as counted by the receiver


def parse_iperf3(text: str) -> IperfSummary:
    """The end-of-test totals from `iperf3 --json`; raise on a reported error."""
    doc = json.loads(text)
    if doc.get("error"):
        raise AssertionError(f"iperf3 reported: {doc['error']}")
    end = doc["end"]
    sent, recv = end["sum_sent"], end["sum_received"]
    return IperfSummary(
        protocol=doc["start"]["test_start"]["protocol"],
        sent_bytes=int(sent["bytes"]),
        received_bytes=int(recv["bytes"]),
        seconds=float(recv["seconds"]),
        packets=int(recv.get("packets", 0)),
        lost_packets=int(recv.get("lost_packets", 0)),
    )
