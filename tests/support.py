"""
Loopback peers and helpers for tests that run goma-pt's relays in the
test's own reactor: echo and scripted backends, recording clients, a fake
name resolver (tests never send DNS queries off this machine), and the
real twistd used by the process tests.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from goma_twisted.config import Forward, GatewayConfig, Target
from goma_twisted.service import PassThroughService, UDPForwardServer
from goma_twisted.udp import UDPForward

ROOT = Path(__file__).resolve().parent.parent


def forward(
    protocols: tuple[str, ...] = ("tcp",),
    target: tuple[str, int] = ("127.0.0.1", 1),
    port: int = 0,
    address: str = "127.0.0.1",
    **kwargs: Any,
) -> Forward:
    """A forward with test defaults: port 0 (the kernel picks), on loopback."""
    return Forward(protocols, port, Target(*target), address=address, **kwargs)


def start_service(
    *forwards: Forward,
    reactor: Any = None,
    clock: Any = None,
    drain_timeout: float = 0,
    metrics: str | None = None,
) -> PassThroughService:
    """A running service; it closes live connections at once when stopped, unless told."""
    config = GatewayConfig("test", forwards)
    service = PassThroughService(
        config, reactor=reactor, clock=clock, drain_timeout=drain_timeout, metrics=metrics
    )
    service.startService()
    return service


def udp_relay(service: PassThroughService, index: int = 0) -> UDPForward:
    relays = [lst.relay for lst in service.listeners if isinstance(lst, UDPForwardServer)]
    return relays[index]


def bound_port(service: PassThroughService, protocol_name: str = "tcp", index: int = 0) -> int:
    listeners = [lst for lst in service.listeners if lst.protocol == protocol_name]
    return int(listeners[index].getHost().port)


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes; at the client's EOF it finishes writing, then closes."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class UDPEcho(protocol.DatagramProtocol):
    """Echoes each datagram, prefixed with C{prefix}."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.received: list[tuple[bytes, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        self.transport.write(self.prefix + data, addr)  # type: ignore[union-attr]


# PyPy frees what an object with a finalizer holds (a socket in a finished
# coroutine's frame, in an object with __del__) only at the collection after
# the one that ran the finalizer; CPython frees it all in one.
_PYPY = platform.python_implementation() == "PyPy"


def open_fds() -> int:
    """This process's open descriptors, after collecting sockets an earlier test left behind."""
    gc.collect()
    count = len(os.listdir("/proc/self/fd"))
    # On PyPy, again until the count settles: twice at least, five times at most.
    for _ in range(4 if _PYPY else 0):
        gc.collect()
        before, count = count, len(os.listdir("/proc/self/fd"))
        if count == before:
            break
    return count


def listen_tcp(reactor: Any, factory: protocol.Factory, interface: str = "127.0.0.1") -> Any:
    return reactor.listenTCP(0, factory, interface=interface)


@implementer(IHalfCloseableProtocol)
class Recorder(protocol.Protocol):
    """
    A client or server that records what it receives and when its
    connection ends; C{send} is written at connect and C{halfClose} then
    shuts its write side. It closes at the peer's EOF, as most clients do.
    """

    def __init__(self, send: bytes = b"", halfClose: bool = False) -> None:
        self.send = send
        self.halfClose = halfClose
        self.chunks: list[bytes] = []
        self.connected_d: Deferred[Recorder] = Deferred()
        self.lost: Deferred[bytes] = Deferred()
        self.readClosed = False

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)  # type: ignore[union-attr]
        if self.halfClose:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(self.received)


def connect(
    reactor: Any,
    port: int,
    client: protocol.Protocol,
    host: str = "127.0.0.1",
    source: str | None = None,
) -> None:
    """Connect C{client} to C{host:port}, from the address C{source} if given."""
    factory = protocol.ClientFactory()
    factory.protocol = lambda: client
    reactor.connectTCP(host, port, factory, bindAddress=(source, 0) if source else None)


@implementer(ILogObserver)
class LogCapture:
    """Collects goma-pt's log events (by namespace prefix)."""

    def __init__(self, prefix: str = "goma_pt") -> None:
        self.prefix = prefix
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith(self.prefix):
            self.events.append(event)

    def ends(self) -> list[LogEvent]:
        """The end-of-connection and end-of-session events."""
        return [e for e in self.events if "reason" in e]


@contextmanager
def captured_logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        yield capture
    finally:
        globalLogPublisher.removeObserver(capture)


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Resolves names from a table after C{delay} seconds; other names fail,
    as an unknown host does, without any DNS query.
    """

    def __init__(self, reactor: Any, table: dict[str, list[str]], delay: float = 0.0) -> None:
        self.reactor = reactor
        self.table = table
        self.delay = delay
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)

        def answer() -> None:
            for host in self.table.get(hostName, []):
                cls = IPv6Address if ":" in host else IPv4Address
                kind: Literal["TCP", "UDP"] = "UDP" if transportSemantics == "UDP" else "TCP"
                resolutionReceiver.addressResolved(cls(kind, host, portNumber))
            resolutionReceiver.resolutionComplete()

        self.reactor.callLater(self.delay, answer)
        return resolution


@implementer(IReactorPluggableNameResolver)
class ResolvingReactor:
    """The real reactor, seen through a L{FakeResolver}."""

    def __init__(self, reactor: Any, resolver: FakeResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


# Ports free_port has handed out: the kernel may offer a port again once
# it is released, and a test that asks for three ports before binding any
# must get three different ones.
_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """
    A port free for both TCP and UDP right now (for tests that need one
    port twice), and never handed out before in this run.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port in _handed_out:
            continue
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port")


@contextmanager
def unreachable_udp_port(host: str = "127.0.0.1") -> Iterator[int]:
    """
    A UDP port whose datagrams get ICMP port unreachable while the block
    runs. A port merely free may be bound by anyone on the machine before
    the test sends (other suites, a benchmark's clients); this one is held
    by a socket connected elsewhere, which the kernel gives no one else's
    datagrams, and which no other socket can share.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind((host, 0))
        held.connect((host, 9))
        yield int(held.getsockname()[1])


def twistd_command(*args: str) -> list[str]:
    """The twistd next to this Python, so the tests use the same installation."""
    twistd = Path(sys.executable).with_name("twistd")
    return [str(twistd), *args]


def twistd_env() -> dict[str, str]:
    """Run twistd on this checkout's code and plugin dropin, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def write_config(path: Path, forwards: list[dict[str, Any]]) -> Path:
    import yaml

    document = {"gateway": {"entryPoints": {"passThrough": {"forwards": forwards}}}}
    path.write_text(yaml.safe_dump(document))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """
    Poll (for process tests, outside the reactor) until C{predicate} is true.
    The default deadline is generous: a twistd starting on PyPy on a loaded
    2-core machine can take several seconds to be ready.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@contextmanager
def goma_pt_running(
    config: Path, log: Path, *options: str, twistd: tuple[str, ...] = (), **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """
    A foreground C{twistd goma-pt --config CONFIG OPTIONS} logging to C{log},
    ready (every forward listening) when the block starts, stopped when it ends.
    C{twistd} holds twistd's own options; C{popen}, what else Popen takes.
    """
    args = ("-n", "--pidfile=", "--logfile=-", *twistd, "goma-pt", "--config", str(config))
    popen.setdefault("env", twistd_env())
    with running(twistd_command(*args, *options), log, **popen) as proc:
        wait_for(lambda: "goma-pt ready" in log.read_text(), what="goma-pt ready")
        yield proc


@contextmanager
def running(command: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is always stopped (TERM, then KILL) when the block ends."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# Raw sockets for hostile cases: connections accepted, read and reset by hand.


def raw_client(port: int, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    skt = socket.socket(family)
    skt.connect((host, port))
    skt.setblocking(False)
    return skt


def raw_listener() -> socket.socket:
    """A plain non-blocking loopback listener, to accept the relay's connection by hand."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    return listener


def reset(skt: socket.socket) -> None:
    skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    skt.close()


async def until(reactor: Any, predicate: Any, within: float = 8) -> None:
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("never happened")


def relays(service: Any) -> set[Any]:
    return service.listeners[0].factory.relays


def factory_of(service: Any) -> Any:
    return service.listeners[0].factory


async def accept_raw(reactor: Any, listener: socket.socket, within: float = 8) -> socket.socket:
    """Accept one connection on a non-blocking listener, polling on the reactor."""
    for _ in range(int(within / 0.02)):
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            await deferLater(reactor, 0.02)
            continue
        conn.setblocking(False)
        return conn
    raise AssertionError("nothing connected")


async def read_to_eof(reactor: Any, conn: socket.socket, within: float = 8) -> bytes:
    """Read a non-blocking socket to its end of stream, polling on the reactor."""
    data, end = await read_to_end(reactor, conn, within)
    if end != "eof":
        raise ConnectionResetError(f"reset after {len(data)} bytes")
    return data


async def read_to_end(reactor: Any, conn: socket.socket, within: float = 8) -> tuple[bytes, str]:
    """
    Read a non-blocking socket until it ends, polling on the reactor: what
    came, and how it ended ("eof" or "reset": the bytes before a reset are
    all read first, as the kernel gives them).
    """
    chunks: list[bytes] = []
    for _ in range(int(within / 0.01)):
        try:
            chunk = conn.recv(65536)
        except BlockingIOError:
            await deferLater(reactor, 0.01)
            continue
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
    raise AssertionError("no end of stream")


async def client_half_closed(
    reactor: Any, service: Any, listener: socket.socket, sent: bytes
) -> tuple[socket.socket, socket.socket]:
    """
    A client through C{service} to a target accepted on C{listener}: the
    client sends C{sent} and half-closes, and the target has read it all
    and the FIN. Returns (client, the target's connection).
    """
    client = raw_client(bound_port(service))
    conn = await accept_raw(reactor, listener)
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    assert await read_to_eof(reactor, conn) == sent
    return client, conn


async def finished(reactor: Any, d: Deferred[Any], timeout: float = 20) -> Any:
    """Await C{d}, failing the test if it has not fired within C{timeout} seconds."""
    return await d.addTimeout(timeout, reactor)


class FullBacklog:
    """
    A loopback listener whose accept queue is full, so a connection attempt
    stays in progress, as with a hung or distant backend, until L{release}.
    """

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket(family)
        self.listener.bind((host, 0))
        self.listener.listen(0)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            filler = socket.socket(family)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(self.listener.getsockname()[:2])
            self.fillers.append(filler)

    def release(self) -> None:
        """Let the next (retransmitted) connection attempt through."""
        for filler in self.fillers:
            filler.close()
        self.fillers = []
        with contextlib.suppress(BlockingIOError):
            while True:
                self.listener.accept()[0].close()

    def close(self) -> None:
        for s in [*self.fillers, self.listener]:
            s.close()
