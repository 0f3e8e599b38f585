"""The PROXY protocol header, versions 1 and 2, read without I/O.

Theory of operation.  A load balancer in front of smtpd opens each
connection with one header that names the client it relays, then the
client's own octets follow.  :class:`ProxyReader` is fed what arrives
(``receive_data``) and answers, each time, :data:`NEED_MORE`, a
:class:`ProxyHeader` (whose ``rest`` holds the octets after the header,
untouched: they are the SMTP client's first octets), or raises
:class:`ProxyError` with the reason.  It never reads past the header, holds
at most :data:`V1_MAX_LENGTH` or ``16 + max_v2_length`` octets, and decides
as early as the octets allow: a first octet that begins neither version is
refused at once.

The grammar is HAProxy's ``doc/proxy-protocol.txt``; the rules quoted
below come from it.  No sockets, clocks or files here: the daemon's shell
drives the reader and keeps the time.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# "If the CRLF sequence is not found in the first 107 characters, the
# receiver should declare the line invalid."  (2.1: the worst case,
# "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n")
V1_MAX_LENGTH: Final = 107
V1_PREFIX: Final = b"PROXY "
# "The binary header format starts with a constant 12 bytes block" (2.2).
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16  # signature, ver_cmd, fam, len
# The 16-bit length allows 65535 octets of addresses and TLVs; the proxies
# in use send a few hundred at most (addresses, ALPN, authority, SSL and
# cloud TLVs).  The bound keeps what one connection may make us hold small.
V2_DEFAULT_MAX_LENGTH: Final = 4096
_V2_HEADER = struct.Struct("!12sBBH")


class Family(enum.Enum):
    """The relayed connection's address family (v1 "TCP4", "TCP6", "UNKNOWN")."""

    INET = "TCP4"
    INET6 = "TCP6"
    UNSPEC = "UNKNOWN"


class Command(enum.Enum):
    """Version 2's command: \\x0 LOCAL, \\x1 PROXY (2.2); version 1 is always PROXY."""

    LOCAL = 0
    PROXY = 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: IPAddress
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """A complete, valid header.

    ``source`` and ``destination`` are None when the receiver is to use the
    connection's own endpoints: a v2 LOCAL command ("the connection was
    established on purpose by the proxy without being relayed", a health
    check), v1 ``UNKNOWN``, or a v2 family or protocol this reader does not
    take (AF_UNSPEC, AF_UNIX, datagrams), for which the spec lets a receiver
    "fall back to the UNSPEC mode".
    """

    version: int
    command: Command
    family: Family
    source: Endpoint | None = None
    destination: Endpoint | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2's type-length-value fields, undecoded
    rest: bytes = b""  # the octets after the header

    @property
    def relayed(self) -> bool:
        """True when the header names the client (else: keep the connection's addresses)."""
        return self.source is not None


class NeedMore(enum.Enum):
    NEED_MORE = "NEED_MORE"


NEED_MORE: Final = NeedMore.NEED_MORE


class ProxyError(Exception):
    """Not a valid PROXY header; ``reason`` says why, in a few words for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# 2.1: IPv4 is "exactly 4 integers in the range [0..255] ... Heading zeroes
# are not permitted"; IPv6 is "sets of 4 hexadecimal digits ... with the
# acceptance of one double colon" (no zone); ports are "a decimal integer
# in the range [0..65535] ... Heading zeroes are not permitted".  The ranges
# and the one "::" are checked after the match.  A dotted IPv4 tail
# ("::ffff:192.0.2.7") is taken: inet_ntop(3) writes IPv4-mapped addresses
# so, and senders build the line with it.
_DECIMAL = r"(?:0|[1-9][0-9]{0,4})"
_OCTET = r"(?:0|[1-9][0-9]{0,2})"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV6 = r"[0-9A-Fa-f:.]{2,45}"
_V1_LINE = re.compile(
    (
        rf"PROXY (?:(?P<family>TCP4) (?P<source>{_IPV4}) (?P<destination>{_IPV4})"
        rf"|(?P<family6>TCP6) (?P<source6>{_IPV6}) (?P<destination6>{_IPV6}))"
        rf" (?P<sport>{_DECIMAL}) (?P<dport>{_DECIMAL})\r\n"
        r"|PROXY UNKNOWN(?: [^\r\n]*)?\r\n"
    ).encode()
)


class ProxyReader:
    """Reads one header from the octets a connection sends first."""

    def __init__(self, *, max_v2_length: int = V2_DEFAULT_MAX_LENGTH) -> None:
        self._buffer = bytearray()
        self._max_v2_length = max_v2_length
        self._done = False

    def receive_data(self, data: bytes) -> ProxyHeader | NeedMore:
        """Add ``data`` (``b""``: end of input); the header once it is whole.

        Raises :class:`ProxyError` for anything that is not a valid header,
        and for end of input before one; after a header or an error the
        reader takes nothing more.
        """
        if self._done:
            raise ProxyError("the header was already read")
        if not data:
            self._done = True
            raise ProxyError("end of input within the header")
        self._buffer += data
        try:
            result = self._parse()
        except ProxyError:
            self._done = True
            raise
        if result is not NEED_MORE:
            self._done = True
            self._buffer = bytearray()
        return result

    def _parse(self) -> ProxyHeader | NeedMore:
        buffer = self._buffer
        if buffer[:1] == b"P":
            return self._parse_v1()
        if buffer[:1] == b"\r":
            return self._parse_v2()
        raise ProxyError("no PROXY header")

    def _parse_v1(self) -> ProxyHeader | NeedMore:
        buffer = self._buffer
        prefix = bytes(buffer[: len(V1_PREFIX)])
        if not V1_PREFIX.startswith(prefix):
            raise ProxyError("no PROXY header")
        # "The receiver must not tolerate a single CR or LF character to end
        # the line when a complete CRLF sequence is expected."
        window = bytes(buffer[:V1_MAX_LENGTH])
        end = window.find(b"\n")
        if end < 0:
            if len(window) >= V1_MAX_LENGTH:
                raise ProxyError(f"v1: no CRLF within {V1_MAX_LENGTH} octets")
            cr = window.find(b"\r")
            if 0 <= cr < len(window) - 1:
                raise ProxyError("v1: CR without LF")
            return NEED_MORE
        line = window[: end + 1]
        match = _V1_LINE.fullmatch(line)
        if match is None:
            raise ProxyError("v1: malformed line")
        rest = bytes(buffer[end + 1 :])
        if match.group("family") is not None:
            family, addresses = Family.INET, ("source", "destination")
        elif match.group("family6") is not None:
            family, addresses = Family.INET6, ("source6", "destination6")
        else:
            # "For "UNKNOWN", the rest of the line before the CRLF may be
            # omitted by the sender, and the receiver must ignore anything
            # presented before the CRLF is found."
            return ProxyHeader(version=1, command=Command.PROXY, family=Family.UNSPEC, rest=rest)
        version = 4 if family is Family.INET else 6
        source = _v1_endpoint(match.group(addresses[0]), match.group("sport"), version)
        destination = _v1_endpoint(match.group(addresses[1]), match.group("dport"), version)
        return ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=family,
            source=source,
            destination=destination,
            rest=rest,
        )

    def _parse_v2(self) -> ProxyHeader | NeedMore:
        buffer = self._buffer
        signature = bytes(buffer[: len(V2_SIGNATURE)])
        if not V2_SIGNATURE.startswith(signature):
            raise ProxyError("no PROXY header")
        if len(buffer) >= 13:
            version_command = buffer[12]
            # "The highest four bits contains the version ... it must always
            # be sent as \x2 and the receiver must only accept this value."
            if version_command >> 4 != 2:
                raise ProxyError(f"v2: version {version_command >> 4}")
            # "other values are unassigned ... Receivers must drop
            # connections presenting unexpected values here."
            if version_command & 0xF not in (0, 1):
                raise ProxyError(f"v2: command {version_command & 0xF}")
        if len(buffer) >= 14:
            family, protocol = buffer[13] >> 4, buffer[13] & 0xF
            # "other values are unspecified ... and must be rejected as
            # invalid by receivers" (families 0-3, protocols 0-2).
            if family > 3:
                raise ProxyError(f"v2: address family {family}")
            if protocol > 2:
                raise ProxyError(f"v2: transport protocol {protocol}")
        if len(buffer) < V2_FIXED_LENGTH:
            return NEED_MORE
        _, version_command, family_protocol, length = _V2_HEADER.unpack_from(buffer)
        if length > self._max_v2_length:
            raise ProxyError(
                f"v2: {length} octets of addresses and TLVs, over {self._max_v2_length}"
            )
        total = V2_FIXED_LENGTH + length
        if len(buffer) < total:
            return NEED_MORE
        block = bytes(buffer[V2_FIXED_LENGTH:total])
        rest = bytes(buffer[total:])
        command = Command(version_command & 0xF)
        return _v2_header(command, family_protocol, block, rest)


def _v1_endpoint(address: bytes, port: bytes, version: int) -> Endpoint:
    """An address of the family the line names ("The advertised protocol family
    dictates what format to use"), and a port in [0..65535]."""
    text = address.decode("ascii")
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError("v1: malformed address") from None
    if parsed.version != version:
        raise ProxyError("v1: address of the wrong family")
    number = int(port)
    if number > 65535:
        raise ProxyError("v1: port out of range")
    return Endpoint(parsed, number)


# 2.2: AF_INET's addresses are "exactly 4 bytes each", AF_INET6's 16, each
# pair "followed by the source and destination ports represented on 2
# bytes each"; "Address length is 2*4 + 2*2 = 12 bytes" and 2*16 + 2*2 = 36.
_V2_ADDRESSES = {
    1: (Family.INET, struct.Struct("!4s4sHH")),
    2: (Family.INET6, struct.Struct("!16s16sHH")),
}
_STREAM = 1


def _v2_header(command: Command, family_protocol: int, block: bytes, rest: bytes) -> ProxyHeader:
    family_code, protocol = family_protocol >> 4, family_protocol & 0xF
    known = _V2_ADDRESSES.get(family_code)
    if command is Command.LOCAL or known is None or protocol != _STREAM:
        # LOCAL: "The receiver must accept this connection as valid and must
        # use the real connection endpoints and discard the protocol block
        # including the family which is ignored."  UNSPEC, AF_UNIX and
        # datagrams: "A receiver is not required to implement other ones,
        # provided that it automatically falls back to the UNSPEC mode";
        # their block is skipped whole, by the length the header gave.
        family = known[0] if known is not None and command is Command.PROXY else Family.UNSPEC
        return ProxyHeader(version=2, command=command, family=family, rest=rest)
    family, layout = known
    if len(block) < layout.size:
        raise ProxyError(f"v2: {len(block)} octets, short of the {layout.size} of its addresses")
    source, destination, source_port, destination_port = layout.unpack_from(block)
    address_type = ipaddress.IPv4Address if family is Family.INET else ipaddress.IPv6Address
    return ProxyHeader(
        version=2,
        command=command,
        family=family,
        source=Endpoint(address_type(source), source_port),
        destination=Endpoint(address_type(destination), destination_port),
        tlvs=_tlvs(block[layout.size :]),
        rest=rest,
    )


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """The TLVs after the addresses: each a type octet, a 16-bit length, the value.

    None is acted on: "A receiver may choose to skip over and ignore the
    TLVs it is not interested in or it does not understand."  Each must fit
    in the block the header's length gave, so that a broken one is refused
    rather than read past.
    """
    tlvs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyError("v2: truncated TLV")
        kind = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3])
        end = offset + 3 + length
        if end > len(data):
            raise ProxyError("v2: TLV longer than the header")
        tlvs.append((kind, data[offset + 3 : end]))
        offset = end
    return tuple(tlvs)


def encode_v1(header: ProxyHeader) -> bytes:
    """The version 1 line for ``header`` (a PROXY command); for tests and tools."""
    if header.source is None or header.destination is None:
        return b"PROXY UNKNOWN\r\n"
    source, destination = header.source, header.destination
    return (
        f"PROXY {header.family.value} {source.address} {destination.address} "
        f"{source.port} {destination.port}\r\n"
    ).encode("ascii")


def encode_v2(header: ProxyHeader) -> bytes:
    """The version 2 header for ``header``; for tests and tools."""
    tlv_octets = b"".join(
        bytes([kind]) + len(value).to_bytes(2) + value for kind, value in header.tlvs
    )
    if header.source is None or header.destination is None:
        family_protocol, addresses = 0x00, b""
    else:
        code = 1 if header.family is Family.INET else 2
        family_protocol = code << 4 | _STREAM
        addresses = _V2_ADDRESSES[code][1].pack(
            header.source.address.packed,
            header.destination.address.packed,
            header.source.port,
            header.destination.port,
        )
    block = addresses + tlv_octets
    version_command = 0x20 | header.command.value
    return _V2_HEADER.pack(V2_SIGNATURE, version_command, family_protocol, len(block)) + block
