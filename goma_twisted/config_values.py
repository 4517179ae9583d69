"""
What goma-pt acts on, as frozen values: the forwards of a config file, with
every default resolved, and the problems that keep a file from loading.
"""

from __future__ import annotations

import re

from attrs import frozen
from twisted.internet.abstract import isIPAddress, isIPv6Address

from .policy import AddressPolicy, IPNetwork
from .sockopts import KEEPALIVE_SECONDS

# Goma Gateway's own defaults when a forward gives no timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_UDP_IDLE_TIMEOUT = 300.0
# What Goma's Go runtime does on both sockets: keepalive probes after 15 s
# idle, then every 15 s (Go's net.Dialer and ListenConfig KeepAlive).
DEFAULT_KEEPALIVE = KEEPALIVE_SECONDS

PROTOCOLS = {"tcp": ("tcp",), "udp": ("udp",), "tcp/udp": ("tcp", "udp")}

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@frozen
class Problem:
    """One thing wrong with a config file, and where it is."""

    source: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """
    A config file cannot be used; C{problems} lists every reason at once.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems in {self.problems[0].source}:"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


@frozen
class Target:
    """Where a forward sends traffic: an IP literal or a hostname, and a port."""

    host: str
    port: int

    @property
    def is_hostname(self) -> bool:
        """A hostname is resolved per connection or session, never once."""
        return not (isIPAddress(self.host) or isIPv6Address(self.host))

    def __str__(self) -> str:
        return format_address(self.host, self.port)


@frozen
class Forward:
    """
    One entry of C{passThrough.forwards}, with every default resolved.

    C{idle_timeout} is None when TCP connections may stay idle forever
    (TCP keepalive still finds dead peers). C{keepalive} is the idle time
    before the first keepalive probe and between probes, in seconds, on
    both sockets of a TCP connection (L{sockopts.keepalive_options}); None
    is off. C{backlog} is the TCP listen backlog; None is the system's
    C{net.core.somaxconn} (L{sockopts.system_backlog}).
    """

    protocols: tuple[str, ...]
    port: int
    target: Target
    address: str = ""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float | None = None
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    max_sessions: int | None = None
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    max_sessions_per_ip: int | None = None
    proxy_protocol: int | None = None
    accept_proxy_protocol: tuple[IPNetwork, ...] = ()
    udp_responses: int | None = None
    reuse_port: bool = False
    keepalive: float | None = DEFAULT_KEEPALIVE
    backlog: int | None = None

    @property
    def policy(self) -> AddressPolicy:
        """Who may use this forward: its C{allow} and C{deny} lists."""
        return AddressPolicy(self.allow, self.deny)

    @property
    def protocol(self) -> str:
        return "/".join(self.protocols)

    @property
    def name(self) -> str:
        """How logs and errors name this forward: C{tcp/udp 53}."""
        if self.address:
            return f"{self.protocol} {format_address(self.address, self.port)}"
        return f"{self.protocol} {self.port}"


@frozen
class GatewayConfig:
    """What goma-pt acts on, and what it read but leaves to Goma Gateway."""

    source: str
    forwards: tuple[Forward, ...]
    ignored: tuple[str, ...] = ()


def format_address(host: str, port: int) -> str:
    """
    C{host:port}, with IPv6 literals in brackets and IPv4 clients of a
    dual-stack listener (C{::ffff:192.0.2.1}) shown as the IPv4 they are.
    """
    if host.startswith("::ffff:") and isIPAddress(host[7:]):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(text: str) -> tuple[Target | None, str]:
    """
    Split C{host:port}, C{ip:port} or C{[ipv6]:port}; on failure say why.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None, "an IPv6 target needs the form [address]:port"
        if not isIPv6Address(host):
            return None, f"{host!r} is not an IPv6 address"
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            return None, "no port"
        if ":" in host:
            return None, "an IPv6 address must be in brackets"
        if not host:
            return None, "no host"
        if not (isIPAddress(host) or _is_hostname(host)):
            return None, f"{host!r} is not a hostname or an IP address"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None, f"port {port_text!r} is not 1 to 65535"
    return Target(host, int(port_text)), ""


def _is_hostname(host: str) -> bool:
    if len(host) > 253 or host.replace(".", "").isdigit():
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in host.rstrip(".").split("."))
