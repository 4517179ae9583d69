"""A grpcio server through a `tcp` forward: health Check, a 4 MB unary call, a
1,000-message server stream, and deadlines against a target that never accepts.

The server runs on grpcio's own threads in this process; no Twisted reactor is
involved on this side of goma-pt. Methods use raw bytes, so no protoc step.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

from . import procs
from .goma import GomaPt, Route, forward
from .procs import LOOPBACK4, bracket, require_module

pytestmark = pytest.mark.e2e

grpc = require_module("grpc")
health = require_module("grpc_health.v1.health")
health_pb2 = require_module("grpc_health.v1.health_pb2")
health_pb2_grpc = require_module("grpc_health.v1.health_pb2_grpc")

SERVICE = "goma.e2e.Echo"
FOUR_MB = 4 * 1024 * 1024
STREAM_COUNT = 1000
DEADLINE = 1.0
_MAX = 16 * 1024 * 1024  # above the 4 MB payload plus framing; grpc's default is 4 MiB
OPTIONS = [
    ("grpc.max_send_message_length", _MAX),
    ("grpc.max_receive_message_length", _MAX),
]


def frame(i: int) -> bytes:
    """Stream message i: its number and a digest, so a lost, doubled or reordered
    message shows up as a mismatch."""
    return f"{i:06d}:".encode() + hashlib.sha256(i.to_bytes(4, "big")).digest() * 8


def _echo(request: bytes, context: Any) -> bytes:
    return request


def _count(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(int(request)):
        yield frame(i)


@pytest.fixture
def grpc_server() -> Iterator[int]:
    """Echo/Count plus the standard health service on a loopback port."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Count": grpc.unary_stream_rpc_method_handler(_count),
        },
    )
    # No SO_REUSEPORT: grpc's default would let it share a port someone else holds.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        handlers=[handler],
        options=[*OPTIONS, ("grpc.so_reuseport", 0)],
    )
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for name in ("", SERVICE):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"{LOOPBACK4}:{procs.free_port('tcp')}")
    assert port, "grpc server could not bind"
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(5)


@pytest.fixture
def never_accepts() -> Iterator[int]:
    """A port whose SYNs go unanswered: a listener with backlog 0 whose accept queue
    is already full (Linux then drops new SYNs; the client keeps retrying)."""
    port = procs.free_port("tcp")
    fillers: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind((LOOPBACK4, port))
        listener.listen(0)
        try:
            for _ in range(8):
                s = socket.socket()
                s.settimeout(0.5)
                try:
                    s.connect((LOOPBACK4, port))
                except TimeoutError:
                    s.close()
                    break  # the queue is full: this very connect went unanswered
                fillers.append(s)
            else:
                pytest.fail("could not fill the accept queue of a backlog-0 listener")
            yield port
        finally:
            for s in fillers:
                s.close()


def channel(host: str, port: int) -> Any:
    # No proxy from the environment: traffic stays on loopback, to goma-pt.
    return grpc.insecure_channel(
        f"{bracket(host)}:{port}", options=[*OPTIONS, ("grpc.enable_http_proxy", 0)]
    )


def test_grpc_health_check_serving(grpc_server: int, route: Route) -> None:
    host, port = route("tcp", LOOPBACK4, grpc_server)
    with channel(host, port) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_unary_4mb(grpc_server: int, route: Route) -> None:
    host, port = route("tcp", LOOPBACK4, grpc_server)
    payload = os.urandom(FOUR_MB)
    with channel(host, port) as ch:
        reply = ch.unary_unary(f"/{SERVICE}/Echo")(payload, timeout=30)
    assert len(reply) == FOUR_MB
    assert hashlib.sha256(reply).digest() == hashlib.sha256(payload).digest()


def test_grpc_server_stream_1000_messages(grpc_server: int, route: Route) -> None:
    host, port = route("tcp", LOOPBACK4, grpc_server)
    with channel(host, port) as ch:
        got = list(ch.unary_stream(f"/{SERVICE}/Count")(str(STREAM_COUNT).encode(), timeout=30))
    assert got == [frame(i) for i in range(STREAM_COUNT)]


def _failing_call(host: str, port: int, timeout: float) -> tuple[Any, float]:
    """Make one call that must fail; return its status code and how long it took."""
    with channel(host, port) as ch:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{SERVICE}/Echo")(b"ping", timeout=timeout)
        return err.value.code(), time.monotonic() - start


def test_grpc_deadline_shorter_than_connect_timeout(never_accepts: int, route: Route) -> None:
    """goma-pt accepts at once and then waits up to 30 s for the target: the client's
    own 1 s deadline still ends the call, as DEADLINE_EXCEEDED, on time."""
    host, port = route("tcp", LOOPBACK4, never_accepts, timeout=30)
    code, elapsed = _failing_call(host, port, DEADLINE)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 2


def test_grpc_connect_timeout_shorter_than_deadline(never_accepts: int, goma_pt: GomaPt) -> None:
    """The other way round: goma-pt gives up connecting after 1 s and closes the
    client, which fails the call UNAVAILABLE then, not at its 10 s deadline."""
    port = procs.free_port("tcp")
    goma_pt(forward("tcp", port, LOOPBACK4, never_accepts, address=LOOPBACK4, timeout=1))
    code, elapsed = _failing_call(LOOPBACK4, port, 10.0)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 1 + 4
