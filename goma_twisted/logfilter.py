"""
What goma-pt's log observers leave out of what Twisted's listening ports log.

At the file descriptor limit, Twisted's accept loop logs a few lines for
every connection it must drop, as fast as clients arrive. goma-pt's
accelerated port pauses accepting instead; under the plain relay the loop
is Twisted's own, so goma-pt's log observers pass its events through
L{RateLimitedObserver}: the first of each interval, then one line saying
how many were left out. It also drops the line each of goma-pt's ports logs
as it starts (C{goma-pt starting on 8080}, after the listening service's
L{LOG_PREFIX}), which goma-pt's own C{Forwarding ...} line says better.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import ILogObserver, LogEvent, LogLevel
from zope.interface import implementer

# Twisted's TCP listening port logs under its class's name.
LISTENING_PORTS = ("twisted.internet.tcp.Port",)
# What goma-pt's factories name themselves to Twisted (their logPrefix).
LOG_PREFIX = "goma-pt"
_STARTING = LOG_PREFIX + " starting on "


@implementer(ILogObserver)
class RateLimitedObserver:
    """
    Passes every event to C{observer}, except that of the events from
    C{namespaces} it passes at most one per C{interval} seconds for each
    namespace, and, before the next one it passes, a count of those it
    left out.

    @param seconds: the current time (the reactor's C{seconds}).
    """

    def __init__(
        self,
        observer: Callable[[LogEvent], None],
        seconds: Callable[[], float] = time.monotonic,
        namespaces: tuple[str, ...] = LISTENING_PORTS,
        interval: float = 10.0,
    ) -> None:
        self.observer = observer
        self.seconds = seconds
        self.namespaces = namespaces
        self.interval = interval
        self._last: dict[str, float] = {}
        self._left: dict[str, int] = {}

    def __call__(self, event: LogEvent) -> None:
        namespace = event.get("log_namespace")
        if namespace not in self.namespaces:
            if namespace == "log_legacy" and _starting(event):
                return
            self.observer(event)
            return
        now = self.seconds()
        last = self._last.get(namespace)
        if last is not None and now - last < self.interval:
            self._left[namespace] = self._left.get(namespace, 0) + 1
            return
        self._last[namespace] = now
        left = self._left.pop(namespace, 0)
        if left:
            self.observer(
                {
                    "log_format": "{left} more events from {source} not logged in {seconds:.0f}s",
                    "log_level": LogLevel.warn,
                    "log_namespace": "goma_pt",
                    "log_system": "-",
                    "log_time": event.get("log_time", now),
                    "left": left,
                    "source": namespace,
                    "seconds": now - (last if last is not None else now),
                }
            )
        self.observer(event)


def _starting(event: LogEvent) -> bool:
    """Whether a legacy event is one of goma-pt's ports saying it starts."""
    message: tuple[Any, ...] = tuple(event.get("message") or ())
    return len(message) == 1 and str(message[0]).startswith(_STARTING)
