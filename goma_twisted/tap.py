"""
The twistd plugin: C{twistd goma-pt --config FILE}.

Config errors are found here, before twistd daemonizes or binds anything,
and shown as sentences rather than tracebacks.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService
from twisted.logger import FileLogObserver, ILogObserver, Logger
from twisted.python import log as legacy_log
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from .config import ConfigError, GatewayConfig, load_config
from .logs import GatheringFileLogObserver, classic_line
from .metrics import check_endpoint
from .relaychoice import (
    RELAY_MODES,
    RelayKind,
    RelayUnavailableError,
    choose_relay,
    default_mode,
)
from .report import forwards_table
from .service import DEFAULT_DRAIN_TIMEOUT, ListenError, PassThroughService

log = Logger(namespace="goma_pt")


def _amount(value: str, unit: str) -> float:
    """C{value} as a finite number, 0 or more, or a usage error naming C{unit}."""
    try:
        amount = float(value)
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{value!r} is not a number of {unit}, 0 or more")
    return amount


def _seconds(value: str) -> float:
    return _amount(value, "seconds")


def _megabytes(value: str) -> float:
    megabytes = _amount(value, "megabytes")
    if not math.isfinite(megabytes * 1_000_000):
        # 1e308: finite, but not as a count of bytes.
        raise ValueError(f"{value!r} is too many megabytes")
    return megabytes


def _bytes(megabytes: float) -> int:
    """C{megabytes} in bytes; a size under a byte is one byte, not 0 (never)."""
    count = round(megabytes * 1_000_000)
    return max(count, 1) if megabytes > 0 else 0


def _relay_mode(value: str) -> str:
    if value not in RELAY_MODES:
        raise ValueError(f"{value!r} is not one of {', '.join(RELAY_MODES)}")
    return value


def _files(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{value!r} is not a number of files, 1 or more")
    return count


# twistd's --logfile rotates at 1 MB and keeps every old file: with a line
# per connection, a busy forwarder would fill its disk with them.
DEFAULT_LOG_SIZE_MB = 10
DEFAULT_LOG_KEEP = 10


class Options(usage.Options):
    synopsis = (
        "--config FILE [--check] [--drain SECONDS] [--metrics ENDPOINT] [--relay MODE] "
        "[--log-size MB] [--log-keep N]"
    )
    longdesc = (
        "Forward TCP and UDP ports as listed under gateway.entryPoints.passThrough.forwards "
        "of a Goma Gateway config file. The rest of the file (routes, middlewares, other "
        "entry points) is accepted and left alone. SIGHUP re-reads the file; SIGTERM stops, "
        "letting live TCP connections finish for up to --drain seconds."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "Goma Gateway config file (YAML) whose passThrough forwards to serve.",
        ],
        [
            "drain",
            None,
            DEFAULT_DRAIN_TIMEOUT,
            "At a stop, and for forwards a reload removes: seconds live TCP connections "
            "may go on before they are closed (0: close at once).",
            _seconds,
        ],
        [
            "metrics",
            "m",
            None,
            "Serve Prometheus metrics at /metrics on this Twisted server endpoint, "
            "e.g. tcp:9108:interface=127.0.0.1 (off by default).",
        ],
        [
            "relay",
            None,
            None,
            "The TCP relay: auto (accelerated on the Twisted versions it was tested with, "
            "else plain), plain (Twisted's public API only), or accelerated. "
            "Default: $GOMA_PT_RELAY, else auto.",
            _relay_mode,
        ],
        [
            "log-size",
            None,
            DEFAULT_LOG_SIZE_MB,
            "With twistd's --logfile: megabytes at which the file is rotated (moved to "
            "FILE.1, older ones up a number); 0: only on SIGUSR1.",
            _megabytes,
        ],
        [
            "log-keep",
            None,
            DEFAULT_LOG_KEEP,
            "With twistd's --logfile: rotated files kept (FILE.1 to FILE.N); older ones "
            "are deleted.",
            _files,
        ],
    ]
    optFlags = [
        ["check", None, "Check the config file, print the forwards it would open, and exit."],
    ]

    config: GatewayConfig

    def parseOptions(self, options: Any = None) -> None:
        """
        As L{usage.Options.parseOptions}, but a usage error of goma-pt's own
        options exits 1 whatever the Twisted: twistd before Twisted 26.10
        (the newest for Python 3.9, so for PyPy 3.9) prints it and exits 0.
        The output is twistd's: the usage text, then the problem.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            print(self)
            print(f"{' '.join(sys.argv[0:2])}: {e}")
            raise SystemExit(1) from None

    def postOptions(self) -> None:
        if self["relay"] is None:
            self["relay"] = default_mode()
        if self["relay"] != "plain":
            try:
                self.relayChoice = choose_relay(self["relay"])
            except RelayUnavailableError as e:
                raise SystemExit(f"goma-pt: {e}") from None
        if self["metrics"] is not None:
            try:
                check_endpoint(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics: {e}") from None
        if not self["config"]:
            raise usage.UsageError(
                "no config file given; use --config FILE, a Goma Gateway YAML file with "
                "gateway.entryPoints.passThrough.forwards (see etc/goma-pt.yaml)"
            )
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            # SystemExit with a message: twistd prints it and exits 1,
            # without a traceback or a page of usage text.
            raise SystemExit(f"goma-pt: {e}") from None
        if self["check"]:
            count = len(self.config.forwards)
            print(f"{self['config']}: OK, {count} forward{'s' if count != 1 else ''}")
            print(forwards_table(self.config))
            raise SystemExit(0)


def makeService(options: dict[str, Any]) -> IService:
    _show_without_traceback(ListenError)
    choice = getattr(options, "relayChoice", None)
    if choice is not None and choice.kind is RelayKind.ACCELERATED:
        from .accel import install_reactor

        install_reactor()
    _tune_jit()
    service = _TwistdService(
        options.config,  # type: ignore[attr-defined]
        drain_timeout=options["drain"],
        reload_signal=signal.SIGHUP,
        metrics=options["metrics"],
        relay=options["relay"],
    )
    service.twistdOptions = getattr(options, "parent", None)
    service.logRotation = LogRotation(_bytes(options["log-size"]), options["log-keep"])
    return service


@dataclass(frozen=True)
class LogRotation:
    """When twistd's --logfile rotates (bytes; 0: only on SIGUSR1) and how
    many rotated files it keeps."""

    size: int = DEFAULT_LOG_SIZE_MB * 1_000_000
    keep: int = DEFAULT_LOG_KEEP


class _CannotStartError(ListenError):
    """
    A L{ListenError} as twistd's daemon reports it. The waiting parent
    prints the first 100 bytes of C{traceback}'s C{"module.Class: message"}
    line, and C{"goma_twisted.service.ListenError: "} took a third of them
    (C{"... forward to 127.0.0."}): named so, the line is the one the
    foreground prints, C{"goma-pt: cannot start: tcp ...: Address already
    in use; forward to ..."}.
    """


_CannotStartError.__module__ = "builtins"  # traceback leaves builtins' out
_CannotStartError.__qualname__ = "goma-pt: cannot start"


class _TwistdService(PassThroughService):
    """
    The service as twistd runs it: joining twistd's Application, it leaves
    there the text log observer twistd will use (L{_offer_text_log}); a
    forward that cannot listen is a L{_CannotStartError}.
    """

    twistdOptions: Any = None
    logRotation = LogRotation()
    # twistd's --logfile, when goma-pt set its rotation.
    logFile: LogFile | None = None

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized) and self.twistdOptions is not None:
            self.logFile = _offer_text_log(parent, self.twistdOptions, self.logRotation)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            raise _CannotStartError(*e.args) from None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenError as e:
            raise _CannotStartError(*e.args) from None
        if self.logFile is not None:
            _check_rotation(self.logFile)


def _check_rotation(out: LogFile) -> None:
    """
    Warn, once started (after twistd's C{--uid}), if C{out} cannot be
    rotated: twistd's L{LogFile} then skips every rotation silently, and the
    file grows without end. It stays writable (opened before the drop).
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


def _offer_text_log(
    application: Componentized, twistdOptions: Any, rotation: LogRotation = LogRotation()
) -> LogFile | None:
    """
    Give twistd its own text log observer (C{--logfile} or standard output,
    rotation, SIGUSR1, its daemon checks), made by twistd's own code, but
    writing each line with L{classic_line}: the same lines, at a fifth of
    the CPU, and a C{--logfile} rotated as C{rotation} says rather than at
    every megabyte with no end to the old files kept. twistd takes an
    C{ILogObserver} component of the Application when C{--logger} is not
    given, and makes the Application only after C{makeService}, so this is
    the first moment it can be offered.

    Left to twistd: C{--logger}, C{--syslog}, and any twistd whose logger
    does not look as expected (C{_getLogObserver} is private: checked here,
    and its observer is handed back as it is whatever it turns out to be).

    @return: the C{--logfile} whose rotation was set, if any.
    """
    from twisted.scripts import twistd

    if not isinstance(twistdOptions, twistd.ServerOptions):
        return None
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        return None
    if application.getComponent(ILogObserver) is not None:
        return None
    loggerFactory = getattr(twistd._SomeApplicationRunner, "loggerFactory", None)
    makeObserver = getattr(loggerFactory, "_getLogObserver", None)
    if loggerFactory is None or makeObserver is None:
        return None
    try:
        observer = makeObserver(loggerFactory(twistdOptions))
    except OSError as e:
        # A --logfile in a missing directory, or one that cannot be
        # written: twistd would show it as a traceback. Nothing is logged
        # or bound yet (and a daemon has not forked): say it in a line.
        path = twistdOptions.get("logfile") or e.filename
        raise SystemExit(f"goma-pt: cannot open --logfile {path}: {e.strerror or e}") from None
    out = getattr(observer, "_outFile", None)
    if isinstance(out, LogFile):
        out.rotateLength = rotation.size or None
        out.maxRotatedFiles = rotation.keep
    else:
        out = None
    if isinstance(observer, FileLogObserver):
        observer.formatEvent = classic_line
        observer = _gathering(observer)
    if ILogObserver.providedBy(observer):
        application.setComponent(ILogObserver, observer)
    else:
        application.setComponent(legacy_log.ILogObserver, observer)
    return out


def _gathering(observer: FileLogObserver) -> FileLogObserver:
    """
    The same log, with the lines of one turn of the reactor written
    together (L{GatheringFileLogObserver}), when the reactor is goma-pt's
    and the observer's file can be had (a private attribute: checked).
    """
    from twisted.internet import reactor

    out = getattr(observer, "_outFile", None)
    if out is None or not isinstance(getattr(reactor, "beforeWait", None), list):
        return observer
    return GatheringFileLogObserver(out, classic_line, reactor)


# PyPy compiles a loop after 1039 runs and a function after 1619 by default.
# A forwarder's work is many short paths (accept, connect, each way a
# connection ends) that stay slow until compiled. With these (redis
# PING, a new connection each, goma-pt CPU per connection): the first
# 5,000 connections cost 0.6x the CPU they cost with the defaults, the
# next 25,000 about 0.8x; small requests on kept connections no more.
JIT_PARAMS = "threshold=100,function_threshold=150,trace_eagerness=20"


def _tune_jit(interpreter_args: list[str] | None = None) -> bool:
    """
    On PyPy, compile sooner (L{JIT_PARAMS}), unless the operator gave
    C{pypy3 --jit ...} themselves. Returns whether it changed anything.
    """
    try:
        import pypyjit
    except ImportError:
        return False
    if interpreter_args is None:
        interpreter_args = _own_command_line()
    if any(arg == "--jit" or arg.startswith("--jit=") for arg in interpreter_args):
        return False
    pypyjit.set_param(JIT_PARAMS)
    return True


def _own_command_line() -> list[str]:
    # PyPy 3.9 has no sys.orig_argv; the interpreter's own options are
    # visible only here.
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [arg.decode(errors="replace") for arg in f.read().split(b"\0")]
    except OSError:
        return []


def _show_without_traceback(*errors: type[BaseException]) -> None:
    """
    twistd lets a failure to start escape to the top, as a traceback. For
    errors that are the operator's to fix (a port in use, a privileged
    port), one line says it all.
    """
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, errors):
            print(f"goma-pt: cannot start: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    sys.excepthook = excepthook
