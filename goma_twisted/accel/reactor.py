"""
Twisted's epoll reactor, without a logging context set around each event.

Replaces: L{twisted.internet.epollreactor.EPollReactor.doPoll}, which calls
every handler through L{twisted.python.log.callWithLogger} (a C{logPrefix()}
call and a copy of the logging context per event), and its
C{_doReadOrWrite} for a read event alone; C{addNewReader} and C{closeSocket}
register and close a relay's descriptors without C{addReader}'s look-ups and
an C{epoll_ctl}. Buys: a large share of the relay's time per event (see
docs/benchmarks.md). Leans on C{_poller}, C{_selectables}, C{_reads},
C{_writes}, C{_doReadOrWrite}, C{_disconnectSelectable}, checked once.

The difference: a legacy C{twisted.python.log} message emitted during an I/O
event has the system C{-} rather than the connection's prefix; events from
L{twisted.logger.Logger}, which goma-pt uses, do not depend on that context.
twistd goma-pt installs it with the accelerated relay, unless a reactor was
chosen with C{twistd --reactor}.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from select import EPOLLHUP, EPOLLIN, EPOLLOUT
from typing import Any

from twisted.internet import epollreactor, posixbase
from twisted.internet.main import installReactor
from twisted.python import log

# What _doReadOrWrite returns for a descriptor gone to -1; without it
# (another Twisted), every event goes through _doReadOrWrite.
_NO_FILEDESC: Any = getattr(posixbase, "_NO_FILEDESC", None)
_READ_ONLY = EPOLLIN if _NO_FILEDESC is not None else -1
# Readable with the connection hung up both ways (a relay's last end of
# stream): _doReadOrWrite reads it as it reads a read event alone.
_READ_HUP = EPOLLIN | EPOLLHUP if _NO_FILEDESC is not None else -1


class EPollReactor(epollreactor.EPollReactor):
    """
    L{epollreactor.EPollReactor} that calls event handlers directly.

    @ivar beforeWait: called before each wait for events, with no argument
        (L{goma_twisted.logs.GatheringFileLogObserver} writes its lines).
    """

    def __init__(self) -> None:
        self.beforeWait: list[Callable[[], object]] = []
        super().__init__()
        # What closeSocket keeps in step with: Twisted's own records of
        # what is watched (checked once: else it asks removeReader).
        self._records = all(
            isinstance(getattr(self, name, None), kind)
            for name, kind in (("_reads", set), ("_writes", set), ("_selectables", dict))
        )

    def doPoll(self, timeout: float | None) -> None:
        for call in self.beforeWait:
            # A failure here (a log that cannot be written: a full disk, a
            # closed pipe) would otherwise escape every turn before the
            # poll, and Twisted's main loop would spin without serving I/O.
            try:
                call()
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(None, "beforeWait call failed")
        if timeout is None:
            timeout = -1  # Wait indefinitely.
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        disconnect = self._disconnectSelectable
        selectables = self._selectables
        for fd, event in events:
            # Gone since the poll (closed by an earlier event of this batch).
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event != _READ_ONLY and event != _READ_HUP:
                    handle(selectable, fd, event)
                    continue
                # _doReadOrWrite for a read event alone (or with a hang-up).
                inRead = False
                why: Any
                try:
                    if selectable.fileno() == -1:
                        why = _NO_FILEDESC
                    else:
                        why = selectable.doRead()
                        inRead = True
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
                if why:
                    disconnect(selectable, why, inRead)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # As callWithLogger does, but only when something failed.
                log.callWithLogger(selectable, log.err)

    doIteration = doPoll

    def addNewReader(self, reader: Any, fd: int) -> None:
        """
        C{addReader(reader)} for a descriptor C{fd} (its C{fileno()}) just
        opened, so watched for nothing yet: it registers it at once, without
        C{addReader}'s look-ups and the C{fileno()} call (a UDP session's
        socket, one per DNS query under churn; each relayed TCP connection's
        two sockets, see L{goma_twisted.connect}). Anything else goes to
        C{addReader}.
        """
        if not self._records or fd in self._selectables:
            self.addReader(reader)
            return
        self._poller.register(fd, EPOLLIN)
        self._reads.add(fd)
        self._selectables[fd] = reader

    def removeReader(self, reader: Any) -> None:
        """
        Twisted's C{removeReader} in one call for a descriptor the epoll set
        watches for reading (a relay's side paused, or stopped at its end of
        stream): Twisted's goes through three, and a look-up in its
        continuous polling first, which never holds such a descriptor.
        Anything else goes to Twisted's.
        """
        if self._records:
            fd = reader.fileno()
            reads = self._reads
            if fd in reads:
                if fd in self._writes:
                    self._poller.modify(fd, EPOLLOUT)
                else:
                    del self._selectables[fd]
                    self._poller.unregister(fd)
                reads.remove(fd)
                return
        super().removeReader(reader)

    def closeSocket(self, selectable: Any, skt: Any) -> None:
        """
        Stop watching C{selectable} and close its socket C{skt}, without the
        C{epoll_ctl} that C{removeReader} and C{removeWriter} make: closing
        the last descriptor of a socket takes it out of the epoll set. Only
        for a socket no other descriptor shares (no C{dup}, no fork), such
        as the relay's accepted and connected ones.
        """
        if self._records:
            fd = skt.fileno()
            if self._selectables.get(fd) is selectable:
                del self._selectables[fd]
                self._reads.discard(fd)
                self._writes.discard(fd)
        else:
            self.removeReader(selectable)
            self.removeWriter(selectable)
        skt.close()


def install() -> EPollReactor:
    """Install this reactor as the global one; return it."""
    reactor = EPollReactor()
    installReactor(reactor)
    return reactor
