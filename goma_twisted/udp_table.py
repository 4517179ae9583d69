"""
The UDP session table of one forward, as pure logic: sessions by client
address, bounded, and which session gives way when the table is full.

A session that never got an answer from the target is the cheapest to
lose: a spoofed source, a client that gave up, or a query the target
ignores. When the table is full, the oldest such session gives way to a
new client; when every session has had an answer, the new client is
refused and the open sessions are untouched. Linux's connection tracker
does the same with its UDP entries: one not yet replied to may be dropped
early when the table is full, and expires after 30 s instead of 120.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Hashable)

# Seconds an unanswered session lasts without a datagram (at most its idle
# timeout): the connection tracker's figure for an unreplied UDP flow, long
# enough for a resolver's retries (5 s each) and a slow target's answer.
UNANSWERED_TIMEOUT = 30.0


class SessionTable(Generic[K, S]):
    """
    Sessions by key (the client's address), at most L{bound} of them, with
    the unanswered ones in the order they opened.
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.sessions: dict[K, S] = {}
        # Insertion-ordered: the first is the oldest unanswered session.
        self._unanswered: dict[S, None] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def full(self) -> bool:
        return len(self.sessions) >= self.bound

    @property
    def unanswered(self) -> int:
        """How many open sessions have had no answer yet."""
        return len(self._unanswered)

    def get(self, key: K) -> S | None:
        return self.sessions.get(key)

    def add(self, key: K, session: S) -> None:
        """A new session, unanswered until L{answered}."""
        self.sessions[key] = session
        self._unanswered[session] = None

    def answered(self, session: S) -> None:
        """C{session} has its first answer: it no longer gives way."""
        self._unanswered.pop(session, None)

    def remove(self, key: K, session: S) -> bool:
        """Take an ended C{session} out; whether it was the one at C{key}."""
        self._unanswered.pop(session, None)
        if self.sessions.get(key) is session:
            del self.sessions[key]
            return True
        return False

    def victim(self) -> S | None:
        """The session that gives way to a new one: the oldest unanswered, if any."""
        return next(iter(self._unanswered), None)


def expiry(idle_timeout: float, answered: bool) -> tuple[float, bool]:
    """
    How long a session may be idle, and whether ending then is for want
    of an answer (shorter than its idle timeout) rather than idleness.
    """
    if answered or idle_timeout <= UNANSWERED_TIMEOUT:
        return idle_timeout, False
    return UNANSWERED_TIMEOUT, True
