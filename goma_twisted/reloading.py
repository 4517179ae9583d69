"""
One reload at a time: later requests wait, and the latest one wins.

A reload plans from the running listeners, then waits (for old listeners
to stop) before it records what it changed. A second reload that planned
meanwhile would plan from a table the first is about to change, so
L{LatestWins} runs one job at a time: a job asked for while one runs
waits for it, and of all the jobs asked for meanwhile only the last runs,
once. Every caller gets the result of the first run that starts after it
asked, so the state it sees is at least as new as the one it asked for
(the config file's latest content, for a reload).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

T = TypeVar("T")

REJECTED = "Reload rejected; the running forwards stay as they were: {error}"
log = Logger(namespace="goma_pt")

Job = Callable[[], Deferred[T]]


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    # Running, with one more run asked for after it.
    QUEUED = "queued"


class LatestWins(Generic[T]):
    """Runs one job at a time; the jobs asked for meanwhile coalesce into the last."""

    def __init__(self) -> None:
        self.state = State.IDLE
        self._next: Job[T] | None = None
        self._waiting: list[Deferred[T]] = []

    def run(self, job: Job[T]) -> Deferred[T]:
        """
        Run C{job} now if nothing runs, else once the running job is done,
        unless a later call replaces it first.

        @return: a Deferred that fires with the result (or failure) of the
            run that served this call.
        """
        done: Deferred[T] = Deferred()
        if self.state is State.IDLE:
            self.state = State.RUNNING
            self._start(job, [done])
        else:
            self.state = State.QUEUED
            self._next = job
            self._waiting.append(done)
        return done

    def _start(self, job: Job[T], waiting: list[Deferred[T]]) -> None:
        running: Deferred[T] = maybeDeferred(job)
        running.addBoth(self._finished, waiting)

    def _finished(self, result: T | Failure, waiting: list[Deferred[T]]) -> None:
        # Still RUNNING or QUEUED while the callers hear the result, so a
        # caller that asks again from its callback queues behind.
        for done in waiting:
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(result)
        if self.state is State.QUEUED:
            job, self._next = self._next, None
            waiting, self._waiting = self._waiting, []
            assert job is not None
            self.state = State.RUNNING
            self._start(job, waiting)
        else:
            self.state = State.IDLE


def rejecting(coroutine: Coroutine[Any, Any, bool]) -> Deferred[bool]:
    """
    Run a reload; whatever it raises is a rejected reload (False), logged
    with its traceback since it is a fault of goma-pt's, never an
    unhandled error.
    """

    def rejected(failure: Failure) -> bool:
        error = f"{type(failure.value).__name__}: {failure.value}"
        log.failure(REJECTED, failure, LogLevel.error, error=error)
        return False

    return Deferred.fromCoroutine(coroutine).addErrback(rejected)
