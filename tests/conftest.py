from __future__ import annotations

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
