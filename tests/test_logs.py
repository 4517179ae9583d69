"""
The text log twistd writes by default: goma-pt's faster formatter gives
Twisted's own lines, and twistd still decides where they go.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.application.service import Application
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    eventAsJSON,
    eventFromJSON,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from goma_twisted import ending, tap, udp
from goma_twisted.config import parse_config
from goma_twisted.logfilter import RateLimitedObserver
from goma_twisted.logs import (
    ENVIRONMENT,
    GatheringFileLogObserver,
    _TimeStamps,
    classic_line,
    event_text,
    json_observer,
    render,
)
from goma_twisted.service import PassThroughService
from goma_twisted.twistdlog import TextLog, offer_text_log, text_log

from .support import (
    captured_logs,
    free_port,
    running,
    twistd_command,
    twistd_env,
    wait_for,
    write_config,
)
from .test_twistd import backend, tcp_roundtrip, udp_roundtrip

__all__ = ["backend"]  # the fixture, used by name

UDP_FORMAT = (
    "{forward} {client} -> {target}: {reason}; {datagramsToTarget} datagrams "
    "({bytesToTarget} bytes) sent, {datagramsToClient} ({bytesToClient} bytes) "
    "received, {duration:.3f}s"
)
END: dict[str, Any] = {
    "forward": "tcp 127.0.0.1:8080",
    "client": "127.0.0.1:38490",
    "proxiedBy": None,
    "target": "127.0.0.1:8000",
    "targetAddress": "127.0.0.1:8000",
    "bytesToTarget": 78,
    "bytesToClient": 688,
    "duration": 0.013894796371459961,
    "connectTime": 0.004198551177978516,
    "reason": "target closed",
    "detail": None,
}


def emitted(format: Any, namespace: str = "goma_pt.tcp", **fields: Any) -> LogEvent:
    """The event a Logger emits, caught."""
    events: list[LogEvent] = []
    Logger(namespace=namespace, observer=cast(ILogObserver, events.append)).info(format, **fields)
    return events[0]


class _Thing:
    name = "thing"

    def shout(self) -> str:
        return "HEY"


def _failed() -> LogEvent:
    events: list[LogEvent] = []
    try:
        raise ZeroDivisionError("no")
    except ZeroDivisionError:
        Logger(namespace="goma_pt", observer=cast(ILogObserver, events.append)).failure(
            "it broke: {n}", n=3
        )
    return events[0]


EVENTS = {
    "tcp connected": lambda: emitted(ending.TCP_CONNECTED_FORMAT, **END),
    "tcp ended": lambda: emitted(ending.TCP_ENDED_FORMAT, **END | {"connectTime": None}),
    "tcp failed": lambda: emitted(
        ending.TCP_FAILED_FORMAT, **END | {"reason": "connect refused", "detail": "no one there"}
    ),
    "tcp failed, braces and non-ASCII in the detail, IPv6 client": lambda: emitted(
        ending.TCP_FAILED_FORMAT,
        **END
        | {
            "client": "[2001:db8::1]:5353",
            "reason": "connect failed",
            "detail": "{x} {} caf\u00e9 \u2603",
        },
    ),
    "udp": lambda: emitted(
        UDP_FORMAT, "goma_pt.udp", **END | {"datagramsToTarget": 1, "datagramsToClient": 2}
    ),
    "plain": lambda: emitted("goma-pt ready: {count} listeners", "goma_pt", count=3),
    "braces and specs": lambda: emitted("{{literal}} {x!r} {y:>5} {z[1]}", x="a", y=7, z=[0, 9]),
    "attribute": lambda: emitted("{thing.name}", thing=_Thing()),
    "twisted call syntax": lambda: emitted("{thing.shout()} {f()}", thing=_Thing(), f=lambda: 4),
    "missing field": lambda: emitted("{nowhere} to be found"),
    "several lines": lambda: emitted("one\ntwo {n}", n="and\nthree"),
    "system": lambda: emitted("legacy", log_system="TCPForwardFactory,0,127.0.0.1"),
    "no level": lambda: {"log_format": "bare", "log_time": 1.5},
    "no time": lambda: {"log_format": "timeless", "log_namespace": "x"},
    "no format": lambda: emitted(None),
    "empty text": lambda: emitted(""),
    "bytes format": lambda: emitted(b"bytes {n}", n=1),
    "failure": _failed,
    "read back from JSON": lambda: eventFromJSON(
        eventAsJSON(emitted(ending.TCP_CONNECTED_FORMAT, **END))
    ),
}


def test_the_udp_end_format_is_the_one_documented() -> None:
    assert udp.SESSION_END_FORMAT == UDP_FORMAT


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_classic_line_is_twisteds_line(name: str) -> None:
    event = EVENTS[name]()
    assert classic_line(event) == formatEventAsClassicLogText(event)


def test_the_access_lines_read_as_before() -> None:
    stamp = formatTime(1795691109.842595)
    tcp_end = emitted(ending.TCP_CONNECTED_FORMAT, **END) | {"log_time": 1795691109.842595}
    assert classic_line(tcp_end) == (
        f"{stamp} [goma_pt.tcp#info] tcp 127.0.0.1:8080 127.0.0.1:38490 -> 127.0.0.1:8000: "
        "target closed; 78 bytes sent, 688 received, 0.014s (connect 0.004s)\n"
    )
    udp_end = emitted(
        UDP_FORMAT, "goma_pt.udp", **END | {"datagramsToTarget": 1, "datagramsToClient": 2}
    )
    assert classic_line(udp_end | {"log_time": 1795691109.0}) == (
        f"{formatTime(1795691109.0)} [goma_pt.udp#info] tcp 127.0.0.1:8080 127.0.0.1:38490 -> "
        "127.0.0.1:8000: target closed; 1 datagrams (78 bytes) sent, 2 (688 bytes) received, "
        "0.014s\n"
    )


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_event_text_is_twisteds_text(name: str) -> None:
    from twisted.logger import formatEvent

    event = EVENTS[name]()
    assert event_text(event) == formatEvent(event)


@pytest.fixture
def new_york() -> Iterator[None]:
    """Local time with daylight saving, for the offset to change."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_time_stamps_are_twisteds_across_seconds_and_an_offset_change(new_york: None) -> None:
    # 2026-03-08 07:00:00 UTC: clocks in New York go from 02:00 EST to 03:00 EDT.
    change = 1772953200.0
    stamps = _TimeStamps()
    whens = [change - 2.5, change - 1.0, change - 0.999, change - 0.001, change, change + 0.3]
    whens += [change + 1.7, change + 3600.25, change + 3600.9, 0.0, 1e9 + 0.5]
    for when in whens:
        assert stamps(when) == formatTime(when), when
    assert stamps(change - 0.001).endswith("01:59:59-0500")
    assert stamps(change).endswith("03:00:00-0400")


def test_twistd_gets_goma_pts_text_log_on_its_logfile(tmp_path: Path) -> None:
    made = _text_log(tmp_path, "-n", "--logfile", str(tmp_path / "goma.log"))
    assert _inner(made.observer).formatEvent is classic_line
    assert isinstance(made.file, LogFile)
    assert made.file.path == str(tmp_path / "goma.log")


def test_twistds_logfile_rotates_at_10_mb_and_keeps_10_files(tmp_path: Path) -> None:
    # twistd's own: every 1 MB, and every old file kept (a disk filled by a busy forwarder).
    out = _text_log(tmp_path, "-n", "--logfile", str(tmp_path / "goma.log")).file
    assert out is not None
    assert (out.rotateLength, out.maxRotatedFiles) == (10_000_000, 10)


def test_log_size_and_log_keep_set_the_rotation(tmp_path: Path) -> None:
    logfile = ("-n", "--logfile", str(tmp_path / "goma.log"))
    out = _text_log(tmp_path, *logfile, goma=("--log-size", "0.5", "--log-keep", "3")).file
    assert out is not None
    assert (out.rotateLength, out.maxRotatedFiles) == (500_000, 3)
    out = _text_log(tmp_path, *logfile, goma=("--log-size", "0")).file
    assert out is not None
    assert (out.rotateLength, out.maxRotatedFiles) == (None, 10)
    # Less than a byte is still a size (the smallest), not 0's "never".
    out = _text_log(tmp_path, *logfile, goma=("--log-size", "1e-9")).file
    assert out is not None
    assert (out.rotateLength, out.maxRotatedFiles) == (1, 10)


@pytest.mark.parametrize("twistd", [("-n",), ("-n", "--logfile", "-"), ("-n", "--logfile=-")])
def test_the_foreground_logs_to_standard_output(tmp_path: Path, twistd: tuple[str, ...]) -> None:
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", stdout)
        made = _text_log(tmp_path, *twistd)
    assert made.file is None
    made.observer(emitted("goma-pt ready: {count} listeners", count=1))
    _write_gathered(made.observer)
    assert LINE.fullmatch(stdout.getvalue().rstrip("\n"))
    assert stdout.getvalue().endswith("#info] goma-pt ready: 1 listeners\n")


def test_a_daemon_without_logfile_writes_twistds_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = _text_log(tmp_path).file
    assert out is not None
    assert out.path == str(tmp_path / "twistd.log")


def test_logger_syslog_and_a_daemons_standard_output_are_left_to_twistd(tmp_path: Path) -> None:
    json_logger = "goma_twisted.logs.json_observer"
    assert text_log(_server_options(tmp_path, "-n", "--logger", json_logger)) is None
    assert text_log(_server_options(tmp_path, "-n", "--syslog")) is None
    # twistd refuses a daemon logging to standard output itself.
    assert text_log(_server_options(tmp_path, "--logfile", "-")) is None


def test_an_application_with_an_observer_of_its_own_keeps_it(tmp_path: Path) -> None:
    application = Application("goma-pt")
    own = FileLogObserver(io.StringIO(), str)
    application.setComponent(ILogObserver, own)
    options = _server_options(tmp_path, "-n", "--logfile", str(tmp_path / "x.log"))
    assert offer_text_log(application, options) is None
    assert application.getComponent(ILogObserver) is own
    assert not (tmp_path / "x.log").exists()


def test_a_logfile_that_cannot_be_opened_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "goma.log"
    with pytest.raises(SystemExit) as caught:
        _text_log(tmp_path, "-n", "--logfile", str(path))
    assert str(caught.value) == f"goma-pt: cannot open --logfile {path}: No such file or directory"


def _server_options(tmp_path: Path, *twistd: str, goma: tuple[str, ...] = ()) -> ServerOptions:
    """twistd's options for this command line, C{goma} being goma-pt's own."""
    forward = {"protocol": "tcp", "port": free_port(), "target": "127.0.0.1:1"}
    config = write_config(tmp_path / "goma.yml", [forward])
    options = ServerOptions()
    options.parseOptions([*twistd, "goma-pt", "--config", str(config), *goma])
    return options


def _text_log(tmp_path: Path, *twistd: str, goma: tuple[str, ...] = ()) -> TextLog:
    """
    The text log goma-pt offers twistd for this command line; its file is
    closed, and a gathering observer taken off the reactor.
    """
    options = _server_options(tmp_path, *twistd, goma=goma)
    made = text_log(options, tap.log_rotation(options.subOptions))
    assert made is not None
    if made.file is not None:
        made.file.close()
    _write_gathered(made.observer)
    return made


def _inner(observer: Any) -> Any:
    """The file observer behind goma-pt's rate limit on Twisted's listening ports."""
    assert isinstance(observer, RateLimitedObserver)
    return observer.observer


def _write_gathered(observer: Any) -> None:
    observer = _inner(observer)
    if isinstance(observer, GatheringFileLogObserver):
        observer.writeGathered()
        from twisted.internet import reactor

        if observer.writeGathered in reactor.beforeWait:  # type: ignore[attr-defined]
            reactor.beforeWait.remove(observer.writeGathered)  # type: ignore[attr-defined]


def test_a_logfile_keeps_log_keep_rotated_files_of_log_size(tmp_path: Path, backend: int) -> None:
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log = tmp_path / "goma.log"
    command = twistd_command(
        "-n", "--pidfile=", f"--logfile={log}", "goma-pt", "--config", str(config),
        "--log-size", "0.002", "--log-keep", "2",
    )  # fmt: skip
    with running(command, tmp_path / "stdout", env=twistd_env()):
        wait_for(lambda: log.exists() and "goma-pt ready" in log.read_text(), what="ready")
        # about 150 bytes a line: 60 connections are several rotations of 2,000 bytes
        for n in range(60):
            assert tcp_roundtrip(port, b"%03d" % n) == b"%03d" % n
    kept = sorted(p.name for p in tmp_path.glob("goma.log*"))
    assert kept == ["goma.log", "goma.log.1", "goma.log.2"]
    for path in (log, tmp_path / "goma.log.1", tmp_path / "goma.log.2"):
        text = path.read_text()
        # rotated once past 2,000 bytes, by a turn's lines at most (the stop's are the most)
        assert len(text) < 2_000 + 1_000, path
        for line in text.splitlines():
            assert LINE.fullmatch(line), line
    assert log.read_text().splitlines()[-1].endswith("#info] Server Shut Down.")


LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^]]+\] .+")


@pytest.mark.parametrize("logfile", [(), ("--logfile=-",)])
def test_the_foreground_writes_its_lines_to_standard_output(
    tmp_path: Path, backend: int, logfile: tuple[str, ...]
) -> None:
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    stdout = tmp_path / "stdout"
    command = twistd_command("-n", "--pidfile=", *logfile, "goma-pt", "--config", str(config))
    with running(command, stdout, env=twistd_env(), cwd=tmp_path):
        wait_for(lambda: "goma-pt ready" in stdout.read_text(), what="ready")
        assert tcp_roundtrip(port, b"stdout") == b"stdout"
        wait_for(lambda: "client closed" in stdout.read_text(), what="the TCP end")
    lines = stdout.read_text().splitlines()
    for line in lines:
        assert LINE.fullmatch(line), line
    assert lines[-1].endswith("#info] Server Shut Down.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["goma.yml", "stdout"]


def test_a_daemon_logs_to_twistds_file_and_rotates_it_on_sigusr1(
    tmp_path: Path, backend: int
) -> None:
    # No --logfile: twistd's own default, twistd.log where it is started.
    port = free_port()
    forward = {"protocol": "tcp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    pidfile, log, rotated = (
        tmp_path / "goma-pt.pid",
        tmp_path / "twistd.log",
        tmp_path / "twistd.log.1",
    )
    started = subprocess.run(
        twistd_command(f"--pidfile={pidfile}", "goma-pt", "--config", str(config)),
        env=twistd_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile"))
    try:
        wait_for(lambda: log.exists() and "goma-pt ready" in log.read_text(), what="ready")
        assert tcp_roundtrip(port, b"before") == b"before"
        wait_for(lambda: "client closed" in log.read_text(), what="the TCP end")
        os.kill(pid, signal.SIGUSR1)
        wait_for(rotated.exists, what="the log to be rotated")
        assert tcp_roundtrip(port, b"after!") == b"after!"
        wait_for(lambda: "client closed" in log.read_text(), what="the second TCP end")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pidfile.exists(), what="the daemon to stop")
    finally:
        if pidfile.exists():
            os.kill(pid, signal.SIGKILL)
    before, after = rotated.read_text().splitlines(), log.read_text().splitlines()
    for line in before + after:
        assert LINE.fullmatch(line), line
    assert sum("client closed; 6 bytes sent, 6 received" in line for line in before) == 1
    assert sum("client closed; 6 bytes sent, 6 received" in line for line in after) == 1
    assert after[-1].endswith("#info] Server Shut Down.")


def test_twistd_logfile_lines_rotation_and_stop(tmp_path: Path, backend: int) -> None:
    port = free_port()
    forward = {"protocol": "tcp/udp", "port": port, "target": f"127.0.0.1:{backend}"}
    config = write_config(tmp_path / "goma.yml", [forward | {"address": "127.0.0.1"}])
    log, rotated, stdout = tmp_path / "goma.log", tmp_path / "goma.log.1", tmp_path / "stdout"
    command = twistd_command(
        "-n", "--pidfile=", f"--logfile={log}", "goma-pt", "--config", str(config)
    )
    with running(command, stdout, env=twistd_env()) as proc:
        wait_for(lambda: log.exists() and "goma-pt ready" in log.read_text(), what="ready")
        assert tcp_roundtrip(port, b"before") == b"before"
        wait_for(lambda: "client closed" in log.read_text(), what="the TCP end")
        os.kill(proc.pid, signal.SIGUSR1)  # twistd's own: rotate --logfile
        wait_for(rotated.exists, what="the log to be rotated")
        assert tcp_roundtrip(port, b"after!") == b"after!"
        assert udp_roundtrip(port, b"dgram") == b"udp:dgram"
        wait_for(lambda: "client closed" in log.read_text(), what="the second TCP end")
    assert stdout.read_text() == ""
    before, after = rotated.read_text().splitlines(), log.read_text().splitlines()
    for line in before + after:
        assert LINE.fullmatch(line), line
    assert any("[goma_pt#info] Forwarding tcp 127.0.0.1:" in line for line in before)
    assert any("[twisted.scripts._twistd_unix.UnixAppLogger#info] twistd " in x for x in before)
    prefix = f"tcp/udp 127.0.0.1:{port} 127.0.0.1:"
    ends = [line.split("] ", 1)[1] for line in before + after if "[goma_pt.tcp#info]" in line]
    assert [end.startswith(prefix) for end in ends] == [True, True]
    assert f"-> 127.0.0.1:{backend}: client closed; 6 bytes sent, 6 received, " in ends[1]
    assert re.search(r"received, \d+\.\d{3}s \(connect \d+\.\d{3}s\)$", ends[1])
    [udp_end] = [line.split("] ", 1)[1] for line in after if "[goma_pt.udp#info]" in line]
    assert udp_end.startswith(prefix)
    assert re.search(
        r": shutdown; 1 datagrams \(5 bytes\) sent, 1 \(9 bytes\) received, \d+\.\d{3}s$", udp_end
    )
    # Nothing lost at the stop: the last lines twistd logs are there.
    assert after[-1].endswith("#info] Server Shut Down.")


class CountingFile(io.StringIO):
    """A text file that counts its writes and flushes."""

    writes = 0
    flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


class TurningReactor:
    """What a GatheringFileLogObserver needs of a reactor."""

    def __init__(self) -> None:
        self.running = True
        self.beforeWait: list[Any] = []

    def turn(self) -> None:
        for call in self.beforeWait:
            call()


@pytest.fixture
def io_thread() -> Iterator[None]:
    """This thread as the reactor's, as reactor.run makes it."""
    before = threadable.ioThread
    threadable.registerAsIOThread()
    try:
        yield
    finally:
        threadable.ioThread = before


def line_event(n: int) -> LogEvent:
    return emitted("line {n}", "goma_pt.udp", n=n) | {"log_time": 1795691109.0}


def test_the_lines_of_one_turn_are_written_together_before_the_wait(io_thread: None) -> None:
    out, reactor = CountingFile(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    for n in range(3):
        observer(line_event(n))
    assert out.getvalue() == "" and out.writes == 0
    reactor.turn()
    assert out.getvalue() == "".join(classic_line(line_event(n)) or "" for n in range(3))
    assert (out.writes, out.flushes) == (1, 1)
    reactor.turn()  # nothing new: no write
    assert (out.writes, out.flushes) == (1, 1)


def test_lines_logged_while_the_reactor_is_not_running_are_written_at_once(
    io_thread: None,
) -> None:
    out, reactor = CountingFile(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    observer(line_event(1))
    reactor.running = False  # stopped: "Main loop terminated.", "Server Shut Down."
    observer(line_event(2))
    assert out.getvalue() == (classic_line(line_event(1)) or "") + (
        classic_line(line_event(2)) or ""
    )


def test_lines_from_another_thread_are_written_at_once(io_thread: None) -> None:
    out, reactor = CountingFile(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    observer(line_event(1))
    thread = threading.Thread(target=observer, args=(line_event(2),))
    thread.start()
    thread.join()
    assert out.getvalue() == classic_line(line_event(2))
    reactor.turn()
    assert out.getvalue() == "".join(classic_line(line_event(n)) or "" for n in (2, 1))


def test_gathered_lines_are_written_at_the_bound_and_to_binary_files(io_thread: None) -> None:
    out, reactor = io.BytesIO(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    bound = GatheringFileLogObserver.MAX_GATHERED
    for n in range(bound + 1):
        observer(line_event(n) | {"n": "\u2603"})
    assert out.getvalue().count(b"\n") == bound
    reactor.turn()
    assert out.getvalue().decode("utf-8").count("line \u2603") == bound + 1


def test_goma_pts_reactor_calls_its_before_wait_hooks_at_each_poll() -> None:
    from goma_twisted.accel.reactor import EPollReactor

    reactor = EPollReactor()
    try:
        calls: list[int] = []
        reactor.beforeWait.append(lambda: calls.append(len(calls)))
        reactor.doPoll(0)
        reactor.doPoll(0)
        assert calls == [0, 1]
    finally:
        reactor._poller.close()


def test_twistd_on_goma_pts_reactor_gathers_its_lines(tmp_path: Path) -> None:
    from goma_twisted.accel.reactor import EPollReactor

    reactor = EPollReactor()
    try:
        options = _server_options(tmp_path, "-n", "--logfile", str(tmp_path / "goma.log"))
        made = text_log(options, reactor=reactor)
        assert made is not None and made.file is not None
        made.file.close()
        assert isinstance(_inner(made.observer), GatheringFileLogObserver)
        assert reactor.beforeWait == [_inner(made.observer).writeGathered]
    finally:
        reactor._poller.close()
    # Twisted's own reactor has no turn to gather a turn's lines in.
    made = text_log(options, reactor=object())
    assert made is not None and made.file is not None
    made.file.close()
    assert not isinstance(_inner(made.observer), GatheringFileLogObserver)


@pytest_twisted.ensureDeferred
async def test_the_parts_left_to_goma_gateway_are_named_plainly() -> None:
    config = parse_config(
        "version: 2\ngateway:\n  routes: []\n  entryPoints:\n    web: {address: ':80'}\n"
        "    passThrough:\n      forwards:\n"
        f"        - {{protocol: tcp, port: {free_port()}, address: 127.0.0.1, "
        "target: '127.0.0.1:1'}\n",
        "goma.yml",
    )
    service = PassThroughService(config, drain_timeout=0)
    with captured_logs() as logs:
        service.startService()
    await service.stopService()
    [said] = [e for e in logs.events if "ignored" in e]
    assert event_text(said) == (
        "goma.yml: goma-pt acts on gateway.entryPoints.passThrough only; left to Goma "
        "Gateway: version, gateway.routes, gateway.entryPoints.web"
    )


def test_event_logger_makes_twisteds_event() -> None:
    from twisted.logger import Logger, LogLevel

    from goma_twisted.logs import EventLogger

    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    EventLogger(namespace="goma_pt.x", observer=cast(Any, ours.append)).info("{a} b", a=1)
    Logger(namespace="goma_pt.x", observer=cast(Any, theirs.append)).info("{a} b", a=1)
    [event], [expected] = ours, theirs
    assert event.keys() == expected.keys()
    for key in ("a", "log_level", "log_namespace", "log_source", "log_format"):
        assert event[key] == expected[key]
    assert event["log_level"] is LogLevel.info
    # Not a level: Twisted's emit reports it, as for its own Logger.
    loud = EventLogger(namespace="goma_pt.x", observer=cast(Any, ours.append))
    loud.emit(cast(Any, "loud"), "x")
    assert "invalid log level" in ours[-1]["log_format"]


def test_info_event_is_infos_event_from_a_dict_of_fields() -> None:
    from twisted.logger import Logger, LogLevel

    from goma_twisted.logs import EventLogger

    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    logger = EventLogger(namespace="goma_pt.x", observer=cast(Any, ours.append))
    fields: dict[str, Any] = {"a": 1, "b": None}
    logger.infoEvent("{a} b", fields)
    Logger(namespace="goma_pt.x", observer=cast(Any, theirs.append)).info("{a} b", a=1, b=None)
    [event], [expected] = ours, theirs
    assert event is fields  # handed over, not copied
    assert list(event) == list(expected)
    for key in ("a", "b", "log_level", "log_namespace", "log_source", "log_format"):
        assert event[key] == expected[key]
    assert event["log_level"] is LogLevel.info
    assert event["log_logger"] is logger
    assert classic_line(event | {"log_time": 1.0}) == classic_line(expected | {"log_time": 1.0})


class FailingFile(io.StringIO):
    """A text file whose writes fail while C{error} is set."""

    error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is not None:
            raise self.error
        return super().write(text)


def test_lines_that_cannot_be_written_are_counted_and_reported_once_writing_works(
    io_thread: None,
) -> None:
    out, reactor = FailingFile(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    out.error = OSError(28, "No space left on device")
    for n in range(3):
        observer(line_event(n))
    reactor.turn()  # does not raise
    observer(line_event(3))
    reactor.turn()
    assert out.getvalue() == ""
    out.error = None
    observer(line_event(4))
    reactor.turn()
    # A line of its own: the write that failed may have left part of a line.
    empty, notice, line = out.getvalue().splitlines(keepends=True)
    assert empty == "\n"
    assert "[goma_pt.log#warn] 4 log lines could not be written since " in notice
    assert notice.endswith("([Errno 28] No space left on device); some may be missing above\n")
    assert line == classic_line(line_event(4))
    observer(line_event(5))
    reactor.turn()  # said once
    assert out.getvalue().count("could not be written") == 1


class FillingFile(io.StringIO):
    """A text file on a disk that fills up: the write that fails takes some of its bytes."""

    room = 1 << 30

    def write(self, text: str) -> int:
        if len(text) > self.room:
            super().write(text[: self.room])
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(text)
        return super().write(text)


def test_the_notice_after_a_full_disk_starts_a_line_of_its_own(io_thread: None) -> None:
    out, reactor = FillingFile(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    first = classic_line(line_event(1)) or ""
    out.room = len(first) + 10  # the second line is cut after 10 characters
    for n in (1, 2, 3):
        observer(line_event(n))
    reactor.turn()
    out.room = 1 << 30  # room again
    observer(line_event(4))
    reactor.turn()
    lines = out.getvalue().splitlines(keepends=True)
    assert lines[0] == first
    assert lines[1] == (classic_line(line_event(2)) or "")[:10] + "\n"
    [notice] = [line for line in lines if "could not be written" in line]
    assert re.match(r"\d{4}-\d\d-\d\dT.* \[goma_pt.log#warn\] 3 log lines could", notice)
    assert lines[-1] == classic_line(line_event(4))


def test_a_closed_log_file_does_not_raise_at_each_turn(io_thread: None) -> None:
    out, reactor = io.StringIO(), TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    out.close()
    observer(line_event(1))
    reactor.turn()
    reactor.running = False
    observer(line_event(2))  # written at once: fails the same quiet way
    assert observer._unwritten == 2


@pytest.mark.parametrize(
    "format",
    [
        UDP_FORMAT,
        "",
        "plain text, no fields",
        "{a}",
        "{{a}} {a} {{",
        "{a!r} {a!s} {a!a} quotes ' \" and \\ backslash",
        "{n:>8} {n:08.3f} {n:+,} {n:#x} {n:%} {a:*^9}",
        "{a.real}",
        "{b[0]}",
        "{a:{n}}",
        "{}",
        "{0}",
        "{missing}",
        "{a!x}",
        "unbalanced }",
        "unbalanced {",
        "{class} {_x}",
    ],
)
def test_render_is_format_map(format: str) -> None:
    event: dict[str, Any] = {"a": "é'x\"", "b": [1], "n": 12.5, "class": 1, "_x": None}
    event |= {"log_format": format} | {k: v for k, v in END.items() if k not in event}
    event |= {"datagramsToTarget": 1, "datagramsToClient": 2}
    try:
        expected: Any = format.format_map(event)
    except Exception as e:
        expected = type(e)
    # Twice: the first makes the function, the second uses it remembered.
    for _ in range(2):
        try:
            got: Any = render(event)
        except Exception as e:
            got = type(e)
        assert got == expected


def test_render_remembers_a_bounded_number_of_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    from goma_twisted import logs

    monkeypatch.setattr(logs, "_renderers", {})
    monkeypatch.setattr(logs, "MAX_RENDERERS", 2)
    compiled: list[str] = []

    def compile_nothing(format: str) -> None:
        compiled.append(format)

    monkeypatch.setattr(logs, "_compiled", compile_nothing)
    for n in range(5):
        assert render({"log_format": f"{n} {{a}}", "a": "x"}) == f"{n} x"
    assert list(logs._renderers) == ["0 {a}", "1 {a}"]
    # Past the bound, formats are rendered by format_map, not compiled.
    assert compiled == ["0 {a}", "1 {a}"]
    # Not a string: format_map's error, as before.
    with pytest.raises(AttributeError):
        render({"log_format": None})


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_a_line_the_file_cannot_encode_is_written_escaped_with_its_turn(
    io_thread: None, binary: bool
) -> None:
    raw = io.BytesIO()
    out: Any = raw if binary else io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    reactor = TurningReactor()
    observer = GatheringFileLogObserver(out, classic_line, reactor)
    observer(line_event(1))
    observer(emitted("name {name}", "goma_pt.tcp", name="caf\xe9-\udcff") | {"log_time": 0.0})
    observer(line_event(3))
    reactor.turn()
    written = raw.getvalue().decode("ascii").splitlines()
    assert len(written) == 3
    assert written[0].endswith("line 1") and written[2].endswith("line 3")
    assert written[1].endswith("name caf\\xe9-\\udcff")
    assert observer._unwritten == 0


def test_the_json_log_counts_what_it_cannot_write_and_says_so_in_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "goma.jsonl"
    monkeypatch.setattr(signal, "getsignal", lambda signum: object())  # no SIGUSR1 handler
    monkeypatch.setenv(ENVIRONMENT, str(path))
    observer = json_observer()
    observer(line_event(1))
    real = _inner(observer)._out._file
    real.close()  # as a disk gone: every write fails (ValueError), none raises
    observer(line_event(2))
    observer(line_event(3))
    _inner(observer)._out.reopen()
    observer(line_event(4))
    _inner(observer)._out._file.close()
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    assert [r.get("n") for r in records] == [1, None, 4]
    assert records[1]["lines"] == 2
    assert records[1]["log_level"]["name"] == "warn"
    assert "could not be written" in records[1]["log_text"]
