from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from hypothesis import settings
from twisted.internet import protocol

from . import support

# No deadline per example: on these shared 2-core machines a first run can
# take 100x a later one, and a test asserts behaviour, never wall-clock time.
settings.register_profile("goma-pt", deadline=None)
settings.load_profile("goma-pt")

# GOMA_PT_RELAY=plain runs the whole suite on the plain relay, under
# Twisted's default reactor (what --relay plain and a .tac user get);
# otherwise on goma-pt's own epoll reactor, where the accelerated relay runs.
PLAIN = os.environ.get("GOMA_PT_RELAY") == "plain"


def _install_goma_reactor() -> None:
    """Run the tests on the reactor goma-pt runs on (its read fast path included)."""
    from goma_twisted.accel.reactor import EPollReactor, install

    pytest_twisted._install_reactor(reactor_installer=install, reactor_type=EPollReactor)


# pytest-twisted installs its "default" reactor at configure time, after
# this file is loaded: make that goma-pt's epoll reactor (where this
# pytest-twisted has the hook, else Twisted's default stays).
if not PLAIN and hasattr(pytest_twisted, "_install_reactor"):
    pytest_twisted.reactor_installers["default"] = _install_goma_reactor


# What only the accelerated relay has is not collected on the plain one.
collect_ignore_glob = ["test_accel_*.py"] if PLAIN else []


def pytest_report_header() -> str:
    from goma_twisted.relaychoice import choose_relay

    return f"goma-pt relay: {choose_relay().describe()}"


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs; tests pass it in like production code does."""
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def echo(reactor: Any) -> Any:
    port = support.listen_tcp(reactor, protocol.Factory.forProtocol(support.Echo))
    yield port
    port.stopListening()


@pytest.fixture
def services(reactor: Any) -> Any:
    started: list[Any] = []
    yield started
    for service in started:
        pytest_twisted.blockon(service.stopService())


@pytest.fixture(params=["plain"] if PLAIN else ["recv", "raw", "splice"])
def read_path(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """
    Relay on each way an accelerated side reads and sends: socket recv and
    send, the raw I/O PyPy uses (io.RawIO, through cffi), on either
    interpreter, and splice(2) through a pipe from the first read; the plain
    relay has one way (Twisted's).
    """
    if request.param == "plain":
        return "plain"
    from goma_twisted.accel import io

    if request.param == "raw":
        pytest.importorskip("cffi")
        monkeypatch.setattr(io, "RAW", io.RawIO())
    else:
        monkeypatch.setattr(io, "RAW", None)
    if request.param == "splice":
        if io.SPLICE is None:
            # Under CI (Linux, where goma-pt must find it) a missing splice
            # fails, as test_splice's do: these would otherwise copy.
            if os.environ.get("CI"):
                pytest.fail("goma-pt found no splice(2) here")
            pytest.skip("no splice(2) here")
        monkeypatch.setattr(io, "SPLICE_AFTER", 0)
    else:
        monkeypatch.setattr(io, "SPLICE_AFTER", None)
    return str(request.param)


@pytest.fixture(autouse=True)
def _splice_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With GOMA_TEST_SPLICE=1, every accelerated relay in this process splices
    from its first read (accel.io.SPLICE_AFTER = 0): the suite against that path.
    """
    if os.environ.get("GOMA_TEST_SPLICE") == "1":
        from goma_twisted.accel import io

        monkeypatch.setattr(io, "SPLICE_AFTER", 0)
