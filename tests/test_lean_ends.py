"""
Hostile cases for the relay's lean end of stream (a half-close passed on by
the relay itself, both sides closed without Twisted's chain): timeouts,
stops and resets meeting a half-closed pair; counts and descriptors after.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock, deferLater

from goma_twisted import ending, policy
from goma_twisted.config import GatewayConfig

from .support import (
    accept_raw,
    bound_port,
    captured_logs,
    client_half_closed,
    factory_of,
    forward,
    free_port,
    goma_pt_running,
    open_fds,
    raw_client,
    raw_listener,
    read_to_eof,
    relays,
    reset,
    start_service,
    twistd_command,
    twistd_env,
    until,
    wait_for,
    write_config,
)
from .test_twistd import backend, tcp_roundtrip

__all__ = ["backend"]  # the fixture, used by name


def open_sockets() -> int:
    """This process's open sockets (other descriptors come and go with the test run)."""
    open_fds()  # collects what earlier tests left behind
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


def stats_of(service: Any) -> Any:
    return service.listeners[0].factory.stats


@pytest_twisted.ensureDeferred
async def test_a_half_closed_pair_hit_by_the_idle_timeout(reactor: Any) -> None:
    before = open_sockets()
    listener = raw_listener()
    service = start_service(
        forward(target=("127.0.0.1", listener.getsockname()[1]), idle_timeout=0.3)
    )
    try:
        with captured_logs() as logs:
            client, conn = await client_half_closed(reactor, service, listener, b"ask")
            conn.sendall(b"part")
            # The target stays silent; the idle timeout ends the pair.
            assert await read_to_eof(reactor, client) == b"part"
            await until(reactor, lambda: not relays(service))
            client.close()
            conn.close()
    finally:
        await service.stopService()
        listener.close()
    [end] = logs.ends()
    assert (end["bytesToTarget"], end["bytesToClient"]) == (3, 4)
    assert stats_of(service).active == 0
    assert open_sockets() <= before  # an earlier test's may close meanwhile


@pytest_twisted.ensureDeferred
async def test_a_half_closed_pair_at_a_stop(reactor: Any) -> None:
    before = open_sockets()
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    with captured_logs() as logs:
        client = raw_client(bound_port(service))
        conn = await accept_raw(reactor, listener)
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        assert await read_to_eof(reactor, client) == b"hello"
        client.sendall(b"more")
        got = bytearray()

        def more() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.extend(conn.recv(100))
            return bytes(got) == b"more"

        await until(reactor, more)
        await service.stopService()
        assert await read_to_eof(reactor, conn) == b""
        client.close()
        conn.close()
    listener.close()
    [end] = logs.ends()
    assert end["reason"] == ending.TARGET_CLOSED
    assert (end["bytesToTarget"], end["bytesToClient"]) == (4, 5)
    assert stats_of(service).active == 0
    assert open_sockets() <= before  # an earlier test's may close meanwhile


@pytest_twisted.ensureDeferred
async def test_a_reset_after_a_fin_with_the_target_still_answering(reactor: Any) -> None:
    before = open_sockets()
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    try:
        with captured_logs() as logs:
            client, conn = await client_half_closed(reactor, service, listener, b"ask")
            reset(client)
            await deferLater(reactor, 0.05)
            for _ in range(5):
                try:
                    conn.sendall(b"x" * 1000)
                except OSError:
                    break
                await deferLater(reactor, 0.02)
            # The relay may have ended the pair already.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            await until(reactor, lambda: not relays(service))
            conn.close()
    finally:
        await service.stopService()
        listener.close()
    [end] = logs.ends()
    assert end["reason"] in (ending.CLIENT_CLOSED, ending.CLIENT_RESET)
    assert stats_of(service).active == 0
    assert open_sockets() <= before  # an earlier test's may close meanwhile


@pytest_twisted.ensureDeferred
async def test_both_fins_in_one_turn_many_times(reactor: Any) -> None:
    before = open_sockets()
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    try:
        with captured_logs() as logs:
            for _ in range(30):
                client = raw_client(bound_port(service))
                conn = await accept_raw(reactor, listener)
                client.sendall(b"a")
                conn.sendall(b"bb")
                await deferLater(reactor, 0.01)
                client.shutdown(socket.SHUT_WR)
                conn.shutdown(socket.SHUT_WR)
                assert await read_to_eof(reactor, client) == b"bb"
                assert await read_to_eof(reactor, conn) == b"a"
                client.close()
                conn.close()
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        listener.close()
    ends = logs.ends()
    assert len(ends) == 30
    assert all((e["bytesToTarget"], e["bytesToClient"]) == (1, 2) for e in ends)
    assert stats_of(service).active == 0
    assert open_sockets() <= before  # an earlier test's may close meanwhile


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_header_data_and_fin_in_one_segment_both_ways(
    reactor: Any,
) -> None:
    before = open_sockets()
    listener = raw_listener()
    service = start_service(
        forward(
            target=("127.0.0.1", listener.getsockname()[1]),
            accept_proxy_protocol=(ipaddress.ip_network("127.0.0.0/8"),),
            proxy_protocol=1,
        )
    )
    header = b"PROXY TCP4 192.0.2.7 192.0.2.9 4000 80\r\n"
    try:
        with captured_logs() as logs:
            for round in range(10):
                client = raw_client(bound_port(service))
                if round % 2:
                    client.sendall(header + b"ask")
                    client.shutdown(socket.SHUT_WR)
                else:
                    client.sendall(header)
                conn = await accept_raw(reactor, listener)
                if not round % 2:
                    client.sendall(b"ask")
                    client.shutdown(socket.SHUT_WR)
                received = await read_to_eof(reactor, conn)
                assert received.startswith(b"PROXY TCP4 192.0.2.7 ") and received.endswith(
                    b"\r\nask"
                )
                conn.sendall(b"answer")
                conn.shutdown(socket.SHUT_WR)
                assert await read_to_eof(reactor, client) == b"answer"
                client.close()
                conn.close()
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        listener.close()
    ends = logs.ends()
    assert len(ends) == 10
    assert {(e["client"], e["reason"], e["bytesToTarget"], e["bytesToClient"]) for e in ends} == {
        ("192.0.2.7:4000", ending.CLIENT_CLOSED, 3, 6)
    }
    assert stats_of(service).active == 0
    assert open_sockets() <= before  # an earlier test's may close meanwhile


def _answering_target() -> tuple[socket.socket, threading.Thread]:
    """A target that reads each connection to its end, answers, half-closes, closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.settimeout(0.2)

    def serve() -> None:
        while listener.fileno() != -1:
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                try:
                    while conn.recv(65536):
                        pass
                    conn.sendall(b"answer")
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_storm_of_ends_in_a_real_twistd(tmp_path: Path, stop: int) -> None:
    # Clean ends, resets after a FIN, bare connects and resets: every end
    # line is in the log at the stop, descriptors are back, no stray error.
    target, thread = _answering_target()
    port = free_port()
    config = write_config(
        tmp_path / "goma.yml",
        [
            {
                "protocol": "tcp",
                "port": port,
                "address": "127.0.0.1",
                "target": f"127.0.0.1:{target.getsockname()[1]}",
            }
        ],
    )
    log = tmp_path / "goma.log"
    rounds = 60
    try:
        with goma_pt_running(config, log) as proc:
            baseline = _proc_fds(proc.pid)
            for i in range(rounds):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    kind = i % 4
                    if kind == 0:
                        c.sendall(b"ask")
                        c.shutdown(socket.SHUT_WR)
                        got = b""
                        while chunk := c.recv(100):
                            got += chunk
                        assert got == b"answer"
                    elif kind == 1:
                        c.sendall(b"ask")
                        c.shutdown(socket.SHUT_WR)
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    elif kind == 2:
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    else:
                        c.shutdown(socket.SHUT_WR)
            wait_for(
                lambda: log.read_text().count(" -> 127.0.0.1:") >= rounds,
                what="every end line",
            )
            wait_for(lambda: _proc_fds(proc.pid) == baseline, what="descriptors back")
            proc.send_signal(stop)
            # twistd 26.10 ends by its signal, as an unhandled one would.
            assert proc.wait(10) in (0, -stop)
    finally:
        target.close()
        thread.join(2)
    text = log.read_text()
    lines = text.splitlines()
    assert "Traceback" not in text and "Unhandled" not in text
    assert sum(" -> 127.0.0.1:" in line and "; " in line for line in lines) == rounds
    assert lines[-1].endswith("Server Shut Down.")


@pytest_twisted.ensureDeferred
async def test_a_drain_ends_as_a_half_closed_pair_finishes_on_its_own(reactor: Any) -> None:
    before = open_sockets()
    listener = raw_listener()
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", listener.getsockname()[1])), clock=clock, drain_timeout=30
    )
    with captured_logs() as logs:
        client, conn = await client_half_closed(reactor, service, listener, b"ask")
        stopped = service.stopService()
        stops: list[Any] = []
        stopped.addBoth(stops.append)
        await deferLater(reactor, 0.05)
        assert not stops  # draining: the pair is still live
        conn.sendall(b"answer")
        conn.shutdown(socket.SHUT_WR)
        assert await read_to_eof(reactor, client) == b"answer"
        await until(reactor, lambda: bool(stops))
        client.close()
        conn.close()
    listener.close()
    [end] = logs.ends()
    assert (end["reason"], end["bytesToTarget"], end["bytesToClient"]) == (
        ending.CLIENT_CLOSED,
        3,
        6,
    )
    assert not clock.getDelayedCalls()
    assert stats_of(service).active == 0
    assert open_sockets() <= before  # an earlier test's may close meanwhile


def test_a_text_log_nobody_reads_any_more_does_not_stop_the_forwarding(
    tmp_path: Path, backend: int
) -> None:
    # twistd -n ... | some-filter, and the filter exits: each gathered
    # write fails (EPIPE). The relay must go on forwarding, not spin.
    port = free_port()
    config = write_config(
        tmp_path / "goma.yml",
        [
            {
                "protocol": "tcp",
                "port": port,
                "address": "127.0.0.1",
                "target": f"127.0.0.1:{backend}",
            }
        ],
    )
    read, write = os.pipe()
    command = twistd_command("-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(config))
    proc = subprocess.Popen(command, stdout=write, stderr=subprocess.DEVNULL, env=twistd_env())
    os.close(write)
    try:
        seen = b""
        deadline = time.monotonic() + 10
        while b"goma-pt ready" not in seen and time.monotonic() < deadline:
            chunk = os.read(read, 4096)
            if not chunk:
                break
            seen += chunk
        assert b"goma-pt ready" in seen
        os.close(read)
        read = -1
        for _ in range(3):
            assert tcp_roundtrip(port, b"ping") == b"ping"
    finally:
        if read != -1:
            os.close(read)
        proc.terminate()
        proc.wait(10)


@pytest_twisted.ensureDeferred
async def test_a_reload_removing_the_forward_of_a_half_closed_pair(reactor: Any) -> None:
    # The removed forward's pair drains: the target's answer still arrives
    # after the reload, and the drain deadline ends what is left.
    before = open_sockets()
    listener = raw_listener()
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", listener.getsockname()[1])), clock=clock, drain_timeout=10
    )
    with captured_logs() as logs:
        client, conn = await client_half_closed(reactor, service, listener, b"ask")
        factory = factory_of(service)
        assert await service.apply(GatewayConfig("test", ()))
        conn.sendall(b"part")
        await until(reactor, lambda: factory.stats.bytes_to_client == 4)
        clock.advance(10)
        assert await read_to_eof(reactor, client) == b"part"
        await until(reactor, lambda: not factory.relays)
        client.close()
        conn.close()
    await service.stopService()
    listener.close()
    [end] = logs.ends()
    assert (end["reason"], end["bytesToTarget"], end["bytesToClient"]) == (
        ending.CLIENT_CLOSED,
        3,
        4,
    )
    assert factory.stats.active == 0
    assert not clock.getDelayedCalls()
    assert open_sockets() <= before  # an earlier test's may close meanwhile


@pytest_twisted.ensureDeferred
async def test_lean_ends_give_back_their_max_connections_slots(reactor: Any) -> None:
    listener = raw_listener()
    service = start_service(
        forward(
            target=("127.0.0.1", listener.getsockname()[1]),
            max_connections=2,
            max_connections_per_ip=2,
        )
    )
    factory = factory_of(service)
    try:
        for i in range(12):
            client = raw_client(bound_port(service))
            conn = await accept_raw(reactor, listener)
            # Client first, target first, or both in one turn.
            if i % 3 != 1:
                client.shutdown(socket.SHUT_WR)
            if i % 3 != 0:
                conn.shutdown(socket.SHUT_WR)
            if i % 3 == 0:
                assert await read_to_eof(reactor, conn) == b""
                conn.shutdown(socket.SHUT_WR)
            elif i % 3 == 1:
                assert await read_to_eof(reactor, client) == b""
                client.shutdown(socket.SHUT_WR)
            assert await read_to_eof(reactor, client) == b""
            assert await read_to_eof(reactor, conn) == b""
            client.close()
            conn.close()
            await until(reactor, lambda: not factory.relays)
        assert (factory.bounds.open, factory.bounds.by_ip, factory.stats.active) == (0, {}, 0)
        # Both slots are free again; a third client is refused.
        held = [raw_client(bound_port(service)) for _ in range(2)]
        conns = [await accept_raw(reactor, listener) for _ in held]
        third = raw_client(bound_port(service))
        assert await read_to_eof(reactor, third) == b""
        assert factory.refusedCounts == {policy.AT_BOUND: 1}
        for skt in [*held, *conns, third]:
            skt.close()
    finally:
        await service.stopService()
        listener.close()
