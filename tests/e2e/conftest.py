"""Fixtures of the end-to-end suite: process bookkeeping, goma-pt, and the route a
client takes to a peer (straight, or through goma-pt).

Each test runs its clients twice: `direct` to the peer, then through a goma-pt
forward. The direct run is the control: when only the goma-pt run fails, the
forwarder is at fault, not the peer or the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..support import twistd_command, twistd_env, write_config
from . import procs
from .goma import CLEAN, READY, GomaPt, Route, forward
from .procs import STARTED, Launcher, Proc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the log of every process the test started to a failing report."""
    report = yield
    if report.failed:
        for proc in item.stash.get(STARTED, []):
            report.sections.append((f"log of {proc.name} ({proc.log})", proc.tail(200)))
    return report


@pytest.fixture
def launcher(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    la = Launcher(tmp_path, request.node)
    try:
        yield la
    finally:
        la.stop_all()


@pytest.fixture
def goma_pt(launcher: Launcher, tmp_path: Path) -> Iterator[GomaPt]:
    """Factory: goma_pt(forward(...), ...) writes a config, starts twistd goma-pt
    and returns once it logs that every forward listens.

    At teardown each instance still running gets SIGTERM and must stop by itself,
    cleanly (see CLEAN).
    """
    mine: list[Proc] = []

    def start(*forwards: dict[str, Any]) -> Proc:
        cfg = write_config(tmp_path / f"goma-pt-{len(mine)}.yml", list(forwards))
        # A short drain: a test's last client may still be connected at
        # teardown, and the stop must finish well inside procs.stop's wait.
        argv = twistd_command(
            "-n", "--pidfile=", "--logfile=-", "goma-pt", "--config", str(cfg), "--drain=1"
        )  # fmt: skip
        proc = launcher.start("goma-pt", argv, env=twistd_env(), cwd=tmp_path)
        mine.append(proc)
        procs.wait_for_log(proc, READY, timeout=10)
        return proc

    try:
        yield start
    finally:
        # Only those still up: one that died early has already failed its test.
        bad = [(p, rc) for p in mine if p.running and (rc := procs.stop(p)) not in CLEAN]
    assert not bad, "goma-pt did not stop cleanly on SIGTERM:\n" + "\n".join(
        f"exit {rc}\n{p.tail()}" for p, rc in bad
    )


@pytest.fixture(params=["direct", "goma-pt"])
def route(request: pytest.FixtureRequest, goma_pt: GomaPt) -> Route:
    """`direct` dials the peer; `goma-pt` puts one forward in front of it, listening
    on the same loopback address (so ::1 stays IPv6 end to end)."""

    def direct(protocol: str, host: str, port: int, **options: Any) -> tuple[str, int]:
        return host, port

    def forwarded(protocol: str, host: str, port: int, **options: Any) -> tuple[str, int]:
        listen = procs.free_port(protocol, [host])
        goma_pt(forward(protocol, listen, host, port, address=host, **options))
        return host, listen

    return direct if request.param == "direct" else forwarded
