"""
Who may come in, and how many at once: the pure logic behind a forward's
C{allow}/C{deny} lists, its connection and session bounds, the file
descriptor budget that sizes the default bounds, and a refusal log that
a flood cannot flood. No sockets here; the relays ask, this answers.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, Union

from attrs import field, frozen

# Union rather than |: these are evaluated at run time, and PyPy is Python 3.9.
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Why a client was refused, as counters and refusal log events name it.
DENIED = "denied"
AT_BOUND = "at bound"
AT_BOUND_PER_IP = "at per-ip bound"
UNTRUSTED = "untrusted source"
BAD_HEADER = "bad proxy header"
NO_DESCRIPTORS = "out of file descriptors"
REFUSALS = (DENIED, AT_BOUND, AT_BOUND_PER_IP, UNTRUSTED, BAD_HEADER, NO_DESCRIPTORS)

# Pipes the TCP relays may hold at once to splice bulk streams
# (accel.io.SplicePipe), two descriptors each.
SPLICE_PIPES = 16
# File descriptors kept aside for the process itself (logs, DNS lookups,
# the listeners' momentary accept, metrics scrapes, a .tac's own
# services); and that with the splice pipes', where the relays splice.
PROCESS_FDS = 64
RESERVED_FDS = PROCESS_FDS + 2 * SPLICE_PIPES

# A relayed TCP connection holds two descriptors, a UDP session one.
FDS_PER_CONNECTION = 2
FDS_PER_SESSION = 1
# Default bounds stay in this range whatever the descriptor limit.
MIN_DEFAULT_BOUND = 16
MAX_DEFAULT_BOUND = 65536


def reserved_fds(splicing: bool) -> int:
    """The descriptors a budget keeps aside, the splice pipes' only where they can open."""
    return RESERVED_FDS if splicing else PROCESS_FDS


@functools.lru_cache(maxsize=1024)
def parse_ip(host: str) -> IPAddress | None:
    """
    The address a client connected from, as a value: an IPv4 client of a
    dual-stack listener (C{::ffff:192.0.2.1}) is the IPv4 address it is,
    and an IPv6 zone (C{fe80::1%eth0}) is dropped. None if not an address.

    Remembered for the last 1024 addresses: clients come back from the
    same ones, and parsing one took longer than the rest of admitting a
    TCP connection or a UDP session.
    """
    host = host.partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=1024)
def ip_text(host: str) -> str:
    """
    C{str(parse_ip(host))}, remembered as L{parse_ip} is: the key that
    L{Bounds} counts a client under (making the text of an address object
    took a microsecond, at each admission and again at each release).
    """
    return str(parse_ip(host))


def parse_network(text: str) -> tuple[IPNetwork | None, str]:
    """
    An address or CIDR block from a config list; on failure, say why.

    Host bits set under the mask (C{10.0.0.1/8}) are refused with the
    block they probably meant, rather than silently widened. IPv4-mapped
    IPv6 blocks (C{::ffff:10.0.0.0/104}) become the IPv4 block they name,
    since clients are matched as IPv4.
    """
    text = text.strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None, f"{text!r} is not an IP address or CIDR block (10.0.0.0/8, 2001:db8::/32)"
    if network.network_address != ipaddress.ip_interface(text).ip and "/" in text:
        return None, f"{text!r} has bits set after the prefix; did you mean {network}?"
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network, ""


def matches(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether C{address} is in any of C{networks} (of its own family)."""
    return any(address.version == n.version and address in n for n in networks)


@frozen
class AddressPolicy:
    """
    A forward's C{allow} and C{deny} lists.

    Deny wins: an address in any C{deny} block is refused. Otherwise, if
    there is an C{allow} list, the address must be in one of its blocks;
    with no C{allow} list every address not denied is admitted. The order
    of the entries does not matter, so a list reads the same in any order
    and the two keys cannot disagree about which comes first.
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def permits(self, address: IPAddress | None) -> bool:
        if not self:
            return True
        if address is None:
            # Not an IP client (never for TCP/UDP listeners): only an
            # open policy would admit it, and this one is not open.
            return False
        if matches(address, self.deny):
            return False
        return not self.allow or matches(address, self.allow)


class Bounds:
    """
    How many connections (or sessions) a forward has open, in all and per
    client address, against its bounds. C{None} means no bound.

    L{admit} checks and counts in one step; L{release} undoes it.
    """

    def __init__(self, total: int | None = None, per_ip: int | None = None) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.by_ip: dict[str, int] = {}

    def full(self) -> bool:
        return self.total is not None and self.open >= self.total

    def admit(
        self, address: IPAddress | None, *, counted: bool = False, key: str | None = None
    ) -> str | None:
        """
        Count one more for C{address}, or say why not (L{AT_BOUND} or
        L{AT_BOUND_PER_IP}). With C{counted}, the total already includes
        this one (a TCP connection counts from accept, before its PROXY
        header names the client) and only the per-address bound is checked.
        C{key} is C{str(address)} when the caller has it (L{ip_text}).
        """
        if key is None:
            key = str(address)
        if not counted and self.full():
            return AT_BOUND
        if self.per_ip is not None and self.by_ip.get(key, 0) >= self.per_ip:
            return AT_BOUND_PER_IP
        if not counted:
            self.open += 1
        self.by_ip[key] = self.by_ip.get(key, 0) + 1
        return None

    def count(self) -> None:
        """Count one in the total only (a connection whose client is not yet known)."""
        self.open += 1

    def release(
        self, address: IPAddress | None, *, admitted: bool = True, key: str | None = None
    ) -> None:
        """Undo L{admit} (or only L{count}, when not C{admitted}); C{key} as for L{admit}."""
        self.open = max(self.open - 1, 0)
        if not admitted:
            return
        if key is None:
            key = str(address)
        left = self.by_ip.get(key, 0) - 1
        if left > 0:
            self.by_ip[key] = left
        else:
            self.by_ip.pop(key, None)


@frozen
class Budget:
    """
    How a process's file descriptors are shared between its forwards:
    the figures goma-pt logs at start, and the bound of each forward.

    C{tcp} and C{udp} hold each forward's bound, in the order given to
    L{plan_budget}, and whether it was derived (not configured).
    """

    limit: int
    in_use: int
    reserved: int
    tcp: tuple[tuple[int, bool], ...] = ()
    udp: tuple[tuple[int, bool], ...] = ()
    needed: int = field(default=0)

    @property
    def usable(self) -> int:
        return max(self.limit - self.in_use - self.reserved, 0)

    @property
    def overcommitted(self) -> bool:
        """The configured bounds, all reached at once, need more than there is."""
        return self.needed > self.usable


def plan_budget(
    fd_limit: int,
    in_use: int,
    tcp: list[int | None],
    udp: list[int | None],
    reserved: int = RESERVED_FDS,
) -> Budget:
    """
    Size the bounds of forwards that give none, so that all of them full
    at once still fit in the descriptor limit: accept() and a session's
    socket then never fail with EMFILE.

    Configured bounds are taken first; what is left is shared, half to
    TCP forwards (two descriptors per connection) and half to UDP ones
    (one per session) when both kinds need a default, all to the one kind
    otherwise, and evenly between the forwards of a kind.

    @param tcp: each TCP forward's C{maxConnections}, or None.
    @param udp: each UDP forward's C{maxSessions}, or None.
    """
    usable = max(fd_limit - in_use - reserved, 0)
    configured = FDS_PER_CONNECTION * sum(b for b in tcp if b is not None) + FDS_PER_SESSION * sum(
        b for b in udp if b is not None
    )
    left = max(usable - configured, 0)
    tcp_unset = sum(1 for b in tcp if b is None)
    udp_unset = sum(1 for b in udp if b is None)
    tcp_share = left // 2 if tcp_unset and udp_unset else (left if tcp_unset else 0)
    udp_share = left - tcp_share if udp_unset else 0

    def default(share: int, count: int, cost: int) -> int:
        if not count:
            return 0
        return max(MIN_DEFAULT_BOUND, min(MAX_DEFAULT_BOUND, share // cost // count))

    tcp_default = default(tcp_share, tcp_unset, FDS_PER_CONNECTION)
    udp_default = default(udp_share, udp_unset, FDS_PER_SESSION)
    tcp_bounds = tuple((b, False) if b is not None else (tcp_default, True) for b in tcp)
    udp_bounds = tuple((b, False) if b is not None else (udp_default, True) for b in udp)
    needed = FDS_PER_CONNECTION * sum(b for b, _ in tcp_bounds) + FDS_PER_SESSION * sum(
        b for b, _ in udp_bounds
    )
    return Budget(fd_limit, in_use, reserved, tcp_bounds, udp_bounds, needed)


class RefusalLog:
    """
    Logs refusals without letting a flood flood the log: per forward and
    reason, at most one event every C{interval} seconds. Each logged
    event says how many refusals went unlogged since the previous one;
    the forward's counters have the exact totals.

    @param clock: gives C{seconds()} (the reactor, or a test's Clock).
    """

    FORMAT = "{forward}: refused {client}: {refusal}{detailNote}{suppressedNote}"

    def __init__(
        self,
        emit: Callable[..., Any],
        clock: Any,
        interval: float = 10.0,
        format: str = FORMAT,
    ) -> None:
        self.emit = emit
        self.format = format
        self.clock = clock
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def refused(
        self, forward: str, client: str, refusal: str, detail: str = "", **fields: Any
    ) -> None:
        """
        Log a refusal unless one of its kind was logged within the
        interval. The key is the forward and the refusal only, never the
        detail, which may come from a peer's bytes.
        """
        key = (forward, refusal)
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        note = ""
        if suppressed and last is not None:
            note = f" ({suppressed} more not logged in the last {now - last:.0f}s)"
        self.emit(
            self.format,
            forward=forward,
            client=client,
            refusal=refusal,
            detail=detail,
            detailNote=f" ({detail})" if detail else "",
            suppressed=suppressed,
            suppressedNote=note,
            **fields,
        )
