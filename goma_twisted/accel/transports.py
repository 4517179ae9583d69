"""
goma-pt's own construction of Twisted's TCP transports for a relay.

Replaces: C{connectTCP}'s Connector, Deferred, timeout call and its
register/unregister/register dance (five C{epoll_ctl} calls, two C{ioctl}s
and two C{getsockopt}s per connection), and C{tcp.Server.__init__}'s
C{startReading} for an accepted client that must wait for its target
anyway. L{Connecting} opens a non-blocking socket with the relay's options
and connects in one call (over loopback it has usually finished at once);
L{RelayConnection} is Twisted's L{tcp.Server}, built by hand, not reading
until told. Buys: those system calls and Python calls on every new
connection (the CPU per connection of both relays is in docs/benchmarks.md).
Leans on the private names L{LEAN} checks once.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IProtocol
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure

from ..config import format_address
from ..sockopts import SocketOption, apply_options

# What building Twisted's TCP transports by hand relies on.
LEAN = (
    all(hasattr(tcp.Connection, name) for name in ("connectionLost", "_closeSocket", "doRead"))
    and all(
        hasattr(tcp.Port, name)
        for name in ("transport", "_preexistingSocket", "_fromListeningDescriptor")
    )
    and hasattr(tcp.Server, "_addressType")
    and callable(getattr(tcp, "_getsockname", None))
    and callable(getattr(error, "getConnectError", None))
)

# What RelayPort's own accept loop relies on besides (else Twisted's doRead).
_LEAN_ACCEPT = LEAN and hasattr(socket.socket, "_accept") and hasattr(tcp.Port, "sessionno")

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)

# The class of the relay's own sockets: the C socket type that
# socket.socket extends, without that subclass's Python __init__ and
# close (three Python calls per socket) and its enum-converting family
# and type. Twisted's transports use only its C methods.
_Socket: Any = _socket.socket if issubclass(socket.socket, _socket.socket) else socket.socket

_WAITING = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR)
_CONNECTED = (0, errno.EISCONN)


def lean(reactor: Any) -> bool:
    """Whether C{reactor} can run this module's transports."""
    return LEAN and _NONBLOCK != 0 and isinstance(reactor, PosixReactorBase)


class TargetAddress:
    """
    A target IP address worked out once for every connection to it: the
    socket family, the address C{connect()} takes, and the peer address
    the transport reports.
    """

    def __init__(self, host: str, port: int) -> None:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        self.loopback = ip.is_loopback
        if ip.version == 6:
            self.family = socket.AF_INET6
            info = socket.getaddrinfo(
                host, port, socket.AF_INET6, socket.SOCK_STREAM, 0,
                socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )  # fmt: skip
            self.sockaddr: tuple[Any, ...] = info[0][4]
            self.peer: IPv4Address | IPv6Address = IPv6Address("TCP", host, port)
        else:
            self.family = socket.AF_INET
            self.sockaddr = (host, port)
            self.peer = IPv4Address("TCP", host, port)
        # The peer as the relay's end event shows it.
        self.text = format_address(host, port)


def _connect_error(number: int) -> Exception:
    """The exception Twisted's connector reports for C{connect()}'s errno."""
    exc: Exception = error.getConnectError((number, os.strerror(number)))
    return exc


# The state of Twisted's TCP transport that its classes hold until it
# changes, and the relay reads on every connection (RelayConnection sets
# them on itself).
_CLASS_STATE = {
    "disconnected": 0, "disconnecting": 0, "_writeDisconnecting": False,
    "_writeDisconnected": False, "dataBuffer": b"", "_aborting": False,
    "producer": None, "streamingProducer": False,
}  # fmt: skip
_OWN_STATE = all(
    name in vars(klass) and vars(klass)[name] == value
    for name, value in _CLASS_STATE.items()
    for klass in [next((k for k in tcp.Connection.__mro__ if name in vars(k)), object)]
)


class _NewReader:
    """
    C{startReading} for our transports: through the reactor's
    C{addNewReader} where it has one (L{goma_twisted.reactor}), which
    registers a descriptor watched for nothing yet at once, without
    C{addReader}'s calls and look-ups (each transport starts reading so
    once), and hands any other to C{addReader}.
    """

    reactor: Any
    socket: Any

    def startReading(self) -> None:
        reactor = self.reactor
        add = getattr(reactor, "addNewReader", None)
        if add is None:
            reactor.addReader(self)
        else:
            add(self, self.socket.fileno())


class Connecting:
    """
    One attempt to connect to a L{TargetAddress}, for one protocol.

    On success the protocol gets a L{RelayConnection}, reading; on
    failure C{failed} is called with the same exceptions Twisted's
    connector gives: L{error.ConnectionRefusedError} and its kin for the
    errno of C{connect()}, L{error.TimeoutError} after C{timeout} seconds,
    L{error.UserError} when L{stopConnecting} is called.

    While it waits it is the reactor's writer for the socket (the reactor
    may also call C{doRead}, for an error event).
    """

    _socket: socket.socket | None = None
    _timer: IDelayedCall | None = None
    _waiting = False
    done = False

    def __init__(
        self,
        reactor: Any,
        clock: Any,
        target: TargetAddress,
        timeout: float,
        protocol: IProtocol,
        failed: Callable[[Failure], object],
        options: list[SocketOption] = [],  # noqa: B006 (never changed)
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.target = target
        self.timeout = timeout
        self.protocol = protocol
        self.failed = failed
        self.options = options
        # The class's starting state, on the instance (see RelayConnection).
        self._socket = self._timer = None
        self._waiting = self.done = False

    def start(self) -> None:
        """Make the socket and connect; may finish (either way) before it returns."""
        target = self.target
        try:
            skt = _Socket(target.family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as e:
            self._fail(error.ConnectBindError(e.args[0], e.args[1]))
            return
        self._socket = skt
        try:
            apply_options(skt, self.options)
            result = skt.connect_ex(target.sockaddr)
            if result in _WAITING and target.loopback:
                # Over loopback the handshake has usually completed
                # within the first call: ask before waiting.
                result = skt.connect_ex(target.sockaddr)
        except OSError as e:
            result = e.errno or errno.EIO
        if result in _CONNECTED:
            # At once (most often over loopback): _outcome's way there.
            self._connected()
            return
        if result in _WAITING:
            try:
                self.reactor.addWriter(self)
            except OSError as e:
                # epoll_ctl out of memory or watches: a failed attempt, not
                # an exception that would leave the held client unserved.
                self._fail(error.ConnectError(string=str(e)))
                return
            self._waiting = True
            self._timer = self.clock.callLater(self.timeout, self._timedOut)
        else:
            self._outcome(result)

    # What the reactor calls while we wait.

    def fileno(self) -> int:
        skt = self._socket
        return skt.fileno() if skt is not None else -1

    def doWrite(self) -> None:
        if not self.done:
            self._check()

    doRead = doWrite

    def connectionLost(self, reason: Failure) -> None:
        # An error or hang-up event (the reactor has removed us), or the
        # reactor shutting down.
        self._waiting = False
        if self.done:
            return
        skt = self._socket
        result = errno.EIO
        if skt is not None:
            try:
                result = skt.connect_ex(self.target.sockaddr)
            except OSError as e:
                result = e.errno or errno.EIO
        if result in _WAITING or result in _CONNECTED:
            # As Twisted's connector reports a loss before connecting.
            self._fail(error.ConnectError(string=reason))
        else:
            self._outcome(result)

    def logPrefix(self) -> str:
        return "Connecting"

    def stopConnecting(self) -> None:
        """Give up, as C{IConnector.stopConnecting} does: fails with L{error.UserError}."""
        if not self.done:
            self._fail(error.UserError())

    # Outcomes.

    def _check(self) -> None:
        skt = self._socket
        assert skt is not None
        try:
            result = skt.connect_ex(self.target.sockaddr)
        except OSError as e:
            result = e.errno or errno.EIO
        if result not in _WAITING:
            self._outcome(result)

    def _outcome(self, result: int) -> None:
        if result in _CONNECTED:
            self._connected()
        else:
            self._fail(_connect_error(result))

    def _timedOut(self) -> None:
        self._timer = None
        if not self.done:
            self._fail(error.TimeoutError())

    def _stopWaiting(self) -> None:
        self.done = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._waiting:
            self._waiting = False
            self.reactor.removeWriter(self)

    def _connected(self) -> None:
        if self._waiting or self._timer is not None:
            self._stopWaiting()
        else:
            self.done = True
        skt, self._socket = self._socket, None
        assert skt is not None
        peer = self.target.peer
        transport = RelayConnection(skt, self.protocol, (), None, 0, self.reactor, peer)
        try:
            transport.startReading()
        except OSError as e:
            skt.close()
            self.failed(Failure(error.ConnectError(string=str(e))))
            return
        self.protocol.makeConnection(transport)

    def _fail(self, reason: Exception) -> None:
        self._stopWaiting()
        skt, self._socket = self._socket, None
        if skt is not None:
            skt.close()
        self.failed(Failure(reason))


class RelayConnection(_NewReader, tcp.Server):
    """
    Twisted's TCP transport for both sockets of a relay: an accepted one
    (what L{tcp.Server} is, built with its arguments by L{RelayPort}),
    which starts reading only when C{resumeProducing} or C{startReading}
    says so, and one that L{Connecting} connected to C{peer} (a
    L{tcp.Server} too, as the port's transport type must be: the relay
    never starts TLS, the one thing a server does differently).

    One class for both, not two: the relay's code runs on both transports
    alike, and CPython 3.11 specialises an attribute access for one class
    at a time; with two classes taking turns, most of the relay's accesses
    to its transports fell back to the generic look-up.
    The TCP options come from the listening socket or L{Connecting}.
    """

    tcpOptionsSet = True
    readingHeld = True
    # The accepted side's, as tcp.Server has them.
    server: Any = None
    client: tuple[Any, ...] = ()
    sessionno = 0
    hostname = ""

    def __init__(
        self,
        sock: socket.socket,
        protocol: IProtocol,
        client: tuple[Any, ...],
        server: Any,
        sessionno: int,
        reactor: Any,
        peer: IPv4Address | IPv6Address | None = None,
    ) -> None:
        # tcp.Server.__init__ without startReading() and its log strings,
        # and tcp.Connection.__init__ in line.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        if _OWN_STATE:
            # _CLASS_STATE on the transport itself: CPython 3.11 does not
            # specialise reading, through an instance, an attribute its
            # class holds (about 6x the time of one the instance holds),
            # and the relay reads these some 30 times per connection.
            me: Any = self
            me.disconnected = 0
            me.disconnecting = 0
            me._writeDisconnecting = False
            me._writeDisconnected = False
            me.dataBuffer = b""
            me._aborting = False
            me.producer = None
            me.streamingProducer = False
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        self._peer = peer
        if peer is None:
            # Accepted: non-blocking now (connected ones are already).
            sock.setblocking(False)
            if len(client) != 2:
                self._addressType = IPv6Address
            self.server = server
            self.client = client
            self.sessionno = sessionno
            self.hostname = client[0]
        elif isinstance(peer, IPv6Address):
            self._addressType = IPv6Address
        self.connected = 1

    def logPrefix(self) -> str:
        name = self.protocol.__class__.__name__
        if self._peer is not None:
            return f"{name},client"
        return f"{name},{self.sessionno},{self.hostname}"

    def getPeer(self) -> IPv4Address | IPv6Address:
        if self._peer is not None:
            return self._peer
        return self._addressType("TCP", *self.client)

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._addressType("TCP", *tcp._getsockname(self.socket))

    def __repr__(self) -> str:
        name = self.protocol.__class__.__name__
        if self._peer is not None:
            return f"<{name} to {self._peer.host}:{self._peer.port}>"
        return f"<{name} #{self.sessionno}>"
