"""goma-pt as the e2e tests see it: forwards to configure, the ready line, a clean stop."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, Protocol

from .procs import Proc, bracket

READY = "goma-pt ready"
# A clean stop on SIGTERM: exit 0, or death by that same SIGTERM, which stock
# twistd re-raises on purpose once it has shut down (twisted.application.app),
# and which systemd counts as a clean stop too.
CLEAN = (0, -signal.SIGTERM)


def forward(
    protocol: str,
    port: int,
    target_host: str,
    target_port: int,
    *,
    address: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One entry of `passThrough.forwards`; `extra` holds timeout and the like."""
    entry: dict[str, Any] = {
        "protocol": protocol,
        "port": port,
        "target": f"{bracket(target_host)}:{target_port}",
    }
    if address is not None:
        entry["address"] = address
    entry.update(extra)
    return entry


# goma_pt(forward(...), ...) -> the running goma-pt
GomaPt = Callable[..., Proc]


class Route(Protocol):
    """How a client reaches a peer listening on host:port; returns where to dial."""

    def __call__(self, protocol: str, host: str, port: int, **options: Any) -> tuple[str, int]: ...
