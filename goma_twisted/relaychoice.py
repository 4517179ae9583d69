"""
Which TCP relay runs: the plain one on Twisted's public API, or the
accelerated one (L{goma_twisted.accel}) where it was tested. Chosen once,
for the whole service, and said in the log at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum
from typing import Any

from attrs import frozen

import twisted

from .tcpfactory import TCPForwardFactory

RELAY_MODES = ("auto", "plain", "accelerated")
# The mode when none is given (C{--relay}, C{PassThroughService(relay=)}):
# this variable's, else auto. CI runs the whole suite with it set to plain.
ENVIRONMENT = "GOMA_PT_RELAY"


def default_mode() -> str:
    """The relay mode asked for when none is given."""
    return os.environ.get(ENVIRONMENT) or "auto"


class RelayKind(Enum):
    PLAIN = "plain"
    ACCELERATED = "accelerated"


class RelayUnavailableError(Exception):
    """The accelerated relay was asked for and cannot run; the message says why."""


@frozen
class RelayChoice:
    """
    The relay a service runs, why, and what it builds its TCP forwards with:
    the factory class, and C{listen(reactor, port, factory, backlog,
    interface)} and C{adopt(reactor, fd, family, factory)} for its ports
    (None: Twisted's own C{listenTCP} and C{adoptStreamPort}).
    """

    kind: RelayKind
    why: str
    factoryClass: type[TCPForwardFactory] = TCPForwardFactory
    listen: Callable[..., Any] | None = None
    adopt: Callable[..., Any] | None = None
    # Whether relays may open splice pipes (their descriptors are kept aside).
    splices: bool = False

    def describe(self) -> str:
        """The log's words: C{accelerated (Twisted 26.10)}, C{plain: why}."""
        if self.kind is RelayKind.ACCELERATED:
            return f"accelerated ({self.why})"
        return f"plain: {self.why}"


PLAIN = RelayChoice(RelayKind.PLAIN, "asked for")


def choose_relay(asked: str | None = None, reactor: Any = None) -> RelayChoice:
    """
    The relay for C{asked} (one of L{RELAY_MODES}) on C{reactor}: C{auto}
    takes the accelerated one where it may run, else the plain one;
    C{accelerated} raises L{RelayUnavailableError} where it may not; None
    is L{default_mode}.
    """
    if asked is None:
        asked = default_mode()
    if asked not in RELAY_MODES:
        raise RelayUnavailableError(
            f"relay {asked!r} is not one of {', '.join(RELAY_MODES)} (${ENVIRONMENT})"
        )
    if asked == "plain":
        return PLAIN
    try:
        from . import accel

        why = accel.unavailable(reactor)
    except ImportError as e:
        why = f"the accelerations cannot load ({e})"
    if why is not None:
        if asked == "accelerated":
            raise RelayUnavailableError(f"--relay accelerated: {why}")
        return RelayChoice(RelayKind.PLAIN, why)
    from .accel import io, port, relay

    return RelayChoice(
        RelayKind.ACCELERATED,
        f"Twisted {accel.twisted_release(twisted.__version__)}",
        relay.FastFactory,
        port.listen_tcp,
        port.adopt_tcp_port,
        io.splices(),
    )
