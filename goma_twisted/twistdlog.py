"""
The text log of C{twistd goma-pt}: the log twistd itself would make from its
options (C{--logfile}, C{-n}, standard output, SIGUSR1), built here from
Twisted's public pieces, L{LogFile} and a L{FileLogObserver}, and offered to
twistd as the Application's L{ILogObserver} component, which twistd uses
when C{--logger} is not given.

What differs from twistd's own: each line is written by goma-pt's formatter
(L{classic_line}: the same line at a fifth of the CPU), the lines of one
reactor turn are written together on goma-pt's reactor, a write that fails
does not raise (L{SteadyFileLogObserver}), and a C{--logfile} rotates at
C{--log-size} and keeps C{--log-keep} files, where twistd's rotates at every
megabyte and keeps every old file, which a line per connection turns into a
full disk.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from attrs import frozen
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from .logfilter import RateLimitedObserver
from .logs import GatheringFileLogObserver, SteadyFileLogObserver, classic_line, on_sigusr1

log = Logger(namespace="goma_pt")

DEFAULT_LOG_SIZE_MB = 10
DEFAULT_LOG_KEEP = 10
# twistd's file when a daemon is given no --logfile.
TWISTD_LOGFILE = "twistd.log"


@frozen
class LogRotation:
    """
    When a C{--logfile} rotates (its size in bytes; 0: only on SIGUSR1) and
    how many rotated files it keeps.
    """

    size: int = DEFAULT_LOG_SIZE_MB * 1_000_000
    keep: int = DEFAULT_LOG_KEEP


DEFAULT_ROTATION = LogRotation()


@frozen
class TextLog:
    """A text log observer, and the file it rotates, if it writes to one."""

    observer: ILogObserver
    file: LogFile | None


def text_log(
    twistdOptions: Mapping[str, Any], rotation: LogRotation = DEFAULT_ROTATION, reactor: Any = None
) -> TextLog | None:
    """
    The text log for twistd's options (its C{ServerOptions}): standard
    output for C{-n} without C{--logfile} or with C{--logfile -}, else the
    C{--logfile} (C{twistd.log} for a daemon without one), rotated as
    C{rotation} says. None where twistd's own is wanted: C{--logger},
    C{--syslog}, and a daemon asked to log to standard output (twistd
    refuses that itself).

    @raise SystemExit: with one line, for a C{--logfile} that cannot be
        opened (twistd would show a traceback).
    """
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        return None
    name = twistdOptions.get("logfile") or ""
    foreground = bool(twistdOptions.get("nodaemon") or twistdOptions.get("debug"))
    if name == "-" and not foreground:
        return None
    if name == "-" or (foreground and not name):
        return TextLog(_observer(sys.stdout, reactor), None)
    path = name or TWISTD_LOGFILE
    try:
        out = LogFile.fromFullPath(
            path, rotateLength=rotation.size or None, maxRotatedFiles=rotation.keep
        )
    except OSError as e:
        raise SystemExit(f"goma-pt: cannot open --logfile {path}: {e.strerror or e}") from None
    return TextLog(_observer(out, reactor), out)


def offer_text_log(
    application: Componentized,
    twistdOptions: Mapping[str, Any],
    rotation: LogRotation = DEFAULT_ROTATION,
) -> LogFile | None:
    """
    Set L{text_log}'s observer as C{application}'s L{ILogObserver}, unless
    it has one, and rotate its file on SIGUSR1 as twistd does.

    @return: the file it writes to, if any.
    """
    if application.getComponent(ILogObserver) is not None:
        return None
    made = text_log(twistdOptions, rotation)
    if made is None:
        return None
    application.setComponent(ILogObserver, made.observer)
    if made.file is not None:
        on_sigusr1(made.file.rotate)
    return made.file


def _observer(out: IO[Any], reactor: Any) -> ILogObserver:
    """
    Lines by L{classic_line}; those of one turn written together where the
    reactor says when a turn ends (goma-pt's accelerated one).
    """
    if reactor is None:
        from twisted.internet import reactor
    if isinstance(getattr(reactor, "beforeWait", None), list):
        return RateLimitedObserver(GatheringFileLogObserver(out, classic_line, reactor))
    return RateLimitedObserver(SteadyFileLogObserver(out, classic_line))


def check_rotation(out: LogFile) -> None:
    """
    Warn, once started (after twistd's C{--uid}), if C{out} cannot be
    rotated: L{LogFile} then skips every rotation silently, and the file
    grows without end. It stays writable (opened before the drop).
    """
    for path in (out.directory, out.path):
        if not os.access(path, os.W_OK):
            log.warn(
                "--logfile {logfile} will not be rotated (at --log-size or on SIGUSR1): "
                "user {uid} cannot write to {path}",
                logfile=out.path,
                uid=os.geteuid(),
                path=path,
            )
            return
