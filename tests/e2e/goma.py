"""Build goma-pt's config and command line, the way an operator would write them."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from .procs import Proc, bracket

# The checkout under test; GOMA_PT_E2E_ROOT points the suite at another one.
REPO_ROOT = Path(os.environ.get("GOMA_PT_E2E_ROOT") or Path(__file__).resolve().parents[2])
READY = "goma-pt ready"
# A clean stop on SIGTERM: exit 0, or death by that same SIGTERM, which stock
# twistd re-raises on purpose once it has shut down (twisted.application.app),
# and which systemd counts as a clean stop too.
CLEAN = (0, -signal.SIGTERM)

# `python -m twisted` runs `twist`, not `twistd` (no -n, no --pidfile), so call
# twistd's entry point directly: this is the `twistd` an operator runs.
_TWISTD = "from twisted.scripts.twistd import run; run()"


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


def config_yaml(forwards: Sequence[dict[str, Any]]) -> str:
    """A Goma Gateway config holding only the passThrough entry point."""
    doc = {"gateway": {"entryPoints": {"passThrough": {"forwards": list(forwards)}}}}
    return yaml.safe_dump(doc, sort_keys=False)


def twistd_argv(config: Path) -> list[str]:
    """Foreground, no pid file, log to stdout: what the suite reads for readiness."""
    return [
        sys.executable,
        "-c",
        _TWISTD,
        "-n",
        "--pidfile=",
        "--logfile=-",
        "goma-pt",
        "--config",
        str(config),
    ]


# goma_pt(forward(...), ...) -> the running goma-pt
GomaPt = Callable[..., Proc]


class Route(Protocol):
    """How a client reaches a peer listening on host:port; returns where to dial."""

    def __call__(self, protocol: str, host: str, port: int, **options: Any) -> tuple[str, int]: ...
