"""The PROXY header reader: byte tables, then properties (hypothesis).

Each table row is fed whole, one octet at a time, and with the SMTP
client's first octets after it; those must come back untouched.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.proxy import (
    NEED_MORE,
    V1_MAX_LENGTH,
    Command,
    Endpoint,
    Family,
    ProxyError,
    ProxyHeader,
    ProxyReader,
    encode_v1,
    encode_v2,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def read(data: bytes) -> ProxyHeader:
    result = ProxyReader().receive_data(data)
    assert isinstance(result, ProxyHeader), result
    return result


def read_by_octet(data: bytes) -> ProxyHeader:
    reader = ProxyReader()
    for i in range(len(data) - 1):
        assert reader.receive_data(data[i : i + 1]) is NEED_MORE, data[: i + 1]
    result = reader.receive_data(data[-1:])
    assert isinstance(result, ProxyHeader)
    return result


def refused(data: bytes) -> str:
    with pytest.raises(ProxyError) as caught:
        ProxyReader().receive_data(data)
    return caught.value.reason


GOOD = [
    (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n",
        ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.INET,
            source=Endpoint(V4("192.0.2.7"), 56324),
            destination=Endpoint(V4("198.51.100.1"), 25),
        ),
    ),
    (
        b"PROXY TCP6 2001:db8::7 2001:DB8:0:0:0:0:0:1 0 65535\r\n",
        ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.INET6,
            source=Endpoint(V6("2001:db8::7"), 0),
            destination=Endpoint(V6("2001:db8::1"), 65535),
        ),
    ),
    (
        b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n",
        ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.INET6,
            source=Endpoint(V6("::ffff:192.0.2.7"), 1),
            destination=Endpoint(V6("::1"), 2),
        ),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(version=1, command=Command.PROXY, family=Family.UNSPEC)),
    (  # "the receiver must ignore anything presented before the CRLF"
        b"PROXY UNKNOWN ffff:ffff::ffff ffff:: 65535 65535\r\n",
        ProxyHeader(version=1, command=Command.PROXY, family=Family.UNSPEC),
    ),
    (
        SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 198, 51, 100, 1]) + b"\xdb\xfc\x00\x19",
        ProxyHeader(
            version=2,
            command=Command.PROXY,
            family=Family.INET,
            source=Endpoint(V4("192.0.2.7"), 56316),
            destination=Endpoint(V4("198.51.100.1"), 25),
        ),
    ),
    (  # TLVs after the addresses: ALPN "smtp" and a NOOP of two octets
        SIG
        + b"\x21\x21\x00\x30"
        + V6("2001:db8::7").packed
        + V6("2001:db8::1").packed
        + b"\x00\x01\x00\x19"
        + b"\x01\x00\x04smtp\x04\x00\x02\x00\x00",
        ProxyHeader(
            version=2,
            command=Command.PROXY,
            family=Family.INET6,
            source=Endpoint(V6("2001:db8::7"), 1),
            destination=Endpoint(V6("2001:db8::1"), 25),
            tlvs=((1, b"smtp"), (4, b"\x00\x00")),
        ),
    ),
    # LOCAL (a health check): the block is skipped, whatever it holds.
    (
        SIG + b"\x20\x00\x00\x00",
        ProxyHeader(version=2, command=Command.LOCAL, family=Family.UNSPEC),
    ),
    (
        SIG + b"\x20\x11\x00\x0c" + bytes(12),
        ProxyHeader(version=2, command=Command.LOCAL, family=Family.UNSPEC),
    ),
    # PROXY over UNSPEC, AF_UNIX or UDP: "falls back to the UNSPEC mode".
    (
        SIG + b"\x21\x00\x00\x00",
        ProxyHeader(version=2, command=Command.PROXY, family=Family.UNSPEC),
    ),
    (
        SIG + b"\x21\x31\x00\xd8" + bytes(216),
        ProxyHeader(version=2, command=Command.PROXY, family=Family.UNSPEC),
    ),
    (
        SIG + b"\x21\x12\x00\x0c" + bytes(12),
        ProxyHeader(version=2, command=Command.PROXY, family=Family.INET),
    ),
]


@pytest.mark.parametrize(("data", "header"), GOOD)
def test_good_headers_whole_by_octet_and_with_what_follows(
    data: bytes, header: ProxyHeader
) -> None:
    assert read(data) == header
    assert read_by_octet(data) == header
    after = b"EHLO client.example\r\n"
    assert read(data + after).rest == after
    reader = ProxyReader()
    assert reader.receive_data(data[:-1]) is NEED_MORE
    result = reader.receive_data(data[-1:] + after)
    assert isinstance(result, ProxyHeader) and result.rest == after
    assert result.relayed == (header.source is not None)


BAD = [
    (b"EHLO client.example\r\n", "no PROXY header"),
    (b"PROXX", "no PROXY header"),
    (b"\r\n\r\n\x00\r\nQUIX", "no PROXY header"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\n", "v1: malformed line"),  # bare LF
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1 56324 25\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1", "v1: CR without LF"),  # told before the LF
    (b"PROXY TCP4 192.0.2.7  198.51.100.1 56324 25\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 56324 25\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 25\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "v1: port out of range"),
    (b"PROXY TCP4 192.0.2.256 198.51.100.1 1 25\r\n", "v1: malformed address"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 25\r\n", "v1: malformed line"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 25\r\n", "v1: address of the wrong family"),
    (b"PROXY TCP6 2001:db8:::7 2001:db8::1 1 25\r\n", "v1: malformed address"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 25\r\n", "v1: malformed line"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n", "v1: malformed line"),
    (b"proxy TCP4 192.0.2.7 198.51.100.1 1 25\r\n", "no PROXY header"),
    (b"PROXY UNKNOWN " + b"x" * 100, f"v1: no CRLF within {V1_MAX_LENGTH} octets"),
    (SIG + b"\x11", "v2: version 1"),
    (SIG + b"\x22", "v2: command 2"),
    (SIG + b"\x21\x41", "v2: address family 4"),
    (SIG + b"\x21\x13", "v2: transport protocol 3"),
    (SIG + b"\x21\x11\x00\x08" + bytes(8), "v2: 8 octets, short of the 12 of its addresses"),
    (SIG + b"\x21\x11\x00\x0e" + bytes(14), "v2: truncated TLV"),
    (SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05x", "v2: TLV longer than the header"),
    (SIG + b"\x21\x11\x10\x01", "v2: 4097 octets of addresses and TLVs, over 4096"),
]


@pytest.mark.parametrize(("data", "reason"), BAD)
def test_bad_headers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    assert refused(data) == reason


def test_garbage_is_refused_at_its_first_octet() -> None:
    """A client talking SMTP straight to the port is told off at once, not after a timeout."""
    assert refused(b"E") == "no PROXY header"
    assert refused(b"\r\n\r\n\x01") == "no PROXY header"


def test_end_of_input_and_use_after_the_end() -> None:
    reader = ProxyReader()
    assert reader.receive_data(b"PROXY TCP4 ") is NEED_MORE
    with pytest.raises(ProxyError, match="end of input"):
        reader.receive_data(b"")
    reader = ProxyReader()
    reader.receive_data(b"PROXY UNKNOWN\r\n")
    with pytest.raises(ProxyError, match="already read"):
        reader.receive_data(b"more")


def test_the_v2_bound_is_the_readers() -> None:
    header = SIG + b"\x21\x11\x00\x20" + bytes(12) + b"\x04\x00\x11" + bytes(17)
    assert read(header).tlvs == ((4, bytes(17)),)
    with pytest.raises(ProxyError, match="over 16"):
        ProxyReader(max_v2_length=16).receive_data(header)


# -- properties -------------------------------------------------------------

port = st.integers(min_value=0, max_value=65535)
v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)


@st.composite
def relayed(draw: st.DrawFn, version: int) -> ProxyHeader:
    family = draw(st.sampled_from([Family.INET, Family.INET6]))
    addresses = v4 if family is Family.INET else v6
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if version == 2:
        tlv = st.tuples(st.integers(0, 255), st.binary(max_size=40))
        tlvs = tuple(draw(st.lists(tlv, max_size=5)))
    return ProxyHeader(
        version=version,
        command=Command.PROXY,
        family=family,
        source=Endpoint(draw(addresses), draw(port)),
        destination=Endpoint(draw(addresses), draw(port)),
        tlvs=tlvs,
    )


unrelayed = st.sampled_from(
    [
        ProxyHeader(version=1, command=Command.PROXY, family=Family.UNSPEC),
        ProxyHeader(version=2, command=Command.LOCAL, family=Family.UNSPEC),
        ProxyHeader(version=2, command=Command.PROXY, family=Family.UNSPEC),
    ]
)
headers = st.one_of(relayed(1), relayed(2), unrelayed)


def encode(header: ProxyHeader) -> bytes:
    return encode_v1(header) if header.version == 1 else encode_v2(header)


@given(headers, st.binary(max_size=200))
def test_round_trip_hands_back_what_follows_untouched(header: ProxyHeader, after: bytes) -> None:
    result = read(encode(header) + after)
    assert result == ProxyHeader(
        version=header.version,
        command=header.command,
        family=header.family,
        source=header.source,
        destination=header.destination,
        tlvs=header.tlvs,
        rest=after,
    )


@given(headers)
def test_every_prefix_needs_more(header: ProxyHeader) -> None:
    data = encode(header)
    for cut in range(1, len(data)):
        assert ProxyReader().receive_data(data[:cut]) is NEED_MORE
    assert read_by_octet(data).rest == b""


@given(headers, st.binary(max_size=60), st.lists(st.integers(1, 64), max_size=12))
def test_any_split_gives_the_same_header(
    header: ProxyHeader, after: bytes, cuts: list[int]
) -> None:
    data = encode(header) + after
    reader = ProxyReader()
    offset, result = 0, None
    for size in [*cuts, len(data)]:
        chunk = data[offset : offset + size]
        if not chunk:
            break
        offset += len(chunk)
        result = reader.receive_data(chunk)
        if result is not NEED_MORE:
            break
    assert isinstance(result, ProxyHeader)
    assert result.rest + data[offset:] == after


def _feed(data: bytes, chunks: list[int]) -> None:
    reader = ProxyReader()
    offset = 0
    for size in [*chunks, len(data), 0]:
        chunk = data[offset : offset + size] if size else b""
        offset += len(chunk)
        try:
            result = reader.receive_data(chunk)
        except ProxyError as exc:
            assert exc.reason
            return
        if result is not NEED_MORE:
            assert isinstance(result, ProxyHeader)
            return


garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=120).map(lambda b: SIG + b),
    st.text(alphabet="PROXYTCP46UNKOW0123456789abcdef.: \r\n", max_size=120).map(str.encode),
)


@given(garbage, st.lists(st.integers(1, 50), max_size=8))
def test_garbage_raises_nothing_but_the_readers_error(data: bytes, chunks: list[int]) -> None:
    _feed(data, chunks)


@given(headers, st.data())
def test_damaged_headers_raise_nothing_but_the_readers_error(
    header: ProxyHeader, data: st.DataObject
) -> None:
    encoded = bytearray(encode(header))
    where = data.draw(st.integers(0, len(encoded) - 1))
    encoded[where] = data.draw(st.integers(0, 255))
    _feed(bytes(encoded), data.draw(st.lists(st.integers(1, 50), max_size=8)))
