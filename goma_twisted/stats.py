"""
What each forward has done so far, as plain integers.

The relays update these at events they already handle (a read, a connect,
an end), with an integer add and no lock, no call and no I/O: the read
path is the hot one. L{goma_twisted.metrics} turns them into Prometheus
samples when scraped, in the reactor's thread, so a scrape sees a
consistent picture.

Counts by reason are dicts keyed by the same reason strings the log uses,
so a new reason (a refusal by an address policy, a limit) needs no new
metric code: C{stats.count_refused("denied")}.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from .config import Forward

# Upper bounds (seconds) of the upstream connect-time histogram: loopback
# and LAN connects land in the first buckets, the default 10 s connect
# timeout in the last.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram:
    """
    Observations counted in fixed buckets, Prometheus style: a value
    falls in the first bucket whose upper bound it does not exceed, or in
    the last, unbounded one.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = CONNECT_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for each bucket, +Inf last."""
        result = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            result.append((bound, total))
        return result


def _by_reason(known: Iterable[str]) -> dict[str, int]:
    # Known reasons start at 0, so their series exist before the first
    # event and Prometheus's rate() sees that event too.
    return dict.fromkeys(known, 0)


class TCPStats:
    """
    The TCP side of one forward.

    A connection is C{accepted} when a relay starts for it, and counted in
    C{closed} under the reason its end event gives; C{active} is the
    difference. C{connect_failures} counts, by reason, the connections
    whose target could not be reached (they are in C{closed} too).
    C{refused} counts connections turned away before any relay starts
    (by an address policy or a limit); they are not C{accepted}.
    """

    protocol = "tcp"

    __slots__ = (
        "accepted",
        "active",
        "bytes_to_client",
        "bytes_to_target",
        "closed",
        "connect_failures",
        "connect_time",
        "forward",
        "max_connections",
        "refused",
    )

    def __init__(
        self,
        forward: Forward,
        reasons: Iterable[str] = (),
        connect_failures: Iterable[str] = (),
        refusals: Iterable[str] = (),
    ) -> None:
        self.forward = forward
        # The bound on open connections (set by the service).
        self.max_connections = 0
        self.accepted = 0
        self.active = 0
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.closed = _by_reason(reasons)
        self.connect_failures = _by_reason(connect_failures)
        self.refused = _by_reason(refusals)
        self.connect_time = Histogram()

    def opened(self) -> None:
        self.accepted += 1
        self.active += 1

    def connected(self, seconds: float) -> None:
        self.connect_time.observe(seconds)

    def ended(self, reason: str, connect_failed: bool = False) -> None:
        self.active -= 1
        self.closed[reason] = self.closed.get(reason, 0) + 1
        if connect_failed:
            self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1

    def count_refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class UDPStats:
    """
    The UDP side of one forward.

    C{sessions_refused} counts, by reason, datagrams from a client without
    a session that got none (at the session bound, by a policy): each is
    dropped, and a client that keeps trying counts again. C{dropped}
    counts other datagrams lost on the way, by reason. C{sessions_unanswered}
    is how many open sessions have had no answer yet (those give way to a
    new client when the table is full; each such end is counted in
    C{sessions_ended} as C{evicted}). C{unreachable}
    counts the ICMP "port unreachable" errors the target's host sent back
    (the kernel rate-limits those, so it is a lower bound).
    """

    protocol = "udp"

    __slots__ = (
        "bytes_to_client",
        "bytes_to_target",
        "datagrams_to_client",
        "datagrams_to_target",
        "dropped",
        "forward",
        "max_sessions",
        "sessions_active",
        "sessions_created",
        "sessions_ended",
        "sessions_refused",
        "sessions_unanswered",
        "unreachable",
    )

    def __init__(
        self,
        forward: Forward,
        reasons: Iterable[str] = (),
        drops: Iterable[str] = (),
        refusals: Iterable[str] = (),
    ) -> None:
        self.forward = forward
        self.max_sessions = 0
        self.sessions_created = 0
        self.sessions_active = 0
        self.sessions_unanswered = 0
        self.sessions_ended = _by_reason(reasons)
        self.sessions_refused = _by_reason(refusals)
        self.datagrams_to_target = 0
        self.datagrams_to_client = 0
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.dropped = _by_reason(drops)
        self.unreachable = 0

    def opened(self) -> None:
        self.sessions_created += 1
        self.sessions_active += 1

    def ended(self, reason: str) -> None:
        self.sessions_active -= 1
        self.sessions_ended[reason] = self.sessions_ended.get(reason, 0) + 1

    def count_refused(self, reason: str, datagrams: int = 1) -> None:
        self.sessions_refused[reason] = self.sessions_refused.get(reason, 0) + datagrams

    def count_dropped(self, reason: str, datagrams: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + datagrams
