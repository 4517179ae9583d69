"""
Reloading a running service and stopping it gracefully, in-process over
real loopback sockets; drain deadlines run on a Clock.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater

from goma_twisted import ending, load_config
from goma_twisted.config import GatewayConfig
from goma_twisted.reloading import LatestWins, State
from goma_twisted.service import PassThroughService

from .support import (
    Echo,
    Recorder,
    captured_logs,
    connect,
    forward,
    free_port,
    goma_pt_running,
    listen_tcp,
    wait_for,
    write_config,
)


class Tagged(Echo):
    """Echoes with the tag of the backend, so a test sees which target answered."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.tag + data)  # type: ignore[union-attr]


def backend(reactor: Any, tag: bytes) -> Any:
    factory: Any = protocol.Factory.forProtocol(Tagged)
    factory.tag = tag
    return listen_tcp(reactor, factory)


@pytest.fixture
def backends(reactor: Any) -> Any:
    ports = [backend(reactor, tag) for tag in (b"A:", b"B:", b"C:")]
    yield [port.getHost().port for port in ports]
    for port in ports:
        port.stopListening()


async def exchange(reactor: Any, client: Recorder, data: bytes, expect: bytes) -> None:
    client.transport.write(data)  # type: ignore[union-attr]
    for _ in range(200):
        if client.received.endswith(expect):
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"got {client.received!r}, expected it to end with {expect!r}")


async def connected(reactor: Any, port: int) -> Recorder:
    client = Recorder()
    connect(reactor, port, client)
    await client.connected_d.addTimeout(5, reactor)
    return client


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def service_of(*forwards: Any, clock: Any = None, drain_timeout: float = 10) -> PassThroughService:
    service = PassThroughService(
        GatewayConfig("test", forwards), clock=clock, drain_timeout=drain_timeout
    )
    service.startService()
    return service


@pytest_twisted.ensureDeferred
async def test_apply_keeps_unchanged_removes_adds_and_updates(
    reactor: Any, backends: list[int]
) -> None:
    a, b, c = backends
    p1, p2, p3 = free_port(), free_port(), free_port()
    clock = Clock()
    service = service_of(
        forward(target=("127.0.0.1", a), port=p1),
        forward(target=("127.0.0.1", b), port=p2),
        clock=clock,
    )
    kept = service._listeners[("tcp", "127.0.0.1", p1, False)]
    through_kept = await connected(reactor, p1)
    through_removed = await connected(reactor, p2)
    await exchange(reactor, through_kept, b"1", b"A:1")
    await exchange(reactor, through_removed, b"1", b"B:1")

    with captured_logs() as logs:
        applied = await service.apply(
            GatewayConfig(
                "test",
                (
                    forward(target=("127.0.0.1", a), port=p1),  # unchanged
                    forward(target=("127.0.0.1", c), port=p3),  # added
                ),
            )
        )
        await deferLater(reactor, 0.05)
    assert applied
    assert service._listeners[("tcp", "127.0.0.1", p1, False)] is kept
    assert set(service._listeners) == {
        ("tcp", "127.0.0.1", p1, False),
        ("tcp", "127.0.0.1", p3, False),
    }
    # The unchanged forward's connection goes on; the removed one's drains.
    await exchange(reactor, through_kept, b"2", b"A:2")
    await exchange(reactor, through_removed, b"2", b"B:2")
    assert refused(p2)
    added = await connected(reactor, p3)
    await exchange(reactor, added, b"3", b"C:3")
    assert any("Reloaded test: 1 listeners added, 1 removed" in e["log_format"].format(**e)
               for e in logs.events)  # fmt: skip

    # The drain deadline ends the removed forward's last connection.
    clock.advance(10)
    assert await through_removed.lost.addTimeout(5, reactor) == b"B:1B:2"
    assert not through_kept.lost.called
    service.drain_timeout = 0
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_changed_target_applies_to_new_connections(
    reactor: Any, backends: list[int]
) -> None:
    a, b, _ = backends
    port = free_port()
    service = service_of(forward(target=("127.0.0.1", a), port=port), drain_timeout=0)
    listener = service.listeners[0]
    old = await connected(reactor, port)
    await exchange(reactor, old, b"x", b"A:x")
    assert await service.apply(
        GatewayConfig("test", (forward(target=("127.0.0.1", b), port=port, idle_timeout=60.0),))
    )
    assert service.listeners == [listener]
    new = await connected(reactor, port)
    await exchange(reactor, new, b"y", b"B:y")
    await exchange(reactor, old, b"z", b"A:z")
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_moving_a_forward_to_another_address_on_the_same_port(
    reactor: Any, backends: list[int]
) -> None:
    a, b, _ = backends
    port = free_port()
    service = service_of(forward(target=("127.0.0.1", a), port=port), drain_timeout=0)
    assert await service.apply(
        GatewayConfig("test", (forward(target=("127.0.0.1", b), port=port, address="127.0.0.2"),))
    )
    client = Recorder()
    connect(reactor, port, client, host="127.0.0.2")
    await client.connected_d.addTimeout(5, reactor)
    await exchange(reactor, client, b"m", b"B:m")
    assert refused(port)  # nothing on 127.0.0.1 any more
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_forward_that_cannot_bind_rejects_the_whole_reload(
    reactor: Any, backends: list[int]
) -> None:
    a, b, c = backends
    p1, p2 = free_port(), free_port()
    service = service_of(forward(target=("127.0.0.1", a), port=p1), drain_timeout=0)
    before = dict(service._listeners)
    client = await connected(reactor, p1)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", p2))
        blocker.listen()
        with captured_logs() as logs:
            applied = await service.apply(
                GatewayConfig(
                    "test",
                    (
                        forward(target=("127.0.0.1", b), port=p1),
                        forward(target=("127.0.0.1", c), port=p2),
                    ),
                )
            )
    assert not applied
    assert service._listeners == before
    assert service.listeners[0].forward.target.port == a
    await exchange(reactor, client, b"still", b"A:still")
    again = await connected(reactor, p1)
    await exchange(reactor, again, b"new", b"A:new")
    [error] = [e for e in logs.events if e["log_level"].name == "error"]
    assert f"Address already in use; forward to 127.0.0.1:{c}" in error["error"]
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_broken_file_changes_nothing(
    reactor: Any, backends: list[int], tmp_path: Path
) -> None:
    a, b, _ = backends
    port = free_port()
    path = write_config(
        tmp_path / "goma.yml",
        [{"protocol": "tcp", "port": port, "address": "127.0.0.1", "target": f"127.0.0.1:{a}"}],
    )
    from goma_twisted import load_config

    service = PassThroughService(load_config(path), drain_timeout=0)
    service.startService()
    path.write_text(path.read_text().replace(f"127.0.0.1:{a}", "127.0.0.1:99999"))
    with captured_logs() as logs:
        assert not await service.reload()
    [error] = [e for e in logs.events if e["log_level"].name == "error"]
    assert "forwards[0].target: port '99999' is not 1 to 65535" in error["error"]
    client = await connected(reactor, port)
    await exchange(reactor, client, b"ok", b"A:ok")
    path.write_text(path.read_text().replace("127.0.0.1:99999", f"127.0.0.1:{b}"))
    assert await service.reload()
    fresh = await connected(reactor, port)
    await exchange(reactor, fresh, b"ok", b"B:ok")
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_live_connections_up_to_the_deadline(
    reactor: Any, backends: list[int]
) -> None:
    a, _, _ = backends
    clock = Clock()
    service = service_of(forward(target=("127.0.0.1", a), port=free_port()), clock=clock)
    port = service.listeners[0].getHost().port
    finishing, lingering = await connected(reactor, port), await connected(reactor, port)
    await exchange(reactor, finishing, b"1", b"A:1")
    await exchange(reactor, lingering, b"1", b"A:1")
    with captured_logs() as logs:
        stopped: Deferred[Any] = service.stopService()
        await deferLater(reactor, 0.05)
        assert refused(port)  # the listener closes at once
        await exchange(reactor, lingering, b"2", b"A:2")  # live ones go on
        finishing.transport.loseConnection()  # type: ignore[union-attr]
        await finishing.lost
        await deferLater(reactor, 0.05)
        assert not stopped.called
        clock.advance(9.9)
        await deferLater(reactor, 0.05)
        assert not stopped.called
        clock.advance(0.1)
        await stopped.addTimeout(5, reactor)
    assert await lingering.lost == b"A:1A:2"
    reasons = sorted(e["reason"] for e in logs.ends())
    assert reasons == [ending.CLIENT_CLOSED, ending.SHUTDOWN]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_stop_with_no_drain_closes_at_once(reactor: Any, backends: list[int]) -> None:
    a, _, _ = backends
    clock = Clock()
    service = service_of(forward(target=("127.0.0.1", a), port=free_port()), clock=clock,
                         drain_timeout=0)  # fmt: skip
    client = await connected(reactor, service.listeners[0].getHost().port)
    await exchange(reactor, client, b"1", b"A:1")
    await service.stopService().addTimeout(5, reactor)
    assert await client.lost.addTimeout(5, reactor) == b"A:1"


@pytest_twisted.ensureDeferred
async def test_a_reload_changes_who_may_connect(reactor: Any, backends: list[int]) -> None:
    a, _, _ = backends
    port = free_port()
    denied = forward(target=("127.0.0.1", a), port=port, deny=(ip_network("127.0.0.2/32"),))
    service = service_of(denied, drain_timeout=0)
    turned_away = Recorder()
    connect(reactor, port, turned_away, source="127.0.0.2")
    assert await turned_away.lost.addTimeout(5, reactor) == b""
    assert await service.apply(
        GatewayConfig("test", (forward(target=("127.0.0.1", a), port=port),))
    )
    welcome = Recorder()
    connect(reactor, port, welcome, source="127.0.0.2")
    await welcome.connected_d.addTimeout(5, reactor)
    await exchange(reactor, welcome, b"in", b"A:in")
    assert service.listeners[0].factory.refusedCounts == {"denied": 1}  # type: ignore[union-attr]
    await service.stopService()


# One reload at a time: the queue itself, without sockets.


def test_a_job_asked_for_while_one_runs_waits_and_the_latest_wins() -> None:
    queue: LatestWins[str] = LatestWins()
    running: list[tuple[str, Deferred[str]]] = []

    def job(name: str) -> Any:
        def start() -> Deferred[str]:
            d: Deferred[str] = Deferred()
            running.append((name, d))
            return d

        return start

    results: dict[str, list[Any]] = {}
    for name in ("first", "second", "third"):
        results[name] = []
        queue.run(job(name)).addBoth(results[name].append)
    assert [name for name, _ in running] == ["first"]
    assert queue.state is State.QUEUED
    running[0][1].callback("first done")
    # "second" was replaced by "third" before it could start.
    assert [name for name, _ in running] == ["first", "third"]
    assert results == {"first": ["first done"], "second": [], "third": []}
    assert queue.state is State.RUNNING
    running[1][1].callback("third done")
    assert results == {"first": ["first done"], "second": ["third done"], "third": ["third done"]}
    assert queue.state is State.IDLE


def test_a_job_that_fails_passes_its_failure_and_frees_the_queue() -> None:
    queue: LatestWins[int] = LatestWins()

    def broken() -> Deferred[int]:
        raise ValueError("broken")

    failures: list[Any] = []
    queue.run(broken).addErrback(failures.append)
    assert [f.type for f in failures] == [ValueError]
    assert queue.state is State.IDLE
    got: list[int] = []
    queue.run(lambda: succeed(7)).addCallback(got.append)
    assert got == [7]


def test_a_caller_that_asks_again_from_its_result_queues_behind() -> None:
    queue: LatestWins[int] = LatestWins()
    pending: list[Deferred[int]] = []

    def slow() -> Deferred[int]:
        pending.append(Deferred())
        return pending[-1]

    again: list[Deferred[int]] = []
    queue.run(slow).addCallback(lambda _: again.append(queue.run(slow)))
    pending[0].callback(1)
    assert len(pending) == 2 and len(again) == 1
    assert not again[0].called
    pending[1].callback(2)
    assert again[0].result == 2
    assert queue.state is State.IDLE


# One reload at a time: the service.


def file_forward(port: int, target: int) -> dict[str, Any]:
    return {
        "protocol": "tcp",
        "port": port,
        "address": "127.0.0.1",
        "target": f"127.0.0.1:{target}",
    }


@pytest_twisted.ensureDeferred
async def test_two_reloads_in_one_turn_both_apply_the_file(
    reactor: Any, backends: list[int], tmp_path: Path
) -> None:
    a, b, c = backends
    p1, p2, p3 = free_port(), free_port(), free_port()
    path = write_config(tmp_path / "goma.yml", [file_forward(p1, a), file_forward(p2, b)])
    service = PassThroughService(load_config(path), drain_timeout=0)
    service.startService()
    # Remove one forward, add another: the first reload waits for the
    # removed listener to stop, the second is asked for meanwhile.
    write_config(path, [file_forward(p1, a), file_forward(p3, c)])
    with captured_logs() as logs:
        first, second = service.reload(), service.reload()
        assert await first.addTimeout(5, reactor) is True
        assert await second.addTimeout(5, reactor) is True
    assert set(service._listeners) == {
        ("tcp", "127.0.0.1", p1, False),
        ("tcp", "127.0.0.1", p3, False),
    }
    assert [e for e in logs.events if e["log_level"].name in ("error", "critical")] == []
    assert [e["added"] for e in logs.events if "added" in e] == [1, 0]
    client = await connected(reactor, p3)
    await exchange(reactor, client, b"c", b"C:c")
    assert refused(p2)
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_burst_of_reloads_runs_twice_and_the_files_latest_content_wins(
    reactor: Any, backends: list[int], tmp_path: Path
) -> None:
    a, b, c = backends
    p1, p2 = free_port(), free_port()
    path = write_config(tmp_path / "goma.yml", [file_forward(p1, a)])
    service = PassThroughService(load_config(path), drain_timeout=0)
    service.startService()
    write_config(path, [file_forward(p2, b)])
    with captured_logs() as logs:
        first = service.reload()
        burst = []
        for target in (a, b, c):
            # Each one rewrites the file; only the last content is read.
            write_config(path, [file_forward(p1, target), file_forward(p2, c)])
            burst.append(service.reload())
        results = [await d.addTimeout(5, reactor) for d in (first, *burst)]
    assert results == [True] * 4
    assert len([e for e in logs.events if "added" in e]) == 2
    assert [e for e in logs.events if e["log_level"].name in ("error", "critical")] == []
    assert {lst.forward.target.port for lst in service.listeners} == {c}
    client = await connected(reactor, p1)
    await exchange(reactor, client, b"x", b"C:x")
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_fault_inside_a_reload_is_a_rejected_reload(
    reactor: Any, backends: list[int], monkeypatch: Any
) -> None:
    a, b, c = backends
    p1, p2, p3 = free_port(), free_port(), free_port()
    service = service_of(forward(target=("127.0.0.1", a), port=p1), drain_timeout=0)
    before, children = dict(service._listeners), list(service)
    build = service._build

    def broken(wanted: Any) -> Any:
        if wanted.port == p3:
            raise RuntimeError("a fault")
        return build(wanted)

    monkeypatch.setattr(service, "_build", broken)
    new = (forward(target=("127.0.0.1", b), port=p2), forward(target=("127.0.0.1", c), port=p3))
    with captured_logs() as logs:
        applied = await service.apply(GatewayConfig("test", new))
    assert applied is False
    [error] = [e for e in logs.events if e["log_level"].name in ("error", "critical")]
    assert error["log_level"].name == "error"
    assert error["log_format"].startswith("Reload rejected; ")
    assert error["error"] == "RuntimeError: a fault"
    # The listener the reload had started is gone again; the old one serves.
    assert (service._listeners, list(service)) == (before, children)
    await deferLater(reactor, 0.05)  # a listening port closes in a later turn
    assert refused(p2)
    client = await connected(reactor, p1)
    await exchange(reactor, client, b"a", b"A:a")
    # The queue is free again: the next reload runs.
    monkeypatch.undo()
    assert await service.apply(GatewayConfig("test", new))
    assert {key[2] for key in service._listeners} == {p2, p3}
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_reload_asked_for_while_stopping_changes_nothing(
    reactor: Any, backends: list[int]
) -> None:
    # A SIGHUP (or a --watch change) during the drain after a SIGTERM: the
    # service is going away, so nothing starts listening again.
    a, b, _ = backends
    clock = Clock()
    p1, p2 = free_port(), free_port()
    service = service_of(forward(target=("127.0.0.1", a), port=p1), clock=clock)
    client = await connected(reactor, p1)
    await exchange(reactor, client, b"1", b"A:1")
    before = dict(service._listeners)
    with captured_logs() as logs:
        stopped: Deferred[Any] = service.stopService()
        new = (forward(target=("127.0.0.1", a), port=p1),
               forward(target=("127.0.0.1", b), port=p2))  # fmt: skip
        applied = await service.apply(GatewayConfig("test", new))
    assert applied is False
    assert service._listeners == before
    assert [e for e in logs.events if e["log_level"].name in ("error", "critical")] == []
    assert any("stopping" in e["log_format"] for e in logs.events if "log_format" in e)
    await deferLater(reactor, 0.05)
    assert refused(p2)
    clock.advance(10)
    await stopped.addTimeout(5, reactor)


# One reload at a time: a running goma-pt under bursts of SIGHUPs.


class _TaggedHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        received = b""
        while chunk := self.request.recv(65536):
            received += chunk
        self.request.sendall(self.server.tag + received)  # type: ignore[attr-defined]


@pytest.fixture
def threaded_backends() -> Iterator[list[int]]:
    """Two threaded TCP backends outside the reactor, answering "A:"/"B:" + what they got."""
    servers = []
    for tag in (b"A:", b"B:"):
        server: Any = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TaggedHandler)
        server.daemon_threads = True
        server.tag = tag
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [server.server_address[1] for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def hangup(pid: int) -> None:
    """
    A burst of SIGHUPs, spaced so that some land in the same reactor turn
    yet each reaches the process (signals sent back to back merge).
    """
    for gap in range(10):
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.0001 * (gap % 5))


def test_bursts_of_sighups_under_load_leave_the_files_forwards(
    tmp_path: Path, threaded_backends: list[int]
) -> None:
    a, b = threaded_backends
    kept, dropped, added = free_port(), free_port(), free_port()
    # Two contents the file flips between: the second moves the kept
    # forward to B, removes one forward and adds another.
    first = [file_forward(kept, a), file_forward(dropped, a)]
    second = [file_forward(kept, b), file_forward(added, b)]
    config = write_config(tmp_path / "goma.yml", first)
    log = tmp_path / "goma.log"
    stop = threading.Event()
    answers: list[bytes] = []
    failures: list[BaseException] = []

    def load() -> None:
        # Bounded in count; the test stops it sooner.
        for _ in range(5000):
            if stop.is_set():
                return
            try:
                answers.append(roundtrip(kept, b"x"))
            except OSError as e:
                failures.append(e)

    with goma_pt_running(config, log) as proc:
        loaders = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for loader in loaders:
            loader.start()
        try:
            for round_ in range(24):
                write_config(config, second if round_ % 2 == 0 else first)
                hangup(proc.pid)
                time.sleep(0.1)
            write_config(config, second)
            hangup(proc.pid)
            # The last reload reads the last content: B behind the kept port,
            # the added forward listening, the dropped one gone.
            wait_for(
                lambda: roundtrip(kept, b"y") == b"B:y" and refused(dropped),
                timeout=20,
                what="the file's final forwards",
            )
        finally:
            stop.set()
            for loader in loaders:
                loader.join(10)
        assert roundtrip(added, b"z") == b"B:z"
        assert proc.poll() is None
    text = log.read_text()
    assert "Traceback" not in text
    assert "Unhandled" not in text
    assert "Reload rejected" not in text
    assert text.count("Reloaded ") >= 2
    assert failures == []
    assert answers and set(answers) <= {b"A:x", b"B:x"}
