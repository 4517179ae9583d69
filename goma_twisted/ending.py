"""
Why a relayed TCP connection or UDP session ended, and the one event that
reports each end: defined once here for every relay (plain and
accelerated, TCP and UDP), so that logs, metrics and tests read one list.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.python.failure import Failure

from .config import format_address
from .logs import EventLogger

# Why a TCP connection ended.
CLIENT_CLOSED = "client closed"
TARGET_CLOSED = "target closed"
CLIENT_RESET = "client reset"
TARGET_RESET = "target reset"
IDLE_TIMEOUT = "idle timeout"
CONNECT_TIMEOUT = "connect timeout"
CONNECT_REFUSED = "connect refused"
RESOLVE_FAILED = "resolve failed"
CONNECT_FAILED = "connect failed"
SHUTDOWN = "shutdown"

TCP_END_REASONS = (
    CLIENT_CLOSED, TARGET_CLOSED, CLIENT_RESET, TARGET_RESET, IDLE_TIMEOUT,
    CONNECT_TIMEOUT, CONNECT_REFUSED, RESOLVE_FAILED, CONNECT_FAILED, SHUTDOWN,
)  # fmt: skip
CONNECT_FAILURES = (CONNECT_REFUSED, CONNECT_TIMEOUT, RESOLVE_FAILED, CONNECT_FAILED)

# Why a UDP session ended (besides IDLE_TIMEOUT, RESOLVE_FAILED, SHUTDOWN):
# its answers came (udpResponses), or its socket failed; never answered,
# it was idle for the shorter unanswered timeout, or gave way to a new
# client in a full session table.
ANSWERED = "answered"
SOCKET_FAILED = "socket failed"
UNANSWERED = "unanswered"
EVICTED = "evicted"

UDP_END_REASONS = (
    IDLE_TIMEOUT, UNANSWERED, EVICTED, ANSWERED, RESOLVE_FAILED, SOCKET_FAILED, SHUTDOWN,
)  # fmt: skip


def connect_failure_reason(failure: Failure) -> str:
    """Name the way an upstream connection attempt failed."""
    if failure.check(error.ConnectionRefusedError):
        return CONNECT_REFUSED
    if failure.check(error.TimeoutError, error.TCPTimedOutError):
        return CONNECT_TIMEOUT
    if failure.check(error.DNSLookupError):
        return RESOLVE_FAILED
    return CONNECT_FAILED


def lost_reason(fromClient: bool, failure: Failure) -> str:
    """Why a connection ended when one side of it was lost."""
    if failure.check(error.ConnectionDone):
        return CLIENT_CLOSED if fromClient else TARGET_CLOSED
    return CLIENT_RESET if fromClient else TARGET_RESET


# The end events' text; their fields are what the formats name, plus
# proxiedBy, targetAddress, connectTime and detail.
TCP_ENDED_FORMAT = (
    "{forward} {client} -> {target}: {reason}; "
    "{bytesToTarget} bytes sent, {bytesToClient} received, {duration:.3f}s"
)
TCP_FAILED_FORMAT = "{forward} {client} -> {target}: {reason} ({detail}); {duration:.3f}s"
TCP_CONNECTED_FORMAT = TCP_ENDED_FORMAT + " (connect {connectTime:.3f}s)"
UDP_ENDED_FORMAT = (
    "{forward} {client} -> {target}: {reason}; {datagramsToTarget} datagrams "
    "({bytesToTarget} bytes) sent, {datagramsToClient} ({bytesToClient} bytes) "
    "received, {duration:.3f}s"
)

tcp_log = EventLogger(namespace="goma_pt.tcp")
udp_log = EventLogger(namespace="goma_pt.udp")


def client_text(host: str, port: int) -> str:
    """C{host:port} as the end events give a client."""
    # format_address's work is for IPv6 (and IPv4-mapped) hosts.
    return format_address(host, port) if ":" in host else f"{host}:{port}"


def log_tcp_end(fields: dict[str, Any]) -> None:
    """
    Report a TCP connection's end: C{fields} holds forward, client, target,
    targetAddress, proxiedBy, the byte counts, duration, connectTime,
    reason and detail (and becomes the event).
    """
    if fields["detail"]:
        text = TCP_FAILED_FORMAT
    elif fields["connectTime"] is None:
        text = TCP_ENDED_FORMAT
    else:
        text = TCP_CONNECTED_FORMAT
    tcp_log.infoEvent(text, fields)


def log_udp_end(fields: dict[str, Any]) -> None:
    """Report a UDP session's end (its fields as L{UDP_ENDED_FORMAT} names them)."""
    udp_log.infoEvent(UDP_ENDED_FORMAT, fields)
