"""What an operator is shown of a config: the forwards it opens, as a table."""

from __future__ import annotations

from .config import Forward, GatewayConfig, format_address

_HEADINGS = (
    "protocol",
    "listen",
    "target",
    "connect",
    "idle",
    "keepalive",
    "udp idle",
    "max sessions",
)
# Shown only when a forward sets it: most files leave it to the system.
_BACKLOG = "backlog"


def forwards_table(config: GatewayConfig) -> str:
    """One row per forward: where it listens, where it sends, its timeouts."""
    backlog = any(forward.backlog is not None for forward in config.forwards)
    headings = (*_HEADINGS, _BACKLOG) if backlog else _HEADINGS
    rows = [headings, *(_row(forward, backlog) for forward in config.forwards)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headings))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _row(forward: Forward, backlog: bool) -> tuple[str, ...]:
    tcp, udp = "tcp" in forward.protocols, "udp" in forward.protocols
    row = (
        forward.protocol,
        format_address(forward.address or "*", forward.port),
        str(forward.target),
        _seconds(forward.connect_timeout) if tcp else "-",
        _seconds(forward.idle_timeout) if tcp else "-",
        _keepalive(forward.keepalive) if tcp else "-",
        _seconds(forward.udp_idle_timeout) if udp else "-",
        (str(forward.max_sessions) if forward.max_sessions else "auto") if udp else "-",
    )
    if not backlog:
        return row
    return (*row, (str(forward.backlog) if forward.backlog else "system") if tcp else "-")


def _seconds(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:g}s"


def _keepalive(value: float | None) -> str:
    return "off" if value is None else _seconds(value)
