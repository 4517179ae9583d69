from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted


def _install_goma_reactor() -> None:
    """Run the tests on the reactor goma-pt runs on (its read fast path included)."""
    from goma_twisted.reactor import EPollReactor, install

    pytest_twisted._install_reactor(reactor_installer=install, reactor_type=EPollReactor)


# pytest-twisted installs its "default" reactor at configure time, after
# this file is loaded: make that goma-pt's epoll reactor (where this
# pytest-twisted has the hook, else Twisted's default stays).
if hasattr(pytest_twisted, "_install_reactor"):
    pytest_twisted.reactor_installers["default"] = _install_goma_reactor


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs; tests pass it in like production code does."""
    from twisted.internet import reactor

    return reactor


@pytest.fixture(autouse=True)
def _splice_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With GOMA_TEST_SPLICE=1, every relay in this process splices from its
    first read (tcp.SPLICE_AFTER = 0): the whole suite against that path.
    """
    if os.environ.get("GOMA_TEST_SPLICE") == "1":
        from goma_twisted import tcp

        monkeypatch.setattr(tcp, "SPLICE_AFTER", 0)
