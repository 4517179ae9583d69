"""
The PROXY header a trusted load balancer sends before its client's bytes
(C{acceptProxyProtocol}): read, bounded in time, and turned into the
client's real address before the relay admits it and connects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from . import policy
from .config import format_address
from .policy import ip_text, parse_ip
from .proxyprotocol import HeaderReader, ProxyHeaderError

if TYPE_CHECKING:
    from .tcp import Relay


class HeaderReading:
    """The PROXY header of one relay's client, while the relay is in its HEADER state."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.reader: HeaderReader | None = None
        self.timer: IDelayedCall | None = None
        # The client's bytes that came behind the header.
        self.early = b""

    def start(self, client: Any) -> None:
        """Read the header before anything else, within the connect timeout."""
        relay = self.relay
        self.reader = HeaderReader()
        timeout = relay.forward.connect_timeout
        self.timer = relay.clock.callLater(timeout, self._timedOut)

    def feed(self, data: bytes) -> None:
        relay = self.relay
        assert self.reader is not None and relay.client is not None
        try:
            result = self.reader.feed(data)
        except ProxyHeaderError as e:
            self.refuse(policy.BAD_HEADER, str(e))
            return
        if result is None:
            return
        self.stop()
        transport = relay.client.transport
        transport.pauseProducing()
        addresses, self.early = result
        peer = transport.getPeer()
        relay.proxiedBy = format_address(peer.host, peer.port)
        if addresses.source is not None and addresses.destination is not None:
            relay.clientHost, relay.clientPort = addresses.source
            relay.localHost, relay.localPort = addresses.destination
        host = relay.clientHost or peer.host
        why = relay.factory.admit(relay, parse_ip(host), ip_text(host))
        if why is not None:
            self.refuse(why)
            return
        relay.clientReady()

    def cut(self) -> None:
        """The load balancer closed before its header was complete."""
        relay = self.relay
        assert relay.client is not None
        if self.reader is not None and self.reader.buffer:
            self.refuse(policy.BAD_HEADER, "closed before the header was complete")
            return
        # A bare connect and close: a load balancer's health check.
        self.stop()
        relay.client.transport.loseConnection()

    def _timedOut(self) -> None:
        self.timer = None
        timeout = self.relay.forward.connect_timeout
        self.refuse(policy.BAD_HEADER, f"no header within {timeout:g}s")

    def refuse(self, refusal: str, detail: str = "") -> None:
        self.stop()
        self.relay.refuse(refusal, detail)

    def stop(self) -> None:
        """Read no more header (done, refused, or the client gone)."""
        self.reader = None
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def takeEarly(self) -> bytes:
        """The bytes that followed the header, once."""
        early, self.early = self.early, b""
        return early
