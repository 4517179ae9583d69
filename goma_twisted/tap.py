"""
The twistd plugin: C{twistd goma-pt --config FILE}: its options, and the
service it makes.

Config errors are found here, and a forward that cannot listen while twistd
builds the application, both before twistd daemonizes; either is shown as
one sentence rather than a traceback. The text log twistd writes is
goma-pt's (L{goma_twisted.twistdlog}).
"""

from __future__ import annotations

import math
import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorDaemonize
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from . import __version__
from .activation import Activation
from .config import ConfigError, GatewayConfig, load_config
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
from .twistdlog import (
    DEFAULT_LOG_KEEP,
    DEFAULT_LOG_SIZE_MB,
    DEFAULT_ROTATION,
    LogRotation,
    check_rotation,
    offer_text_log,
)


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


class Options(usage.Options):
    synopsis = (
        "--config FILE [--check] [--watch] [--drain SECONDS] [--metrics ENDPOINT] [--relay MODE] "
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
        [
            "watch",
            "w",
            "Reload when the config file changes, as on SIGHUP (an edit, or a Kubernetes "
            "ConfigMap's update of a mounted file); a broken file changes nothing.",
        ],
    ]

    config: GatewayConfig

    def opt_version(self) -> None:
        """Display goma-pt's version and Twisted's, and exit."""
        import twisted

        print(f"goma-pt version: {__version__}")
        print(f"Twisted version: {twisted.__version__}")
        raise SystemExit(0)

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
    choice = getattr(options, "relayChoice", None)
    if choice is not None and choice.kind is RelayKind.ACCELERATED:
        from .accel import install_reactor

        install_reactor()
    _tune_jit()
    return _TwistdService(
        options.config,  # type: ignore[attr-defined]
        twistdOptions=getattr(options, "parent", None),
        rotation=log_rotation(options),
        drain_timeout=options["drain"],
        reload_signal=signal.SIGHUP,
        metrics=options["metrics"],
        relay=options["relay"],
        activation=Activation.fromEnvironment(),
        watch=bool(options["watch"]),
    )


def log_rotation(options: dict[str, Any]) -> LogRotation:
    """The rotation C{--log-size} and C{--log-keep} ask for."""
    return LogRotation(_bytes(options["log-size"]), options["log-keep"])


class _TwistdService(PassThroughService):
    """
    The service as twistd runs it. Joining twistd's Application (twistd's
    own step after L{makeService}), it offers twistd goma-pt's text log
    (L{offer_text_log}) and listens at once: twistd has not yet started
    logging, written the pidfile or daemonized. A forward that cannot
    listen then ends twistd with one line (a C{SystemExit}, which twistd
    lets through), the same in the foreground and as a daemon, with nothing
    left bound and no pidfile. Ports are still bound before C{--uid/--gid}
    drop privileges.

    A reactor that must be told of a fork (L{IReactorDaemonize}: kqueue)
    listens at twistd's own time when it daemonizes; a port in use is then
    twistd's error report.

    @param twistdOptions: twistd's C{ServerOptions} (the plugin options'
        C{parent}); None leaves logging and listening to twistd.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        twistdOptions: Any = None,
        rotation: LogRotation = DEFAULT_ROTATION,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, **kwargs)
        self.twistdOptions = twistdOptions
        self.rotation = rotation
        # The --logfile goma-pt's text log writes, if any.
        self.logFile: LogFile | None = None
        self._listening = False

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.twistdOptions is None or not isinstance(parent, Componentized):
            return
        self.logFile = offer_text_log(parent, self.twistdOptions, self.rotation)
        if self._listens_early():
            try:
                super().privilegedStartService()
            except ListenError as e:
                raise SystemExit(f"goma-pt: cannot start: {e}") from None
            self._listening = True

    def _listens_early(self) -> bool:
        daemon = not (self.twistdOptions.get("nodaemon") or self.twistdOptions.get("debug"))
        if not daemon:
            return True
        from twisted.internet import reactor

        return not IReactorDaemonize.providedBy(reactor)

    def privilegedStartService(self) -> None:
        if not self._listening:
            super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self.logFile is not None:
            check_rotation(self.logFile)


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
