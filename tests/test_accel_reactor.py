"""
goma-pt's epoll reactor: the same events as Twisted's, handlers called
without a logging context, failures still logged with the connection's
prefix.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionFdescWentAway
from twisted.internet.main import CONNECTION_DONE
from twisted.python import log

from goma_twisted.accel.reactor import EPollReactor


class Reader(FileDescriptor):
    """Reads a pipe; C{fail} makes its read or its end raise."""

    def __init__(self, reactor: Any, fd: int, fail: str = "") -> None:
        super().__init__(reactor)
        self.fd = fd
        self.fail = fail
        self.read = b""
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"Reader {self.fd}"

    def doRead(self) -> Any:
        if self.fail == "read":
            raise ValueError("read failed")
        self.read += os.read(self.fd, 100)
        return CONNECTION_DONE if self.fail == "lost" else None

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        if self.fail == "lost":
            raise ValueError("lost failed")


def test_failures_are_logged_with_the_prefix_and_the_loop_goes_on() -> None:
    reactor = EPollReactor()
    pipes = [os.pipe() for _ in range(3)]
    readers = [
        Reader(reactor, pipes[0][0], fail="read"),
        Reader(reactor, pipes[1][0], fail="lost"),
        Reader(reactor, pipes[2][0]),
    ]
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    try:
        for reader in readers:
            reactor.addReader(reader)
        for _, write in pipes:
            os.write(write, b"data")
        reactor.doPoll(0)
    finally:
        log.removeObserver(events.append)
        for reader in readers:
            reactor.removeReader(reader)
        for read, write in pipes:
            os.close(read)
            os.close(write)
        reactor._poller.close()
    # A failed read ends that descriptor, as in Twisted's reactor; a
    # failure escaping the handler is logged with the prefix; the third
    # reader is served all the same.
    assert readers[0].lost and readers[0].read == b""
    assert readers[2].read == b"data"
    errors = [e for e in events if e.get("isError")]
    assert any(e.get("system") == f"Reader {pipes[1][0]}" for e in errors)
    assert {e["failure"].value.args[0] for e in errors} >= {"read failed", "lost failed"}


class Vanishing(Reader):
    """A reader whose descriptor reads as -1 once it is registered."""

    gone = False

    def fileno(self) -> int:
        return -1 if self.gone else self.fd


def test_a_read_event_for_a_lost_descriptor_disconnects_it() -> None:
    # As Twisted's _doReadOrWrite: fileno() -1 ends the selectable
    # without reading.
    reactor = EPollReactor()
    read, write = os.pipe()
    reader = Vanishing(reactor, read)
    try:
        reactor.addReader(reader)
        reader.gone = True
        os.write(write, b"data")
        reactor.doPoll(0)
    finally:
        os.close(read)
        os.close(write)
        reactor._poller.close()
    [reason] = reader.lost
    assert reason.check(ConnectionFdescWentAway)
    assert reader.read == b""
    assert reader not in reactor.getReaders()


def test_a_read_event_that_ends_the_stream_disconnects_cleanly() -> None:
    reactor = EPollReactor()
    read, write = os.pipe()
    reader = Reader(reactor, read)
    try:
        reactor.addReader(reader)
        os.close(write)
        reactor.doPoll(0)  # EPOLLHUP alone: through _doReadOrWrite
        assert reader.lost and reader.lost[0].check(ConnectionDone)
    finally:
        os.close(read)
        reactor._poller.close()


class Ending(Reader):
    """A reader whose read ends its stream."""

    def doRead(self) -> Any:
        super().doRead()
        return CONNECTION_DONE


@pytest.mark.parametrize("kind", [Reader, Ending])
def test_a_read_event_with_a_hang_up_is_read_in_line(kind: type[Reader]) -> None:
    # Readable and hung up (a relay's last end of stream): read here as
    # _doReadOrWrite would, without calling it; its end as it would too.
    reactor = EPollReactor()
    ours, theirs = socket.socketpair()
    reader = kind(reactor, ours.fileno())
    handled: list[Any] = []
    reactor._doReadOrWrite = lambda *a: handled.append(a)  # type: ignore[method-assign]
    try:
        reactor.addReader(reader)
        theirs.send(b"last")
        theirs.close()
        assert reactor._poller.poll(0) == [(ours.fileno(), select.EPOLLIN | select.EPOLLHUP)]
        reactor.doPoll(0)
        assert handled == []
        assert reader.read == b"last"
        if kind is Ending:
            [reason] = reader.lost
            assert reason.check(ConnectionDone)
            assert reader not in reactor.getReaders()
        else:
            assert reader.lost == []
            assert reader in reactor.getReaders()
            reactor.removeReader(reader)
    finally:
        ours.close()
        reactor._poller.close()


class Socketed(FileDescriptor):
    """A socket's reader, for closeSocket."""

    def __init__(self, reactor: Any, skt: socket.socket) -> None:
        super().__init__(reactor)
        self.socket = skt

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> Any:
        return None


@pytest.mark.parametrize("watched", ["reading", "writing", "both", "neither"])
def test_close_socket_forgets_the_descriptor_and_closes_it(watched: str) -> None:
    # closeSocket leaves the reactor's records as removeReader and
    # removeWriter would, without their epoll_ctl: the kernel takes a
    # closed socket out of the epoll set itself.
    reactor = EPollReactor()
    ours, theirs = socket.socketpair()
    selectable = Socketed(reactor, ours)
    try:
        if watched in ("reading", "both"):
            reactor.addReader(selectable)
        if watched in ("writing", "both"):
            reactor.addWriter(selectable)
        fd = ours.fileno()
        reactor.closeSocket(selectable, ours)
        assert ours.fileno() == -1
        assert selectable not in reactor.getReaders()
        assert selectable not in reactor.getWriters()
        assert reactor._selectables == {
            fd: s for fd, s in reactor._selectables.items() if s is not selectable
        }
        # The epoll set has let it go: the number can be watched anew.
        again = socket.socket()
        try:
            assert again.fileno() == fd
            reactor._poller.register(fd, select.EPOLLIN)
            reactor._poller.unregister(fd)
        finally:
            again.close()
    finally:
        theirs.close()
        reactor._poller.close()


def test_close_socket_without_twisteds_records_asks_remove_reader() -> None:
    reactor = EPollReactor()
    reactor._records = False
    ours, theirs = socket.socketpair()
    selectable = Socketed(reactor, ours)
    try:
        reactor.addReader(selectable)
        reactor.closeSocket(selectable, ours)
        assert ours.fileno() == -1
        assert selectable not in reactor.getReaders()
    finally:
        theirs.close()
        reactor._poller.close()


def test_a_failing_before_wait_call_is_logged_and_events_are_still_served() -> None:
    # A text log that cannot be written (a full disk, standard output to a
    # closed pipe) makes the gathered write raise before every wait: the
    # reactor must go on serving I/O, not fail each turn before polling.
    reactor = EPollReactor()
    read, write = os.pipe()
    reader = Reader(reactor, read)

    def full() -> None:
        raise OSError(28, "No space left on device")

    reactor.beforeWait.append(full)
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    try:
        reactor.addReader(reader)
        os.write(write, b"data")
        reactor.doPoll(0)
    finally:
        log.removeObserver(events.append)
        reactor.removeReader(reader)
        os.close(read)
        os.close(write)
        reactor._poller.close()
    assert reader.read == b"data"
    assert [e for e in events if e.get("isError")]


def test_add_new_reader_registers_a_fresh_descriptor_as_add_reader_would() -> None:
    reactor = EPollReactor()
    ours, theirs = socket.socketpair()
    selectable = Socketed(reactor, ours)
    read: list[bytes] = []
    selectable.doRead = lambda: read.append(ours.recv(100))  # type: ignore[method-assign]
    try:
        reactor.addNewReader(selectable, ours.fileno())
        assert selectable in reactor.getReaders()
        theirs.send(b"ping")
        reactor.doPoll(0)
        assert read == [b"ping"]
        # Already watched (for writing here): addReader's way, no second register.
        reactor.removeReader(selectable)
        reactor.addWriter(selectable)
        reactor.addNewReader(selectable, ours.fileno())
        assert selectable in reactor.getReaders()
        assert selectable in reactor.getWriters()
        reactor.removeWriter(selectable)
        reactor.removeReader(selectable)
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()


def test_add_new_reader_without_twisteds_records_asks_add_reader() -> None:
    reactor = EPollReactor()
    reactor._records = False
    asked: list[Any] = []
    reactor.addReader = asked.append  # type: ignore[method-assign]
    ours, theirs = socket.socketpair()
    selectable = Socketed(reactor, ours)
    try:
        reactor.addNewReader(selectable, ours.fileno())
        assert asked == [selectable]
        assert ours.fileno() not in reactor._selectables
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()


@pytest.mark.parametrize("writing", [False, True])
def test_remove_reader_leaves_the_records_and_the_epoll_set_as_twisteds(writing: bool) -> None:
    # Our removeReader does in one call what Twisted's does: a descriptor
    # also watched for writing stays watched for that alone, any other
    # leaves the epoll set (its number can be registered anew).
    reactor = EPollReactor()
    ours, theirs = socket.socketpair()
    selectable = Socketed(reactor, ours)
    written: list[bool] = []
    selectable.doWrite = lambda: written.append(True)  # type: ignore[method-assign]
    fd = ours.fileno()
    try:
        reactor.addReader(selectable)
        if writing:
            reactor.addWriter(selectable)
        theirs.send(b"ping")
        reactor.removeReader(selectable)
        assert selectable not in reactor.getReaders()
        assert fd not in reactor._reads
        if writing:
            assert reactor._selectables[fd] is selectable
            assert selectable in reactor.getWriters()
            # Watched for writing only: the pending bytes wake no read.
            assert reactor._poller.poll(0) == [(fd, select.EPOLLOUT)]
            reactor.removeWriter(selectable)
        assert fd not in reactor._selectables
        reactor._poller.register(fd, select.EPOLLIN)  # not in the set any more
        reactor._poller.unregister(fd)
        # A reader not watched: nothing to do, as with Twisted's.
        reactor.removeReader(selectable)
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()


def test_remove_reader_without_twisteds_records_is_twisteds() -> None:
    reactor = EPollReactor()
    ours, theirs = socket.socketpair()
    selectable = Socketed(reactor, ours)
    try:
        reactor.addReader(selectable)
        reactor._records = False
        reactor.removeReader(selectable)
        assert selectable not in reactor.getReaders()
        assert ours.fileno() not in reactor._selectables
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()
