"""
A JSON log for machines: C{twistd --logger goma_twisted.logs.json_observer}.

Each event is one line holding one JSON object: Twisted's own JSON form
(L{twisted.logger.eventAsJSON}, which L{twisted.logger.eventsFromJSONLogFile}
reads back), with every field of the event at the top level (C{reason},
C{bytesToTarget}, ...) and the rendered text line added as C{log_text}.

Where it writes: standard output, or the file named by C{$GOMA_PT_JSON_LOG}
(appended to). twistd ignores C{--logfile} when C{--logger} is given, and
a daemon's standard output is C{/dev/null}, so a daemon needs the variable.
On SIGUSR1 the file is reopened, for C{logrotate} to move it away first.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import IO, Any, cast

from twisted.logger import FileLogObserver, LogEvent, eventAsJSON, eventAsText

ENVIRONMENT = "GOMA_PT_JSON_LOG"


def event_as_json_line(event: LogEvent) -> str:
    """One event as one line of JSON, its rendered text included."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return eventAsJSON({**event, "log_text": text}) + "\n"


class ReopeningFile:
    """A file appended to, that can be reopened at the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = self._open()

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        old, self._file = self._file, self._open()
        old.close()


def json_observer() -> FileLogObserver:
    """
    The observer factory for C{twistd --logger}: JSON lines to standard
    output, or to C{$GOMA_PT_JSON_LOG} when set.
    """
    path = os.environ.get(ENVIRONMENT, "")
    if path in ("", "-"):
        return FileLogObserver(sys.stdout, event_as_json_line)
    try:
        out = ReopeningFile(path)
    except OSError as e:
        # twistd calls this before anything is logged: say it in a line.
        raise SystemExit(f"goma-pt: cannot open ${ENVIRONMENT} ({path}): {e.strerror}") from None
    _reopen_on_sigusr1(out)
    return FileLogObserver(cast(IO[Any], out), event_as_json_line)


def _reopen_on_sigusr1(out: ReopeningFile) -> None:
    # As twistd does for its own --logfile: only if nobody else handles it.
    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return

    def reopen(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(out.reopen)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, reopen)
