"""
goma-pt's log observers: a faster text log by default, and a JSON log for
machines (C{twistd --logger goma_twisted.logs.json_observer}).

The text log is Twisted's classic one, line for line (C{classic_line}), made
cheap: every connection and session end is one event, and Twisted's own
formatting (a Python-level parse of the format string, a time zone worked out
again for every event) was a quarter of goma-pt's CPU per short connection.
twistdlog.py builds twistd's text log with it.

In the JSON log, each event is one line holding one JSON object: Twisted's own JSON form
(L{twisted.logger.eventAsJSON}, which L{twisted.logger.eventsFromJSONLogFile}
reads back), with every field of the event at the top level (C{reason},
C{bytesToTarget}, ...) and the rendered text line added as C{log_text}.

Where it writes: standard output, or the file named by C{$GOMA_PT_JSON_LOG}
(appended to). twistd ignores C{--logfile} when C{--logger} is given, and
a daemon's standard output is C{/dev/null}, so a daemon needs the variable.
On SIGUSR1 the file is reopened, for C{logrotate} to move it away first.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import string
import sys
import time
from collections.abc import Callable
from threading import get_ident
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from twisted.python.compat import ioType

from .logfilter import RateLimitedObserver

ENVIRONMENT = "GOMA_PT_JSON_LOG"

_LEVELS = frozenset(LogLevel.iterconstants())
_INFO = LogLevel.info


class EventLogger(Logger):
    """
    L{Logger} whose C{emit} makes the same event with less work: Twisted's
    checks the level by sorting all the levels again for every event (ten
    calls), here it is looked up in a set made once. A level that is not
    one goes to Twisted's C{emit}, which reports it.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)
            return
        self._publish(level, format, kwargs)

    def infoEvent(self, format: str, event: dict[str, Any]) -> None:
        """
        C{info(format, **event)} for a caller that built the fields in a dict
        of its own, which becomes the event (the caller keeps no hold on it):
        the same event, without the two copies of the fields that keyword
        arguments cost on the way through C{info} and C{emit}. Every relayed
        session logs its end with a dozen fields.
        """
        self._publish(_INFO, format, event)

    def _publish(self, level: LogLevel, format: str | None, event: dict[str, Any]) -> None:
        """Complete C{event} as Twisted's C{emit} does, and send it to the observer."""
        # One key at a time: update(log_logger=...) builds a dict of keyword
        # arguments first, and merges it.
        event["log_logger"] = self
        event["log_level"] = level
        event["log_namespace"] = self.namespace
        event["log_source"] = self.source
        event["log_format"] = format
        event["log_time"] = time.time()
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))
        self.observer(event)


def event_as_json_line(event: LogEvent) -> str:
    """One event as one line of JSON, its rendered text included."""
    return eventAsJSON({**event, "log_text": event_text(event)}) + "\n"


# Each format string seen so far, as a function rendering it (see _renderer).
_renderers: dict[str, Callable[[LogEvent], str]] = {}
# Format strings remembered at most (goma-pt has a few dozen).
MAX_RENDERERS = 512
# Format specs an f-string renders as str.format does, written as they are.
_PLAIN_SPEC = re.compile(r"[\w .,<>=^+#%-]*\Z")


def render(event: LogEvent) -> str:
    """
    C{event["log_format"].format_map(event)}, by a function made once per
    format string: PyPy's JIT folds C{format_map} for a format it sees as a
    constant, but a format read from an event is parsed again at every
    call (about 3 us per line there), and CPython parses it each time too.
    Raises as C{format_map} would.
    """
    format = event["log_format"]
    try:
        renderer = _renderers[format]
    except KeyError:
        renderer = _renderer(format)
    return renderer(event)


def _renderer(format: str) -> Callable[[LogEvent], str]:
    """
    The function rendering C{format}, remembered (up to L{MAX_RENDERERS}).
    Past that bound (formats made per event by someone's code), a format
    is not compiled: making the function costs far more than one render.
    """
    if type(format) is not str or len(_renderers) >= MAX_RENDERERS:
        return cast(Callable[[LogEvent], str], format.format_map)
    renderer = _renderers[format] = _compiled(format) or format.format_map
    return renderer


def _compiled(format: str) -> Callable[[LogEvent], str] | None:
    """
    C{format.format_map} as an f-string made once: C{"{a} {b!r:>5}"} becomes
    C{lambda e: f"{e['a']}{L1}{e['b']!r:>5}"}, its literal text held in
    variables. Fields and specs are checked to be plain (a name, a spec of
    letters, digits and C{ .,<>=^+#%-}); any other format (attributes,
    indexes, nested fields, a bad one) gets None and C{format_map} itself.
    """
    try:
        parsed = list(string.Formatter().parse(format))
    except ValueError:
        return None
    names: dict[str, Any] = {"__builtins__": {}}
    parts = []
    for literal, name, spec, conversion in parsed:
        if literal:
            variable = f"L{len(names)}"
            names[variable] = literal
            parts.append(f"{{{variable}}}")
        if name is None:
            continue
        if not name.isidentifier() or not _PLAIN_SPEC.match(spec or ""):
            return None
        if conversion not in (None, "r", "s", "a"):
            return None
        convert = f"!{conversion}" if conversion else ""
        parts.append(f"{{e[{name!r}]{convert}{':' + spec if spec else ''}}}")
    source = 'lambda e: f"' + "".join(parts) + '"'
    return cast(Callable[[LogEvent], str], eval(source, names))


def event_text(event: LogEvent) -> str:
    """
    L{twisted.logger.formatEvent}, without the traceback, but rendered by
    C{str.format_map} (C code) when it can be: the same text for any format
    C{str.format} accepts. Twisted's C{{name()}} calls, failures, and events
    read back from JSON go to Twisted's own formatter.
    """
    try:
        if "log_flattened" in event:
            return formatEvent(event)
        return render(event)
    except Exception:
        return formatEvent(event)


class _TimeStamps:
    """
    L{twisted.logger.formatTime} in RFC 3339 form, worked out once a second:
    the stamp has whole seconds, and an offset from UTC changes only on one.
    """

    def __init__(self) -> None:
        # The second stamped last, [start, end), and its stamp; one tuple,
        # replaced whole: a thread logging too sees a consistent one.
        self._last: tuple[float, float, str] = (0.0, -1.0, "")

    def stamp(self, when: float) -> str:
        start, end, stamp = self._last
        if start <= when < end:
            return stamp
        stamp = formatTime(when)
        second = when // 1
        self._last = (second, second + 1, stamp)
        return stamp

    __call__ = stamp


# The bound method: calling the instance itself looks up __call__ each time.
_stamp = _TimeStamps().stamp


def classic_line(event: LogEvent) -> str | None:
    """
    L{twisted.logger.formatEventAsClassicLogText}, the line twistd writes:
    C{"2026-11-26T11:05:06+0000 [goma_pt.tcp#info] text\\n"}, the same text, with
    the time stamp worked out once a second and the text by L{event_text}.
    Anything unusual (a failure, no time) is left to Twisted.
    """
    try:
        if "log_failure" in event or "log_flattened" in event:
            return formatEventAsClassicLogText(event)
        text = render(event)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            levelName = "-" if level is None else level.name
            system = f"{event.get('log_namespace', '-')}#{levelName}"
        line = f"{_stamp(event['log_time'])} [{system}] {text}\n"
    except Exception:
        return formatEventAsClassicLogText(event)
    if not text:
        return None
    if "\n" in text or "\n" in system:
        line = line[:-1].replace("\n", "\n\t") + "\n"
    return line


class SteadyFileLogObserver(FileLogObserver):
    """
    A file log observer whose writes never raise. A write that fails (a
    full disk, a reader gone away, a closed file) would not be written by
    raising either, and Twisted would report it to the same log at every
    event: its lines are counted, and the first write that works again
    starts with a warning line saying how many could not be written, since
    when and why (after a newline: the failed write may have left a line
    unfinished). goma-pt's JSON log is one.

    @param outFile: a text or binary file, as for L{FileLogObserver}.
    """

    def __init__(self, outFile: IO[Any], formatEvent: Callable[[LogEvent], str | None]) -> None:
        super().__init__(outFile, formatEvent)
        self._out = outFile
        self._encode = ioType(outFile) is not str
        # Lines that could not be written, since when and why.
        self._unwritten = 0
        self._since = 0.0
        self._why = ""

    def __call__(self, event: LogEvent) -> None:
        text = self.formatEvent(event)
        if text:
            self._write(text)

    def _write(self, text: str) -> None:
        out = self._notice() + text if self._unwritten else text
        try:
            try:
                self._out.write(out.encode("utf-8") if self._encode else out)
            except UnicodeEncodeError:
                # A character the file cannot encode (a lone surrogate, from
                # bytes the system gave undecoded): nothing was written, and
                # the lines it came with are written escaped, not lost.
                out = out.encode("ascii", "backslashreplace").decode("ascii")
                self._out.write(out.encode("ascii") if self._encode else out)
            self._out.flush()
        except (OSError, ValueError) as e:
            # A full disk, a reader gone (EPIPE), a closed file: raising
            # would not write them either, and would be logged (to this log)
            # at every turn. Count them; say so once writing works again.
            if not self._unwritten:
                self._since, self._why = time.time(), str(e) or type(e).__name__
            self._unwritten += text.count("\n")
        else:
            self._unwritten = 0

    def _notice(self) -> str:
        # After a newline: a write that failed (a disk filling up) may have
        # written part of its text, and left a line unfinished.
        return "\n" + (
            self.formatEvent(
                {
                    "log_level": LogLevel.warn,
                    "log_namespace": "goma_pt.log",
                    "log_source": None,
                    "log_time": time.time(),
                    "log_format": "{lines} log lines could not be written since {since}"
                    " ({why}); some may be missing above",
                    "lines": self._unwritten,
                    "since": formatTime(self._since),
                    "why": self._why,
                }
            )
            or ""
        )


class GatheringFileLogObserver(SteadyFileLogObserver):
    """
    A text log observer that writes the lines logged in one turn of the
    reactor together, in one write (and flush) made before the reactor
    waits for events again, instead of a write per line: every relayed
    connection and session logs a line at its end, and its own write was
    a system call per session. Its writes never raise
    (L{SteadyFileLogObserver}).

    The reactor calls L{writeGathered} before each wait: it lists it in its
    C{beforeWait} (goma-pt's L{goma_twisted.reactor.EPollReactor} does).
    Lines logged while the reactor is not running (starting up, stopped)
    are written at once, after those gathered. Lines logged from another
    thread are written at once too, so they may come before lines the
    reactor's thread gathered earlier in the same turn.

    @param outFile: a text or binary file, as for L{FileLogObserver}.
    """

    # Lines gathered at most before they are written anyway.
    MAX_GATHERED = 256

    def __init__(
        self, outFile: IO[Any], formatEvent: Callable[[LogEvent], str | None], reactor: Any
    ) -> None:
        super().__init__(outFile, formatEvent)
        self._reactor = reactor
        self._lines: list[str] = []
        reactor.beforeWait.append(self.writeGathered)
        atexit.register(self.writeGathered)

    def __call__(self, event: LogEvent) -> None:
        text = self.formatEvent(event)
        if not text:
            return
        if get_ident() == threadable.ioThread:
            if self._reactor.running:
                lines = self._lines
                lines.append(text)
                if len(lines) >= self.MAX_GATHERED:
                    self.writeGathered()
                return
            self.writeGathered()
        self._write(text)

    def writeGathered(self) -> None:
        """Write the lines gathered so far, if any."""
        lines = self._lines
        if lines:
            self._lines = []
            self._write("".join(lines))


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


def json_observer() -> ILogObserver:
    """
    The observer factory for C{twistd --logger}: JSON lines to standard
    output, or to C{$GOMA_PT_JSON_LOG} when set.
    """
    path = os.environ.get(ENVIRONMENT, "")
    if path in ("", "-"):
        return RateLimitedObserver(SteadyFileLogObserver(sys.stdout, event_as_json_line))
    try:
        out = ReopeningFile(path)
    except OSError as e:
        # twistd calls this before anything is logged: say it in a line.
        raise SystemExit(f"goma-pt: cannot open ${ENVIRONMENT} ({path}): {e.strerror}") from None
    on_sigusr1(out.reopen)
    return RateLimitedObserver(SteadyFileLogObserver(cast(IO[Any], out), event_as_json_line))


def on_sigusr1(call: Callable[[], object]) -> None:
    """
    Have SIGUSR1 C{call} in the reactor thread (a log file's rotate or
    reopen), as twistd does for its own --logfile: only if nobody else
    handles the signal.
    """
    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return

    def handle(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(call)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, handle)
