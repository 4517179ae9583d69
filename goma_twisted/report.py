"""What an operator is shown of a config: the forwards it opens, as a table."""

from __future__ import annotations

from .config import Forward, GatewayConfig, format_address

_HEADINGS = ("protocol", "listen", "target", "connect", "idle", "udp idle", "max sessions")


def forwards_table(config: GatewayConfig) -> str:
    """One row per forward: where it listens, where it sends, its timeouts."""
    rows = [_HEADINGS, *(_row(forward) for forward in config.forwards)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADINGS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _row(forward: Forward) -> tuple[str, ...]:
    tcp, udp = "tcp" in forward.protocols, "udp" in forward.protocols
    return (
        forward.protocol,
        format_address(forward.address or "*", forward.port),
        str(forward.target),
        _seconds(forward.connect_timeout) if tcp else "-",
        _seconds(forward.idle_timeout) if tcp else "-",
        _seconds(forward.udp_idle_timeout) if udp else "-",
        (str(forward.max_sessions) if forward.max_sessions else "auto") if udp else "-",
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:g}s"
