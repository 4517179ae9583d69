"""
The idle sweep of UDP sessions: one timer per forward instead of one per
session.

One timer per session (scheduled at its start, cancelled at its end,
usually within milliseconds with udpResponses) costs more than the rest
of a session's Python work. Instead, sessions wait in buckets, one per
sweep time (a multiple of the granularity), and one timer runs the sweep
that is due. A session is checked at its deadline rounded up to the
granularity: it ends between its timeout and its timeout + granularity
after its last datagram, never earlier. Pure logic on a clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar


class Watched(Protocol):
    # The time of the bucket the item waits in, or None.
    checkAt: float | None


W = TypeVar("W", bound=Watched)


class IdleSweep(Generic[W]):
    """
    Checks items at their deadlines, rounded up to L{granularity}.

    @param clock: gives C{seconds()} and C{callLater}.
    @param check: called with an item that is due and the time; returns
        its next deadline, or None when it ended (and left the sweep).
    """

    def __init__(
        self, clock: Any, granularity: float, check: Callable[[W, float], float | None]
    ) -> None:
        self.clock = clock
        self.granularity = granularity
        self.check = check
        # Items by the time the sweep checks them.
        self._buckets: dict[float, dict[W, None]] = {}
        self._sweep: Any = None
        self._sweepAt: float | None = None
        # The bucket watch used last, and its time: under churn, items
        # starting within the same granularity step share it.
        self._lastAt = -math.inf
        self._lastBucket: dict[W, None] = {}

    def watch(self, item: W, deadline: float) -> None:
        """Check C{item} at C{deadline} (rounded up)."""
        at = self._lastAt
        if deadline <= at and deadline > at - self.granularity:
            # The bucket of the previous call's: less than a step after the
            # deadline, never before it (items of the same step share it).
            bucket = self._lastBucket
        else:
            step = self.granularity
            at = math.ceil(deadline / step) * step
            if at < deadline:
                # Rounded below it in floating point (3.6 / 0.3 -> 3.5999...):
                # a sweep there would put the item back in the same bucket.
                at += step
            found = self._buckets.get(at)
            if found is None:
                found = self._buckets[at] = {}
            bucket = self._lastBucket = found
            self._lastAt = at
        bucket[item] = None
        item.checkAt = at
        if self._sweepAt is None or at < self._sweepAt:
            self._schedule(at)

    def unwatch(self, item: W) -> None:
        """Take an ended C{item} out of its bucket."""
        at, item.checkAt = item.checkAt, None
        if at is None:
            return
        bucket = self._buckets.get(at)
        if bucket is not None:
            bucket.pop(item, None)
            if not bucket and bucket is not self._lastBucket:
                # The timer stays: when it fires with nothing due, it stops.
                # The last bucket stays for the next item (the sweep takes
                # it at its time): under churn, each item would make it
                # anew and remove it again.
                del self._buckets[at]

    def stop(self) -> None:
        """Cancel the timer; watching may start again afterwards."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = self._sweepAt = None
        self._lastAt = -math.inf

    def _schedule(self, at: float) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweepAt = at
        self._sweep = self.clock.callLater(max(at - self.clock.seconds(), 0), self._run)

    def _run(self) -> None:
        self._sweep = self._sweepAt = None
        # The buckets due are taken away: watch makes new ones.
        self._lastAt = -math.inf
        now = self.clock.seconds()
        check = self.check
        for at in sorted(at for at in self._buckets if at <= now):
            for item in self._buckets.pop(at):
                item.checkAt = None
                deadline = check(item, now)
                if deadline is not None:
                    self.watch(item, deadline)
        # An item moved on may have scheduled a later bucket than one
        # still waiting: the next sweep is the earliest bucket's.
        if self._buckets:
            first = min(self._buckets)
            if self._sweepAt is None or first < self._sweepAt:
                self._schedule(first)
