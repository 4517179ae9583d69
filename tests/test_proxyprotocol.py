"""
PROXY protocol headers without sockets: the specification's examples,
Twisted's parsers reading back what we write, and the reader fuzzed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from goma_twisted.proxyprotocol import (
    V2_MAX,
    V2_SIGNATURE,
    HeaderReader,
    ProxiedAddresses,
    ProxyHeaderError,
    encode,
    encode_v1,
    encode_v2,
)

# The specification (proxy-protocol.txt, 2.1 and 2.2).
SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
ALL_ONES_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def test_signature_is_the_specifications() -> None:
    assert V2_SIGNATURE == SIGNATURE


@pytest.mark.parametrize(
    ("source", "destination", "line"),
    [
        (
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ),
        # The specification's worst cases: 56 and 104 bytes.
        (
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ),
        (
            (ALL_ONES_V6, 65535),
            (ALL_ONES_V6, 65535),
            f"PROXY TCP6 {ALL_ONES_V6} {ALL_ONES_V6} 65535 65535\r\n".encode(),
        ),
        (("2001:db8::1", 4000), ("::1", 22), b"PROXY TCP6 2001:db8::1 ::1 4000 22\r\n"),
        # A dual-stack listener's IPv4 client is written as the IPv4 it is.
        (
            ("::ffff:192.0.2.1", 4000),
            ("::ffff:192.0.2.2", 22),
            b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 22\r\n",
        ),
        # Mixed families: IPv4-mapped IPv6, as the specification asks.
        (("192.0.2.1", 1), ("::1", 2), b"PROXY TCP6 ::ffff:c000:201 ::1 1 2\r\n"),
    ],
)
def test_v1_encoding(source: Any, destination: Any, line: bytes) -> None:
    assert encode_v1(source, destination) == line
    assert len(encode_v1(source, destination)) <= 107


def test_v1_worst_cases_have_the_specifications_lengths() -> None:
    v4 = encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    v6 = encode_v1((ALL_ONES_V6, 65535), (ALL_ONES_V6, 65535))
    assert (len(v4), len(v6)) == (56, 104)


def test_v2_ipv4_encoding() -> None:
    header = encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert header == (
        SIGNATURE
        + b"\x21"  # version 2, PROXY command
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 bytes of addresses
        + bytes([192, 168, 0, 1, 192, 168, 0, 11])
        + struct.pack("!HH", 56324, 443)
    )


def test_v2_ipv6_encoding() -> None:
    header = encode_v2(("2001:db8::1", 4000), ("::1", 22))
    assert header[12:16] == b"\x21\x21\x00\x24"  # PROXY, AF_INET6 STREAM, 36 bytes
    assert header[16:32] == ipaddress.ip_address("2001:db8::1").packed
    assert header[32:48] == ipaddress.ip_address("::1").packed
    assert header[48:] == struct.pack("!HH", 4000, 22)
    assert len(header) == 16 + 36


def test_encode_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        encode(1, ("example.com", 1), ("::1", 2))
    with pytest.raises(ValueError):
        encode(2, ("::1", 70000), ("::1", 2))
    with pytest.raises(ValueError):
        encode(3, ("::1", 1), ("::1", 2))


endpoints = st.tuples(st.ip_addresses(), st.integers(0, 65535))


def same_family(pair: Any) -> bool:
    return bool(pair[0][0].version == pair[1][0].version)


@given(st.tuples(endpoints, endpoints).filter(same_family))
def test_twisteds_parsers_read_back_what_we_write(pair: Any) -> None:
    (src, sport), (dst, dport) = pair
    source, destination = (str(src), sport), (str(dst), dport)
    v1 = V1Parser.parse(encode_v1(source, destination)[:-2])
    v2 = V2Parser.parse(encode_v2(source, destination))
    for info in (v1, v2):
        assert info.source is not None and info.destination is not None
        got_source = (ipaddress.ip_address(info.source.host), info.source.port)  # type: ignore[attr-defined]
        got_dest = (ipaddress.ip_address(info.destination.host), info.destination.port)  # type: ignore[attr-defined]
        expected_source = (src.ipv4_mapped or src if src.version == 6 else src, sport)
        expected_dest = (dst.ipv4_mapped or dst if dst.version == 6 else dst, dport)
        # Twisted gives mapped addresses back as IPv6 where we wrote IPv4.
        assert normal(got_source) == normal(expected_source)
        assert normal(got_dest) == normal(expected_dest)


def normal(endpoint: Any) -> Any:
    address, port = endpoint
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, port


def read_all(data: bytes, cuts: list[int]) -> tuple[ProxiedAddresses, bytes] | None:
    """Feed C{data} to a reader in pieces cut at C{cuts}; the result, if any."""
    reader = HeaderReader()
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    for index, piece in enumerate(pieces):
        result = reader.feed(piece)
        if result is not None:
            info, rest = result
            return info, rest + b"".join(pieces[index + 1 :])
    return None


@given(
    st.sampled_from([1, 2]),
    st.tuples(endpoints, endpoints),
    st.binary(max_size=200),
    st.data(),
)
def test_reader_gets_addresses_and_data_however_the_bytes_are_split(
    version: int, pair: Any, payload: bytes, data: Any
) -> None:
    (src, sport), (dst, dport) = pair
    stream = encode(version, (str(src), sport), (str(dst), dport)) + payload
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=8))))
    result = read_all(stream, cuts)
    assert result is not None
    info, rest = result
    assert rest == payload
    assert info.version == version
    assert info.source == (str(src.ipv4_mapped or src if src.version == 6 else src), sport)
    assert info.destination == (str(dst.ipv4_mapped or dst if dst.version == 6 else dst), dport)


@settings(max_examples=500)
@given(st.binary(max_size=300), st.data())
def test_reader_on_arbitrary_bytes_answers_or_refuses(stream: bytes, data: Any) -> None:
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(len(stream) - 1, 1)), max_size=5))))
    cuts = [c for c in cuts if c < len(stream)]
    try:
        result = read_all(stream, cuts)
    except ProxyHeaderError:
        return
    if result is not None:
        info, rest = result
        assert stream.endswith(rest)
        if info.source is not None:
            ipaddress.ip_address(info.source[0])
            assert 0 <= info.source[1] <= 65535


# Mutations of a valid header: each still a prefix of a real header,
# or one byte off, so the fuzzing reaches deep into both parsers.
@settings(max_examples=500)
@given(
    st.sampled_from(
        [
            encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)),
            encode_v1(("2001:db8::1", 1), ("::1", 2)),
            encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)),
            encode_v2(("2001:db8::1", 1), ("::1", 2)),
            b"PROXY UNKNOWN\r\n",
        ]
    ),
    st.integers(0, 60),
    st.integers(0, 255),
    st.binary(max_size=20),
)
def test_reader_on_damaged_headers_answers_or_refuses(
    header: bytes, position: int, value: int, tail: bytes
) -> None:
    damaged = bytearray(header + tail)
    damaged[position % len(damaged)] = value
    with contextlib.suppress(ProxyHeaderError):
        read_all(bytes(damaged), [])


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "does not start with a PROXY header"),
        (b"PROXY TCP4 999.0.0.1 192.0.2.2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 70000\r\n", "port 70000"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 x 2\r\n", "malformed version 1 header"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 extra\r\n", "malformed version 1 header"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n" + b"x" * 100, "no end of line"),
        (b"PROXY " + b"A" * 200, "no end of line in the first 107 bytes"),
        (b"PROXY TCP5 1 2 3 4\r\n", "malformed version 1 header"),
        (SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 2 header with version 1"),
        (SIGNATURE + b"\x23\x11\x00\x0c" + b"\x00" * 12, "malformed version 2 header"),
        (SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "malformed version 2 header"),
        (SIGNATURE + b"\x21\x14\x00\x0c" + b"\x00" * 12, "malformed version 2 header"),
        (SIGNATURE + b"\x21\x11\xff\xff", f"at most {V2_MAX} accepted"),
        (SIGNATURE[:5] + b"X", "does not start with a PROXY header"),
    ],
)
def test_malformed_headers_are_refused(stream: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        HeaderReader().feed(stream)


@pytest.mark.parametrize(
    "stream",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        SIGNATURE + b"\x20\x00\x00\x00",  # LOCAL: the balancer's own health check
        SIGNATURE + b"\x21\x00\x00\x00",  # PROXY, unspecified family
        SIGNATURE + b"\x21\x31\x00\xd8" + b"/tmp/a".ljust(216, b"\0"),  # a UNIX socket
    ],
)
def test_headers_without_addresses_leave_the_connections_own(stream: bytes) -> None:
    result = HeaderReader().feed(stream + b"data")
    assert result is not None
    info, rest = result
    assert (info.source, info.destination, rest) == (None, None, b"data")


def test_v2_tlvs_are_skipped() -> None:
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    tlv = b"\x05\x00\x03abc"  # PP2_TYPE_UNIQUE_ID
    length = struct.pack("!H", 12 + len(tlv))
    result = HeaderReader().feed(header[:14] + length + header[16:] + tlv + b"client data")
    assert result == (ProxiedAddresses(2, ("192.0.2.1", 1), ("192.0.2.2", 2)), b"client data")


def test_incomplete_headers_wait_for_more() -> None:
    reader = HeaderReader()
    assert reader.feed(b"PROXY TCP4 192.0.2.1") is None
    assert reader.feed(b" 192.0.2.2 1 2\r") is None
    assert reader.feed(b"\n") == (ProxiedAddresses(1, ("192.0.2.1", 1), ("192.0.2.2", 2)), b"")
    with pytest.raises(ProxyHeaderError):
        reader.feed(b"more")


# Version 2 headers with TLVs, built field by field: each test varies one.
IPV4_ADDRESSES = bytes([192, 0, 2, 1, 192, 0, 2, 2]) + struct.pack("!HH", 1, 2)
IPV6_ADDRESSES = (
    ipaddress.ip_address("2001:db8::1").packed
    + ipaddress.ip_address("::1").packed
    + struct.pack("!HH", 1, 2)
)
UNIQUE_ID = b"\x05\x00\x03abc"  # PP2_TYPE_UNIQUE_ID, 3 bytes


def tlv(kind: int = 0x05, value: bytes = b"abc", length: int | None = None) -> bytes:
    """One TLV; C{length} overrides the length field (for overruns)."""
    return struct.pack("!BH", kind, len(value) if length is None else length) + value


def v2_header(
    command: int = 0x21,
    family: int = 0x11,
    addresses: bytes = IPV4_ADDRESSES,
    tlvs: bytes = UNIQUE_ID,
    length: int | None = None,
) -> bytes:
    """A version 2 header; C{length} overrides the declared length."""
    body = addresses + tlvs
    declared = len(body) if length is None else length
    return SIGNATURE + struct.pack("!BBH", command, family, declared) + body


def test_v2_helper_builds_a_header_the_reader_accepts() -> None:
    assert HeaderReader().feed(v2_header() + b"data") == (
        ProxiedAddresses(2, ("192.0.2.1", 1), ("192.0.2.2", 2)),
        b"data",
    )


@pytest.mark.parametrize(
    "tlvs",
    [
        b"",
        UNIQUE_ID,
        UNIQUE_ID + tlv(0x04, b""),  # PP2_TYPE_NOOP, empty
        tlv(0x20, b"\x01" + b"\x00" * 4 + tlv(0x21, b"TLSv1.3")),  # PP2_TYPE_SSL, nested
    ],
)
def test_v2_tlvs_that_end_within_the_header_are_accepted(tlvs: bytes) -> None:
    result = HeaderReader().feed(v2_header(tlvs=tlvs) + b"data")
    assert result is not None
    assert result[1] == b"data"


@pytest.mark.parametrize(
    ("header", "why"),
    [
        # The TLV says 4 bytes of value; the header ends after 3.
        (v2_header(tlvs=tlv(length=4)), "runs past the header's declared length"),
        (v2_header(tlvs=tlv(length=0xFFFF)), "runs past the header's declared length"),
        # The second TLV overruns, the first is sound.
        (v2_header(tlvs=UNIQUE_ID + tlv(length=9)), "runs past the header's declared length"),
        # Two bytes left after the addresses: not even a TLV's head.
        (v2_header(tlvs=b"\x05\x00"), "ends inside a TLV"),
        (v2_header(tlvs=b"\x05"), "ends inside a TLV"),
        # The declared length cuts a sound TLV short.
        (v2_header(length=12 + 4), "runs past the header's declared length"),
        (v2_header(family=0x21, addresses=IPV6_ADDRESSES, tlvs=tlv(length=4)), "runs past"),
        (v2_header(family=0x12, tlvs=tlv(length=4)), "runs past"),  # UDP over IPv4
        (
            v2_header(family=0x31, addresses=b"/a".ljust(216, b"\0"), tlvs=tlv(length=4)),
            "runs past",
        ),
    ],
)
def test_v2_tlvs_that_overrun_are_refused(header: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        HeaderReader().feed(header + b"data")


def test_v2_local_command_discards_its_block_unread() -> None:
    # LOCAL: the specification has the receiver discard the block whole.
    result = HeaderReader().feed(v2_header(command=0x20, tlvs=tlv(length=4)) + b"data")
    assert result is not None
    assert (result[0].source, result[1]) == (None, b"data")


tlv_lists = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(lambda t: tlv(*t)),
    min_size=1,
    max_size=5,
)
address_blocks = st.sampled_from([(0x11, IPV4_ADDRESSES), (0x21, IPV6_ADDRESSES)])


@settings(max_examples=300)
@given(address_blocks, tlv_lists, st.data())
def test_v2_any_header_whose_tlvs_overrun_is_refused(
    block: Any, tlvs: list[bytes], data: Any
) -> None:
    family, addresses = block
    joined = b"".join(tlvs)
    # Declare a length that ends strictly inside one of the TLVs.
    bounds, offset = [], 0
    for one in tlvs:
        bounds.append((offset, offset + len(one)))
        offset += len(one)
    start, stop = data.draw(st.sampled_from(bounds))
    cut = data.draw(st.integers(start + 1, stop - 1))
    header = v2_header(family=family, addresses=addresses, tlvs=joined[:cut])
    with pytest.raises(ProxyHeaderError):
        read_all(header + joined[cut:], [])


@settings(max_examples=300)
@given(address_blocks, st.binary(max_size=60), st.binary(max_size=10))
def test_v2_arbitrary_tlv_bytes_are_accepted_only_when_they_fit(
    block: Any, tlvs: bytes, tail: bytes
) -> None:
    family, addresses = block
    fits, offset = True, 0
    while offset < len(tlvs):
        if offset + 3 > len(tlvs):
            fits = False
            break
        offset += 3 + struct.unpack_from("!H", tlvs, offset + 1)[0]
        fits = offset <= len(tlvs)
    try:
        result = HeaderReader().feed(
            v2_header(family=family, addresses=addresses, tlvs=tlvs) + tail
        )
    except ProxyHeaderError:
        assert not fits
    else:
        assert fits and result is not None and result[1] == tail
