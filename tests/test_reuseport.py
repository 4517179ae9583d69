"""
C{reusePort: true}: several goma-pt services (processes, here in one
process) share one port, TCP and UDP; reload and stop keep working.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.threads import deferToThread

from goma_twisted.config import GatewayConfig
from goma_twisted.service import ListenError, PassThroughService

from .support import UDPEcho, forward, free_port
from .test_reload import Tagged, connected, exchange


def shared(port: int, target: int, reuse_port: bool = True) -> Any:
    return forward(("tcp", "udp"), target=("127.0.0.1", target), port=port, reuse_port=reuse_port)


def service_of(*forwards: Any) -> PassThroughService:
    service = PassThroughService(GatewayConfig("test", forwards), drain_timeout=0)
    service.startService()
    return service


@pytest.fixture
def tagged_backend(reactor: Any) -> Any:
    factory: Any = protocol.Factory.forProtocol(Tagged)
    factory.tag = b"T:"
    target = free_port()
    tcp_port = reactor.listenTCP(target, factory, interface="127.0.0.1")
    udp_port = reactor.listenUDP(target, UDPEcho(b"udp:"), interface="127.0.0.1")
    yield target
    tcp_port.stopListening()
    udp_port.stopListening()


def udp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recv(65535)


@pytest_twisted.ensureDeferred
async def test_two_services_share_a_port_and_one_survives_the_other(
    reactor: Any, tagged_backend: int
) -> None:
    port = free_port()
    first = service_of(shared(port, tagged_backend))
    second = service_of(shared(port, tagged_backend))
    try:
        for service in (first, second):
            hosts = {listener.getHost().port for listener in service.listeners}
            assert hosts == {port}
        client = await connected(reactor, port)
        await exchange(reactor, client, b"hi", b"T:hi")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await first.stopService()
        client = await connected(reactor, port)
        await exchange(reactor, client, b"still", b"T:still")
        client.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        if first.running:
            await first.stopService()
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_a_port_shared_only_by_consent(reactor: Any, tagged_backend: int) -> None:
    # Without reusePort on both sides, the port is in use as before.
    port = free_port()
    plain = service_of(shared(port, tagged_backend, reuse_port=False))
    try:
        with pytest.raises(ListenError, match="in use"):
            service_of(shared(port, tagged_backend))
    finally:
        await plain.stopService()
    reusing = service_of(shared(port, tagged_backend))
    try:
        with pytest.raises(ListenError, match="in use"):
            service_of(shared(port, tagged_backend, reuse_port=False))
    finally:
        await reusing.stopService()


@pytest_twisted.ensureDeferred
async def test_udp_through_a_shared_port(reactor: Any, tagged_backend: int) -> None:
    port = free_port()
    service = service_of(shared(port, tagged_backend))
    try:
        answer = await deferToThread(udp_roundtrip, port, b"dgram")
        assert answer == b"udp:dgram"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_reload_turns_reuse_port_on_and_off(reactor: Any, tagged_backend: int) -> None:
    port = free_port()
    service = service_of(shared(port, tagged_backend, reuse_port=False))
    try:
        assert await service.apply(GatewayConfig("test", (shared(port, tagged_backend),)))
        assert {key[3] for key in service._listeners} == {True}
        other = service_of(shared(port, tagged_backend))  # now it can share
        await other.stopService()
        client = await connected(reactor, port)
        await exchange(reactor, client, b"on", b"T:on")
        client.transport.loseConnection()  # type: ignore[union-attr]
        assert await service.apply(
            GatewayConfig("test", (shared(port, tagged_backend, reuse_port=False),))
        )
        assert {key[3] for key in service._listeners} == {False}
        with pytest.raises(ListenError):
            service_of(shared(port, tagged_backend))
        client = await connected(reactor, port)
        await exchange(reactor, client, b"off", b"T:off")
        client.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        await service.stopService()
