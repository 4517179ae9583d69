"""
Listening sockets passed by systemd (socket activation): each forward's
listener takes the passed socket of its protocol, port and address, if
there is one, instead of binding its own, so goma-pt needs no privilege
for port 53 and keeps the sockets across restarts of the service.

Sockets are matched by what they are (stream or datagram, bound port and
address), read off the sockets themselves; their C{FileDescriptorName}s
are shown in the log. Twisted's L{ListenFDs} reads the environment
(C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}).
"""

from __future__ import annotations

import ipaddress
import socket

from attrs import frozen
from twisted.python.systemd import ListenFDs

from .config import format_address

_KINDS = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


@frozen
class PassedSocket:
    """One socket systemd passed: its descriptor, name, and what it listens on."""

    fd: int
    name: str
    protocol: str
    family: int
    host: str
    port: int

    def __str__(self) -> str:
        named = f" ({self.name})" if self.name and self.name != "unknown" else ""
        return f"{self.protocol} {format_address(self.host, self.port)}{named}"


def describe(fd: int, name: str = "") -> PassedSocket | None:
    """What the socket at descriptor C{fd} is, or None if it is no TCP or UDP socket."""
    try:
        skt = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        protocol = _KINDS.get(skt.type)
        if protocol is None or skt.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        host, port = skt.getsockname()[:2]
        return PassedSocket(fd, name, protocol, skt.family, host, port)
    except OSError:
        return None
    finally:
        skt.detach()  # the descriptor stays systemd's, open


def _same_host(wanted: str, bound: str) -> bool:
    """Whether a forward's listen address is the one a socket is bound to."""
    if not wanted or wanted in ("::", "0.0.0.0"):
        return bound in ("::", "0.0.0.0")
    try:
        return ipaddress.ip_address(wanted) == ipaddress.ip_address(bound)
    except ValueError:
        return False


class Activation:
    """The sockets systemd passed, for the listeners to find theirs in."""

    def __init__(self, sockets: list[PassedSocket]) -> None:
        self.sockets = sockets

    @classmethod
    def fromEnvironment(cls) -> Activation:
        """The sockets passed to this process (none if it was not socket-activated)."""
        passed = ListenFDs.fromEnvironment()
        named = {fd: name for name, fd in passed.inheritedNamedDescriptors().items()}
        found = (describe(fd, named.get(fd, "")) for fd in passed.inheritedDescriptors())
        return cls([skt for skt in found if skt is not None])

    def find(self, protocol: str, host: str, port: int) -> PassedSocket | None:
        """The passed socket a listener of C{protocol} on C{host}:C{port} takes, if any."""
        for skt in self.sockets:
            if skt.protocol == protocol and skt.port == port and _same_host(host, skt.host):
                return skt
        return None

    def unmatched(self, wanted: list[tuple[str, str, int]]) -> list[PassedSocket]:
        """The passed sockets no listener in C{wanted} (protocol, host, port) takes."""
        taken = {self.find(*key) for key in wanted}
        return [skt for skt in self.sockets if skt not in taken]
