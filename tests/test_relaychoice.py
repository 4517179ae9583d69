"""Which TCP relay runs, and why: --relay, PassThroughService(relay=), $GOMA_PT_RELAY."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from goma_twisted import accel
from goma_twisted.relaychoice import (
    RelayKind,
    RelayUnavailableError,
    choose_relay,
    default_mode,
)
from goma_twisted.tap import Options
from goma_twisted.tcpfactory import TCPForwardFactory

from .support import ROOT


@pytest.fixture
def untested(monkeypatch: pytest.MonkeyPatch) -> None:
    """The running Twisted is none the accelerations were tested with."""
    monkeypatch.setattr(accel, "TESTED_TWISTED", ("1.0",))


def test_plain_is_plain_whatever_the_version(untested: None) -> None:
    choice = choose_relay("plain")
    assert (choice.kind, choice.describe()) == (RelayKind.PLAIN, "plain: asked for")
    assert choice.factoryClass is TCPForwardFactory and choice.listen is None


def test_auto_takes_the_accelerated_relay_where_it_was_tested(reactor: Any) -> None:
    choice = choose_relay("auto", reactor)
    assert choice.kind is RelayKind.ACCELERATED
    assert choice.describe() == f"accelerated (Twisted {accel.twisted_release()})"


def test_auto_on_an_untested_twisted_says_why_it_runs_plain(untested: None) -> None:
    choice = choose_relay("auto")
    assert choice.kind is RelayKind.PLAIN
    release = accel.twisted_release()
    assert choice.describe() == (
        f"plain: Twisted {release} is not one the accelerations were tested with"
    )


def test_accelerated_on_an_untested_twisted_is_an_error_naming_why(untested: None) -> None:
    with pytest.raises(RelayUnavailableError, match="not one the accelerations were tested"):
        choose_relay("accelerated")


def test_a_reactor_the_transports_cannot_run_on_gets_the_plain_relay() -> None:
    choice = choose_relay("auto", MemoryReactorClock())
    assert choice.kind is RelayKind.PLAIN
    assert "MemoryReactorClock" in choice.why


def test_the_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMA_PT_RELAY", "plain")
    assert default_mode() == "plain"
    assert choose_relay().kind is RelayKind.PLAIN
    monkeypatch.setenv("GOMA_PT_RELAY", "fast")
    with pytest.raises(RelayUnavailableError, match="GOMA_PT_RELAY"):
        choose_relay()
    monkeypatch.delenv("GOMA_PT_RELAY")
    assert default_mode() == "auto"


def test_twistd_relay_accelerated_on_an_untested_twisted_exits_with_the_reason(
    untested: None,
) -> None:
    options = Options()
    config = str(ROOT / "etc" / "goma-pt.yaml")
    with pytest.raises(SystemExit) as stopped:
        options.parseOptions(["--config", config, "--relay", "accelerated"])
    assert "not one the accelerations were tested with" in str(stopped.value.code)


def test_a_plain_service_imports_nothing_of_the_accelerations() -> None:
    script = (
        "import sys\n"
        "from goma_twisted import PassThroughService, load_config\n"
        f"service = PassThroughService(load_config({str(ROOT / 'etc' / 'goma-pt.yaml')!r}),"
        " relay='plain')\n"
        "assert service.relay.kind.value == 'plain'\n"
        "print(sorted(m for m in sys.modules if m.startswith('goma_twisted.accel')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]"
