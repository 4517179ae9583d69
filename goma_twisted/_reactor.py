"""The reactor a component was given, or the global one, imported late."""

from __future__ import annotations

from typing import Any


def reactor_or_global(reactor: Any) -> Any:
    """
    Return C{reactor}, or the global reactor when it is None; importing it
    only here keeps the global reactor out of module import time.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor
