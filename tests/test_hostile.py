"""
A hostile user's cases for the lean TCP set-up and relay: clients that
reset or close while their target is still connecting, targets that reset,
stops while connects are pending, and descriptors back to their count.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

import pytest_twisted
from twisted.internet import protocol
from twisted.internet.task import Clock, deferLater

from goma_twisted import ending

from .support import (
    FullBacklog,
    Recorder,
    accept_raw,
    bound_port,
    captured_logs,
    client_half_closed,
    factory_of,
    finished,
    forward,
    listen_tcp,
    open_fds,
    raw_client,
    raw_listener,
    read_to_eof,
    relays,
    reset,
    start_service,
    udp_relay,
    until,
)


@pytest_twisted.ensureDeferred
async def test_a_client_reset_while_its_target_connects(reactor: Any) -> None:
    backlog = FullBacklog()
    service = start_service(forward(target=("127.0.0.1", backlog.port)))
    try:
        with captured_logs() as logs:
            client = raw_client(bound_port(service))
            client.sendall(b"early")
            await until(reactor, lambda: relays(service))
            reset(client)
            await deferLater(reactor, 0.1)
            backlog.release()
            conn = await accept_raw(reactor, backlog.listener)
            with conn:
                await read_to_eof(reactor, conn)
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        backlog.close()
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_RESET


@pytest_twisted.ensureDeferred
async def test_a_target_that_resets_at_once(reactor: Any) -> None:
    class Resetter(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.abortConnection()  # type: ignore[union-attr]

    target = listen_tcp(reactor, protocol.Factory.forProtocol(Resetter))
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    try:
        with captured_logs() as logs:
            client = raw_client(bound_port(service))
            client.sendall(b"hello")
            with client:
                assert await read_to_eof(reactor, client) == b""
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        await target.stopListening()
    [end] = logs.ends()
    assert end["reason"] == ending.TARGET_RESET


@pytest_twisted.ensureDeferred
async def test_half_closes_in_turn_with_data_after_the_first(reactor: Any) -> None:
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    try:
        with captured_logs() as logs:
            client, conn = await client_half_closed(reactor, service, listener, b"request")
            conn.sendall(b"answer 1")
            await deferLater(reactor, 0.05)
            conn.sendall(b", answer 2")
            conn.shutdown(socket.SHUT_WR)
            assert await read_to_eof(reactor, client) == b"answer 1, answer 2"
            await until(reactor, lambda: not relays(service))
            client.close()
            conn.close()
    finally:
        await service.stopService()
        listener.close()
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_CLOSED
    assert (end["bytesToTarget"], end["bytesToClient"]) == (7, 18)


@pytest_twisted.ensureDeferred
async def test_20_mb_then_half_close_at_once(reactor: Any) -> None:
    class Counter(Recorder):
        hash: Any
        count: int

        def dataReceived(self, data: bytes) -> None:
            self.hash.update(data)
            self.count += len(data)

        def readConnectionLost(self) -> None:
            self.transport.write(str(self.count).encode())  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    counters: list[Counter] = []

    def build() -> Counter:
        c = Counter()
        c.hash = hashlib.sha256()
        c.count = 0
        counters.append(c)
        return c

    factory = protocol.Factory()
    factory.protocol = build
    target = listen_tcp(reactor, factory)
    service = start_service(forward(target=("127.0.0.1", target.getHost().port)))
    payload = os.urandom(20 * 1024 * 1024)
    client = Recorder(send=payload, halfClose=True)
    try:
        with captured_logs() as logs:
            from .support import connect

            connect(reactor, bound_port(service), client)
            assert await finished(reactor, client.lost, 30) == str(len(payload)).encode()
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        await target.stopListening()
    assert counters[0].hash.digest() == hashlib.sha256(payload).digest()
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_CLOSED
    assert end["bytesToTarget"] == len(payload)


@pytest_twisted.ensureDeferred
async def test_stop_with_connects_pending_and_clients_held(reactor: Any) -> None:
    before = open_fds()
    backlog = FullBacklog()
    service = start_service(forward(target=("127.0.0.1", backlog.port)))
    clients = []
    try:
        with captured_logs() as logs:
            for _ in range(3):
                clients.append(raw_client(bound_port(service)))
                clients[-1].sendall(b"x")
            await until(reactor, lambda: len(relays(service)) == 3)
            await finished(reactor, service.stopService())
            for c in clients:
                assert await read_to_eof(reactor, c) == b""
    finally:
        for c in clients:
            c.close()
        backlog.close()
    assert [e["reason"] for e in logs.ends()] == [ending.SHUTDOWN] * 3
    await deferLater(reactor, 0.05)
    assert open_fds() == before


@pytest_twisted.ensureDeferred
async def test_drain_deadline_with_connects_pending(reactor: Any) -> None:
    backlog = FullBacklog()
    clock = Clock()
    service = start_service(
        forward(target=("127.0.0.1", backlog.port), connect_timeout=60),
        clock=clock,
        drain_timeout=5,
    )
    try:
        with captured_logs() as logs:
            client = raw_client(bound_port(service))
            await until(reactor, lambda: relays(service))
            stopped = service.stopService()
            await deferLater(reactor, 0.05)
            assert not stopped.called
            clock.advance(5)
            await finished(reactor, stopped)
            assert await read_to_eof(reactor, client) == b""
            client.close()
    finally:
        backlog.close()
    [end] = logs.ends()
    assert end["reason"] == ending.SHUTDOWN
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_hostname_target_still_works(reactor: Any) -> None:
    from .support import Echo

    target = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    service = start_service(forward(target=("localhost", target.getHost().port)))
    try:
        assert getattr(factory_of(service), "targetAddress", None) is None
        client = raw_client(bound_port(service))
        client.sendall(b"by name")
        client.shutdown(socket.SHUT_WR)
        assert await read_to_eof(reactor, client) == b"by name"
        client.close()
        await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        await target.stopListening()


@pytest_twisted.ensureDeferred
async def test_dual_stack_listener_with_a_mapped_ipv4_client(reactor: Any) -> None:
    from .support import Echo

    target = listen_tcp(reactor, protocol.Factory.forProtocol(Echo), interface="::1")
    service = start_service(forward(target=("::1", target.getHost().port), address="::"))
    try:
        with captured_logs() as logs:
            client = raw_client(bound_port(service))
            client.sendall(b"mapped")
            client.shutdown(socket.SHUT_WR)
            assert await read_to_eof(reactor, client) == b"mapped"
            client.close()
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        await target.stopListening()
    [end] = logs.ends()
    assert end["client"].startswith("127.0.0.1:")  # shown as the IPv4 it is
    assert end["targetAddress"].startswith("[::1]:")


@pytest_twisted.ensureDeferred
async def test_max_connections_counts_held_clients(reactor: Any) -> None:
    backlog = FullBacklog()
    service = start_service(forward(target=("127.0.0.1", backlog.port), max_connections=2))
    clients = []
    try:
        for _ in range(3):
            clients.append(raw_client(bound_port(service)))
        await until(reactor, lambda: len(relays(service)) == 2)
        assert await read_to_eof(reactor, clients[2]) == b""
        reset(clients[0])
        backlog.release()
        conn = await accept_raw(reactor, backlog.listener)
        conn.close()
        await until(reactor, lambda: len(relays(service)) < 2, within=8)
        factory = factory_of(service)
        assert factory.bounds.open == len(relays(service))
    finally:
        await service.stopService()
        for c in clients[1:]:
            c.close()
        backlog.close()


@pytest_twisted.ensureDeferred
async def test_a_reload_changing_the_target_while_connects_are_pending(reactor: Any) -> None:
    from goma_twisted.config import GatewayConfig

    from .support import Echo, free_port

    backlog = FullBacklog()
    target = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    port = free_port()
    service = start_service(forward(target=("127.0.0.1", backlog.port), port=port))
    try:
        with captured_logs() as logs:
            old = raw_client(port)
            old.sendall(b"old")
            old.shutdown(socket.SHUT_WR)
            await until(reactor, lambda: relays(service))
            assert await service.apply(
                GatewayConfig(
                    "test", (forward(target=("127.0.0.1", target.getHost().port), port=port),)
                )
            )
            new = raw_client(port)
            new.sendall(b"new")
            new.shutdown(socket.SHUT_WR)
            assert await read_to_eof(reactor, new) == b"new"
            backlog.release()
            conn = await accept_raw(reactor, backlog.listener)
            with conn:
                assert await read_to_eof(reactor, conn) == b"old"
            assert await read_to_eof(reactor, old) == b""
            old.close()
            new.close()
            await until(reactor, lambda: not relays(service))
    finally:
        await service.stopService()
        await target.stopListening()
        backlog.close()
    assert len(logs.ends()) == 2


@pytest_twisted.ensureDeferred
async def test_descriptors_come_back_after_mixed_outcomes(reactor: Any) -> None:
    from .support import Echo

    target = listen_tcp(reactor, protocol.Factory.forProtocol(Echo))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    backlog = FullBacklog()
    clock = Clock()
    services = [
        start_service(forward(target=("127.0.0.1", target.getHost().port))),
        start_service(forward(target=("127.0.0.1", dead))),
        start_service(forward(target=("127.0.0.1", backlog.port), connect_timeout=5), clock=clock),
    ]
    before = open_fds()
    try:
        for _round in range(5):
            clients = []
            for i in range(30):
                c = raw_client(bound_port(services[i % 3]))
                c.sendall(b"x")
                if i % 2:
                    c.shutdown(socket.SHUT_WR)
                clients.append(c)
            await deferLater(reactor, 0.05)
            clock.advance(5)
            for i, c in enumerate(clients):
                if i % 6 == 5:
                    reset(c)
                    continue
                await read_to_eof(reactor, c) if i % 2 else None
                c.close()
            await until(reactor, lambda: all(not relays(svc) for svc in services))
        await deferLater(reactor, 0.1)
        assert open_fds() == before
    finally:
        for svc in services:
            await svc.stopService()
        await target.stopListening()
        backlog.close()


@pytest_twisted.ensureDeferred
async def test_udp_sessions_of_a_forward_removed_by_a_reload_free_their_sockets(
    reactor: Any,
) -> None:
    from goma_twisted import udp
    from goma_twisted.config import GatewayConfig

    from .support import UDPEcho, free_port

    before = open_fds()
    backend = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
    kept = forward(("tcp",), ("127.0.0.1", 1), port=free_port())
    gone = forward(
        ("udp",), ("127.0.0.1", backend.getHost().port), port=free_port(socket.SOCK_DGRAM)
    )
    service = start_service(kept, gone)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        with captured_logs() as logs:
            for c in clients:
                c.setblocking(False)
                c.sendto(b"q", ("127.0.0.1", gone.port))
            relay = udp_relay(service)
            await until(reactor, lambda: len(relay.sessions) == 5)
            assert await service.apply(GatewayConfig("test", (kept,)))
            await deferLater(reactor, 0.05)
            assert relay.sessions == {}
    finally:
        for c in clients:
            c.close()
        await service.stopService()
        await backend.stopListening()
    assert open_fds() == before
    assert [e["reason"] for e in logs.ends()] == [udp.SHUTDOWN] * 5


@pytest_twisted.ensureDeferred
async def test_a_client_reset_met_first_by_a_send_is_still_a_reset(reactor: Any) -> None:
    # The target's next bytes meet the client's reset in send(), which
    # clears the socket's error: the read that follows finds only an end
    # of stream.
    listener = raw_listener()
    service = start_service(forward(target=("127.0.0.1", listener.getsockname()[1])))
    try:
        with captured_logs() as logs:
            client = raw_client(bound_port(service))
            conn = await accept_raw(reactor, listener)
            client.sendall(b"hello")
            assert await _read_some(reactor, conn) == b"hello"
            [relay] = relays(service)
            # Without the reactor running: the target's answer is read (and
            # sent at once) before the client's event is handled, as when
            # both come in one poll and the target's is first.
            reset(client)
            conn.sendall(b"answer")
            time.sleep(0.05)
            assert relay.target.transport.doRead() is None
            await until(reactor, lambda: not relays(service))
            conn.close()
    finally:
        await service.stopService()
        listener.close()
    [end] = logs.ends()
    assert end["reason"] == ending.CLIENT_RESET


async def _read_some(reactor: Any, conn: socket.socket, within: float = 8) -> bytes:
    for _ in range(int(within / 0.01)):
        try:
            return conn.recv(65536)
        except BlockingIOError:
            await deferLater(reactor, 0.01)
    raise AssertionError("nothing came")
