"""OpenSSH through a `tcp` forward: a command, and 5 MB each way by ssh and scp."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import procs
from .goma import CLEAN, GomaPt, Route, forward
from .peers import known_hosts_line, ssh_options, sshd_config
from .procs import LOOPBACK4, LOOPBACK6, Launcher, bracket, require_binary, run

pytestmark = pytest.mark.e2e

FIVE_MB = 5 * 1024 * 1024


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    options: list[str]
    ssh_bin: str
    scp_bin: str

    def ssh(self, host: str, port: int, command: str, *options: str) -> list[str]:
        argv = [self.ssh_bin, *self.options, *options, "-p", str(port)]
        return [*argv, f"{self.user}@{host}", command]

    def scp(self, port: int, src: str, dst: str) -> list[str]:
        return [self.scp_bin, *self.options, "-q", "-P", str(port), src, dst]

    def remote(self, host: str, path: Path) -> str:
        return f"{self.user}@{bracket(host)}:{path}"


@pytest.fixture
def sshd(launcher: Launcher, tmp_path: Path) -> Iterator[Sshd]:
    """sshd on 127.0.0.1 and ::1 with a host key and a client key made here."""
    sshd_bin, keygen = require_binary("sshd"), require_binary("ssh-keygen")
    ssh_bin, scp_bin = require_binary("ssh"), require_binary("scp")
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host_key", "client_key"):
        run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"goma-e2e-{key}", "-f", str(d / key)])
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "known_hosts").write_text(known_hosts_line((d / "host_key.pub").read_text()))
    port = procs.free_port("tcp", [LOOPBACK4, LOOPBACK6])
    cfg = d / "sshd_config"
    cfg.write_text(
        sshd_config(
            port, [LOOPBACK4, LOOPBACK6], d / "host_key", d / "authorized_keys", d / "sshd.pid"
        )
    )
    # sshd refuses to start without its privilege separation directory, which the
    # Debian package only makes when its service starts (never, in a container).
    with contextlib.suppress(PermissionError):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = launcher.start("sshd", [sshd_bin, "-D", "-e", "-f", str(cfg)])
    procs.wait_for_log(proc, f"Server listening on {LOOPBACK6} port {port}")
    procs.wait_for_log(proc, f"Server listening on {LOOPBACK4} port {port}")
    user = pwd.getpwuid(os.getuid()).pw_name
    yield Sshd(port, user, ssh_options(d / "client_key", d / "known_hosts"), ssh_bin, scp_bin)


@pytest.mark.parametrize("host", [LOOPBACK4, LOOPBACK6], ids=["ipv4", "ipv6"])
def test_ssh_runs_a_command(sshd: Sshd, route: Route, host: str) -> None:
    """The shell's answer comes back, and sshd saw the connection on its own port."""
    dial_host, dial_port = route("tcp", host, sshd.port)
    out = run(sshd.ssh(dial_host, dial_port, 'echo "hello-$((6*7))|$SSH_CONNECTION"'))
    answer, connection = out.stdout.decode().strip().split("|")
    assert answer == "hello-42"
    client_ip, _client_port, server_ip, server_port = connection.split()
    assert (client_ip, server_ip, int(server_port)) == (host, host, sshd.port)


def test_ssh_pipes_5mb_each_way(sshd: Sshd, route: Route, tmp_path: Path) -> None:
    host, port = route("tcp", LOOPBACK4, sshd.port)
    data = os.urandom(FIVE_MB)
    digest = hashlib.sha256(data).hexdigest()
    remote = tmp_path / "uploaded.bin"

    out = run(sshd.ssh(host, port, f"cat > {remote} && sha256sum {remote}"), input=data)
    assert out.stdout.decode().split()[0] == digest
    assert hashlib.sha256(remote.read_bytes()).hexdigest() == digest

    out = run(sshd.ssh(host, port, f"cat {remote}"))
    assert len(out.stdout) == FIVE_MB
    assert hashlib.sha256(out.stdout).hexdigest() == digest


def test_scp_5mb_each_way(sshd: Sshd, route: Route, tmp_path: Path) -> None:
    host, port = route("tcp", LOOPBACK4, sshd.port)
    local, remote, back = tmp_path / "local.bin", tmp_path / "remote.bin", tmp_path / "back.bin"
    local.write_bytes(os.urandom(FIVE_MB))
    digest = hashlib.sha256(local.read_bytes()).hexdigest()

    run(sshd.scp(port, str(local), sshd.remote(host, remote)))
    assert hashlib.sha256(remote.read_bytes()).hexdigest() == digest
    run(sshd.scp(port, sshd.remote(host, remote), str(back)))
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest


IDLE = 2  # the forward's `timeout`: TCP connect and idle timeout


def test_ssh_idle_timeout_and_keepalives(sshd: Sshd, goma_pt: GomaPt) -> None:
    """With `timeout: 2` a session silent for 4 s is cut at about 2 s; the same
    session with ssh's keepalives every second lives on."""
    port = procs.free_port("tcp")
    proc = goma_pt(forward("tcp", port, LOOPBACK4, sshd.port, address=LOOPBACK4, timeout=IDLE))
    quiet = 'sleep 4; echo "still-here"'

    kept = run(sshd.ssh(LOOPBACK4, port, quiet, "-o", "ServerAliveInterval=1"))
    assert kept.stdout.strip() == b"still-here"

    start = time.monotonic()
    cut = run(sshd.ssh(LOOPBACK4, port, quiet), check=False)
    elapsed = time.monotonic() - start
    assert cut.returncode == 255  # ssh's own "connection lost"
    assert b"still-here" not in cut.stdout
    assert IDLE * 0.9 <= elapsed < 4  # cut while the command still slept
    procs.wait_for_log(proc, "idle timeout", timeout=2)


def test_sigterm_ends_a_live_ssh_session(sshd: Sshd, goma_pt: GomaPt, launcher: Launcher) -> None:
    """A stop does not wait for clients: goma-pt closes the live session and
    exits within a few seconds, and the ssh client learns its session is gone."""
    port = procs.free_port("tcp")
    proc = goma_pt(forward("tcp", port, LOOPBACK4, sshd.port, address=LOOPBACK4))
    client = launcher.start("ssh-client", sshd.ssh(LOOPBACK4, port, "echo started; sleep 30"))
    procs.wait_for_log(client, "started")

    start = time.monotonic()
    assert procs.stop(proc, timeout=5) in CLEAN
    assert time.monotonic() - start < 5
    assert client.popen.wait(10) == 255
    assert "shutdown" in proc.log_text()
