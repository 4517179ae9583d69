"""
Reloading a running service and stopping it gracefully, in-process over
real loopback sockets; drain deadlines run on a Clock.
"""

from __future__ import annotations

import socket
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from goma_twisted import ending
from goma_twisted.config import GatewayConfig
from goma_twisted.service import PassThroughService

from .support import (
    Echo,
    Recorder,
    captured_logs,
    connect,
    forward,
    free_port,
    listen_tcp,
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
