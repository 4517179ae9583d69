"""
The process's file descriptors: its limit raised to the hard one, and
shared among the forwards as the default bounds on their connections and
sessions (L{goma_twisted.policy.plan_budget}), said in the log.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from twisted.logger import Logger

from .policy import Budget, plan_budget, reserved_fds

log = Logger(namespace="goma_pt")


def size_bounds(listeners: list[Any], budget: Budget | None, splicing: bool) -> Budget:
    """
    Raise the descriptor limit, then give each forward of C{listeners}
    without a configured bound its share of it; log the figures. A reload
    passes the C{budget} made at start: the limit is shared again among the
    forwards it leaves, counting the descriptors open at start, not the
    live connections', which their bounds already count.
    """
    soft_before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = raise_fd_limit()
    in_use = budget.in_use if budget is not None else open_fd_count()
    tcp = [lst for lst in listeners if lst.protocol == "tcp"]
    udp = [lst for lst in listeners if lst.protocol == "udp"]
    budget = plan_budget(
        limit,
        in_use,
        [lst.forward.max_connections for lst in tcp],
        [lst.forward.max_sessions for lst in udp],
        reserved_fds(splicing=splicing),
    )
    for listener, (bound, _) in zip(tcp, budget.tcp):
        listener.factory.bounds.total = bound
    for udp_listener, (bound, _) in zip(udp, budget.udp):
        udp_listener.relay.max_sessions = bound
    shares = [
        f"{lst.forward.name} {bound} connections" + (" (derived)" if derived else "")
        for lst, (bound, derived) in zip(tcp, budget.tcp)
    ] + [
        f"{lst.forward.name} {bound} sessions" + (" (derived)" if derived else "")
        for lst, (bound, derived) in zip(udp, budget.udp)
    ]
    raised = f" (raised from {soft_before})" if soft_before != limit else ""
    log.info(
        "File descriptors: limit {limit}{raised}, {inUse} open, {reserved} kept aside; "
        "bounds: {shares}",
        limit=limit,
        raised=raised,
        softBefore=soft_before,
        inUse=budget.in_use,
        reserved=budget.reserved,
        shares="; ".join(shares) or "none",
        needed=budget.needed,
    )
    if budget.overcommitted:
        log.warn(
            "The configured bounds need {needed} file descriptors with every connection "
            "and session open, more than the {usable} available: raise the limit "
            "(ulimit -n, systemd LimitNOFILE=) or lower maxConnections/maxSessions",
            needed=budget.needed,
            usable=budget.usable,
        )
    return budget


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def open_fd_count() -> int:
    """How many file descriptors the process has open now (0 if it cannot tell)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory))
        except OSError:
            continue
    return 0
