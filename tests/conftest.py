from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs; tests pass it in like production code does."""
    from twisted.internet import reactor

    return reactor
