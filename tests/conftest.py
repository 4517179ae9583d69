from __future__ import annotations

import os
import shutil
from typing import Any

import pytest


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs; tests pass it in like production code does."""
    from twisted.internet import reactor

    return reactor


def require_binary(name: str) -> str:
    """
    The path of a real peer program. With CI set a missing one fails the
    test: CI installs every peer, so a skip there would hide a broken set-up.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed (bash .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
