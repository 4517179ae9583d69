"""
The PROXY protocol (HAProxy's, versions 1 and 2): bytes in, values out.

L{encode} writes the header goma-pt sends a target at the start of a
connection. L{HeaderReader} takes the header a trusted load balancer
sends at the start of one, however the bytes are split across reads, and
hands back the addresses and the client's bytes that followed it: it tells
the versions apart from the first byte, bounds the buffer, and refuses
whatever is not an address (C{TCP4 999.1.1.1}, a port of 70000) or runs
past the header's declared length.

Specification: https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import re
import struct

from attrs import frozen

from .policy import parse_ip

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The specification's bound on a version 1 line, CRLF included.
V1_MAX = 107
# Version 2 allows 65,535 bytes of addresses and TLVs; load balancers send
# well under a hundred (AWS, GCP and Azure's TLVs included). Bounded here
# so a trusted peer's bug cannot make each connection hold 64 KiB.
V2_MAX = 4096
# The address block's length for each version 2 family and protocol byte
# (TCP or UDP over IPv4, IPv6, UNIX); TLVs follow it up to the declared end.
_V2_ADDRESS_LENGTH = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
# A TLV: one byte of type, two of length, then the value.
_TLV_HEAD = 3

_V1_LINE = re.compile(
    rb"PROXY (?:UNKNOWN(?: [\x20-\x7e]*)?"
    rb"|TCP[46] [0-9a-fA-F.:]{2,45} [0-9a-fA-F.:]{2,45} [0-9]{1,5} [0-9]{1,5})"
)

Endpoint = tuple[str, int]


class ProxyHeaderError(Exception):
    """The bytes at the start of a connection are not a usable PROXY header."""


@frozen
class ProxiedAddresses:
    """
    What a PROXY header says: the client's address and the address it
    connected to, or None for both when the header carries none (a
    version 2 C{LOCAL} health check, C{UNKNOWN}, a UNIX socket): the
    connection's own addresses then stand, as the specification says.
    """

    version: int
    source: Endpoint | None
    destination: Endpoint | None


def _split(host: str) -> tuple[int, bytes]:
    address = parse_ip(host)
    if address is None:
        raise ValueError(f"{host!r} is not an IP address")
    return address.version, address.packed


def encode(version: int, source: Endpoint, destination: Endpoint) -> bytes:
    """The PROXY header (version 1 or 2) for a TCP connection."""
    if version == 1:
        return encode_v1(source, destination)
    if version == 2:
        return encode_v2(source, destination)
    raise ValueError(f"PROXY protocol version {version!r} is not 1 or 2")


def _same_family(source: Endpoint, destination: Endpoint) -> tuple[bytes, bytes, int]:
    """
    Both addresses packed, in one family: an IPv4 address next to an IPv6
    one is written as IPv4-mapped IPv6, as the specification asks.
    """
    (src_v, src), (dst_v, dst) = _split(source[0]), _split(destination[0])
    for port in (source[1], destination[1]):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not 0 to 65535")
    if src_v != dst_v:
        src = src if src_v == 6 else b"\0" * 10 + b"\xff\xff" + src
        dst = dst if dst_v == 6 else b"\0" * 10 + b"\xff\xff" + dst
        return src, dst, 6
    return src, dst, src_v


def encode_v1(source: Endpoint, destination: Endpoint) -> bytes:
    """C{PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\\r\\n}, or TCP6."""
    src, dst, version = _same_family(source, destination)
    text = [str(ipaddress.ip_address(a)) for a in (src, dst)]
    return f"PROXY TCP{version} {text[0]} {text[1]} {source[1]} {destination[1]}\r\n".encode(
        "ascii"
    )


def encode_v2(source: Endpoint, destination: Endpoint) -> bytes:
    """The binary header: signature, PROXY command, TCP over IPv4 or IPv6."""
    src, dst, version = _same_family(source, destination)
    family = 0x11 if version == 4 else 0x21
    body = src + dst + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


class HeaderReader:
    """
    Reads the PROXY header at the start of a stream, version 1 or 2.

    Feed it bytes as they arrive; L{feed} returns None until the header is
    complete, then the addresses and the bytes that followed the header
    (the client's own data, to be passed on intact). It raises
    L{ProxyHeaderError} as soon as the bytes cannot be a header, and never
    holds more than L{V2_MAX} bytes.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False

    def feed(self, data: bytes) -> tuple[ProxiedAddresses, bytes] | None:
        if self.done:
            raise ProxyHeaderError("the header was already read")
        self.buffer += data
        buffer = self.buffer
        if not buffer:
            return None
        if buffer[:1] == V2_SIGNATURE[:1]:
            result = self._v2(buffer)
        elif buffer[:1] == V1_PREFIX[:1]:
            result = self._v1(buffer)
        else:
            raise ProxyHeaderError("does not start with a PROXY header")
        if result is not None:
            self.done = True
            self.buffer = b""
        return result

    def _v1(self, buffer: bytes) -> tuple[ProxiedAddresses, bytes] | None:
        if not buffer.startswith(V1_PREFIX[: len(buffer)]):
            raise ProxyHeaderError("does not start with a PROXY header")
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise ProxyHeaderError(f"no end of line in the first {V1_MAX} bytes")
            return None
        line, rest = buffer[:end], buffer[end + 2 :]
        if end + 2 > V1_MAX or not _V1_LINE.fullmatch(line):
            raise ProxyHeaderError("malformed version 1 header")
        if line.startswith(b"PROXY UNKNOWN"):
            return ProxiedAddresses(1, None, None), rest
        _, protocol, source, destination, sport, dport = line.decode("ascii").split(" ")
        family = 4 if protocol == "TCP4" else 6
        ends = (_end(source, sport, family), _end(destination, dport, family))
        return ProxiedAddresses(1, *ends), rest

    def _v2(self, buffer: bytes) -> tuple[ProxiedAddresses, bytes] | None:
        if not buffer.startswith(V2_SIGNATURE[: len(buffer)]):
            raise ProxyHeaderError("does not start with a PROXY header")
        if len(buffer) < 16:
            return None
        if buffer[12] >> 4 != 2:
            raise ProxyHeaderError(f"version 2 header with version {buffer[12] >> 4}")
        size = 16 + struct.unpack("!H", buffer[14:16])[0]
        if size > V2_MAX:
            raise ProxyHeaderError(f"version 2 header of {size} bytes; at most {V2_MAX} accepted")
        if len(buffer) < size:
            return None
        _check_tlvs(buffer[:size])
        return _v2_addresses(buffer[:size]), buffer[size:]


def _check_tlvs(header: bytes) -> None:
    """
    Refuse a version 2 header whose TLVs run past its declared length.

    The TLVs follow the address block of a PROXY command over IPv4, IPv6
    or UNIX; each must end within the header. A LOCAL command or an
    unspecified family carries nothing the specification lets us read, so
    its block is discarded unread, as the specification says.
    """
    if header[12] & 0x0F != 0x01:
        return
    start = _V2_ADDRESS_LENGTH.get(header[13])
    if start is None:
        return
    offset, end = 16 + start, len(header)
    while offset < end:
        if offset + _TLV_HEAD > end:
            raise ProxyHeaderError("version 2 header ends inside a TLV")
        (length,) = struct.unpack_from("!H", header, offset + 1)
        offset += _TLV_HEAD + length
        if offset > end:
            raise ProxyHeaderError("version 2 TLV runs past the header's declared length")


def _v2_addresses(header: bytes) -> ProxiedAddresses:
    """The addresses of a whole version 2 header (its length checked)."""
    command, family, transport = header[12] & 0x0F, header[13] >> 4, header[13] & 0x0F
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"malformed version 2 header: command {command}")
    if family > 3 or transport > 2:
        raise ProxyHeaderError("malformed version 2 header: unknown address family or protocol")
    if command == 0x0 or family in (0x0, 0x3):
        # LOCAL (a health check), unspecified, or UNIX: no IP addresses.
        return ProxiedAddresses(2, None, None)
    size = 4 if family == 0x1 else 16
    if len(header) < 16 + 2 * size + 4:
        raise ProxyHeaderError("malformed version 2 header: too short for its addresses")
    source = _unmapped(header[16 : 16 + size])
    destination = _unmapped(header[16 + size : 16 + 2 * size])
    sport, dport = struct.unpack_from("!HH", header, 16 + 2 * size)
    return ProxiedAddresses(2, (source, sport), (destination, dport))


def _unmapped(packed: bytes) -> str:
    """An address as the relay names clients: an IPv4-mapped IPv6 one as IPv4."""
    return str(parse_ip(str(ipaddress.ip_address(packed))))


def _end(host: str, port: str, family: int) -> Endpoint:
    """A version 1 header's address and port, checked: an IPv4 or IPv6 one as it says."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    address = parse_ip(host)
    if literal is None or literal.version != family or address is None:
        raise ProxyHeaderError(f"{host!r} is not an IPv{family} address")
    number = int(port)
    if number > 65535 or (len(port) > 1 and port.startswith("0")):
        raise ProxyHeaderError(f"port {port} is not 0 to 65535")
    return str(address), number
