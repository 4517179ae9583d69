"""
Resolve a target hostname through the reactor's pluggable name resolver,
so that DNS changes take effect for each new connection or UDP session.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from zope.interface import implementer


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self, done: Deferred[list[str]], host: str) -> None:
        self.done = done
        self.host = host
        self.addresses: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IPv4Address | IPv6Address) -> None:  # type: ignore[override]
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if self.addresses:
            self.done.callback(self.addresses)
        else:
            self.done.errback(DNSLookupError(f"no address for {self.host}"))


def resolve_host(
    reactor: Any, host: str, port: int, semantics: str = "UDP"
) -> Deferred[list[str]]:
    """
    The IP addresses of C{host}, in the resolver's order of preference.

    @param semantics: C{"TCP"} or C{"UDP"}, passed to the resolver.
    @return: a Deferred that fails with L{DNSLookupError} when nothing resolves.
    """
    done: Deferred[list[str]] = Deferred()
    reactor.nameResolver.resolveHostName(
        _Collect(done, host), host, port, transportSemantics=semantics
    )
    return done
