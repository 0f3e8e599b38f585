"""The Sendmail milter protocol, version 6, on the wire: packets in, typed events out.

Sans-IO, in h11's shape: no socket, clock or event loop here.  Both sides
of the protocol are covered, so that the MTA (:mod:`.client`) and a test
filter use the same code:

* :func:`encode` turns any command or response into one packet's octets;
* :func:`decode_command` and :func:`decode_response` turn one packet's
  payload back into a typed, frozen dataclass;
* :class:`PacketReader` takes octets as they arrive and hands out whole
  packets, decoded, or :data:`NEED_DATA`.

Framing (libmilter's ``mfdef.h``, Postfix's ``milter8.c``)::

    packet  = length command-code data
    length  = 4 octets, network order: the size of command-code + data
    strings are NUL-terminated; "long" is 4 octets and "short" 2, network order

Every malformed packet raises a :class:`MilterProtocolError` subclass; none
is ever half-decoded or skipped.  Text fields are decoded as UTF-8 with
``surrogateescape``, so that 8-bit header octets survive a round trip
unchanged.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

# libmilter's MILTER_CHUNK_SIZE: the largest body chunk either side sends.
CHUNK_SIZE = 65535
# Postfix's milter8.c accepts packets up to twice the chunk size ("we don't
# accept insane amounts of data"); a longer length is refused before any of
# it is buffered.
MAX_PACKET = 2 * CHUNK_SIZE
# The protocol version this module speaks (SMFI_PROT_VERSION).
VERSION = 6


class MilterProtocolError(Exception):
    """The peer broke the protocol.  The connection cannot be used any more."""


class PacketTooLong(MilterProtocolError):
    """A packet's length field is over the bound (or zero)."""


class UnknownCode(MilterProtocolError):
    """A command or response code that the protocol does not define."""


class MalformedPacket(MilterProtocolError):
    """A packet whose data does not fit its code's layout."""


class TruncatedPacket(MilterProtocolError):
    """The connection closed in the middle of a packet."""


class ProtocolFlag(enum.IntFlag):
    """SMFIP_*: steps the filter does not want, replies it will not send, extensions."""

    NOCONNECT = 1 << 0
    NOHELO = 1 << 1
    NOMAIL = 1 << 2
    NORCPT = 1 << 3
    NOBODY = 1 << 4
    NOHDRS = 1 << 5
    NOEOH = 1 << 6
    NR_HDR = 1 << 7  # also known as SMFIP_NOHREPL
    NOUNKNOWN = 1 << 8
    NODATA = 1 << 9
    SKIP = 1 << 10  # the MTA understands SMFIR_SKIP
    RCPT_REJ = 1 << 11  # the filter wants recipients the MTA refused, too
    NR_CONN = 1 << 12
    NR_HELO = 1 << 13
    NR_MAIL = 1 << 14
    NR_RCPT = 1 << 15
    NR_DATA = 1 << 16
    NR_UNKN = 1 << 17
    NR_EOH = 1 << 18
    NR_BODY = 1 << 19
    HDR_LEADSPC = 1 << 20  # header values keep their leading space, both ways


class ActionFlag(enum.IntFlag):
    """SMFIF_*: what the filter may do at end of message."""

    ADDHDRS = 1 << 0
    CHGBODY = 1 << 1
    ADDRCPT = 1 << 2
    DELRCPT = 1 << 3
    CHGHDRS = 1 << 4
    QUARANTINE = 1 << 5
    CHGFROM = 1 << 6
    ADDRCPT_PAR = 1 << 7
    SETSYMLIST = 1 << 8


class MacroStage(enum.IntEnum):
    """SMFIM_*: the stages a filter may name in its macro lists (SETSYMLIST)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


class Family(enum.Enum):
    """SMFIA_*: the address family of the SMTP client in CONNECT."""

    UNKNOWN = b"U"
    UNIX = b"L"
    INET = b"4"
    INET6 = b"6"


# --- commands: MTA to filter ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Negotiate:
    """SMFIC_OPTNEG from the MTA, and the filter's answer to it (same code, 'O').

    ``macro_lists`` is only in a filter's answer: SETSYMLIST, the macros it
    wants at each stage instead of the MTA's defaults.
    """

    code: ClassVar[bytes] = b"O"
    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    macro_lists: tuple[tuple[MacroStage, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DefineMacros:
    """SMFIC_MACRO: name/value pairs that hold for the command ``for_code``."""

    code: ClassVar[bytes] = b"D"
    for_code: bytes
    macros: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    """SMFIC_CONNECT: the client's host name, family, port and address.

    ``port`` and ``address`` are absent for :attr:`Family.UNKNOWN`; for
    :attr:`Family.UNIX` the port is 0 and the address the socket's path.
    """

    code: ClassVar[bytes] = b"C"
    hostname: str
    family: Family
    port: int = 0
    address: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Helo:
    code: ClassVar[bytes] = b"H"
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MailFrom:
    """SMFIC_MAIL: the sender with its angle brackets, then the ESMTP arguments."""

    code: ClassVar[bytes] = b"M"
    sender: str
    arguments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptTo:
    code: ClassVar[bytes] = b"R"
    recipient: str
    arguments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    code: ClassVar[bytes] = b"T"


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """SMFIC_HEADER: one header field; folded lines separated by LF, as Sendmail does."""

    code: ClassVar[bytes] = b"L"
    name: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfHeaders:
    code: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyChunk:
    """SMFIC_BODY: at most :data:`CHUNK_SIZE` octets of body, CRLF line ends."""

    code: ClassVar[bytes] = b"B"
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfMessage:
    """SMFIC_BODYEOB.  libmilter accepts a last chunk in it; Postfix never sends one."""

    code: ClassVar[bytes] = b"E"
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    code: ClassVar[bytes] = b"A"


@dataclass(frozen=True, slots=True, kw_only=True)
class Quit:
    code: ClassVar[bytes] = b"Q"


@dataclass(frozen=True, slots=True, kw_only=True)
class QuitNewConnection:
    """SMFIC_QUIT_NC: this SMTP session is over, the filter connection is reused."""

    code: ClassVar[bytes] = b"K"


@dataclass(frozen=True, slots=True, kw_only=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command the MTA did not recognise."""

    code: ClassVar[bytes] = b"U"
    line: str


Command = (
    Negotiate
    | DefineMacros
    | Connect
    | Helo
    | MailFrom
    | RcptTo
    | Data
    | Header
    | EndOfHeaders
    | BodyChunk
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
    | Unknown
)

# --- responses: filter to MTA ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Continue:
    code: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """Accept the message (or, at CONNECT and HELO, the whole connection): no more events."""

    code: ClassVar[bytes] = b"a"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    code: ClassVar[bytes] = b"r"


@dataclass(frozen=True, slots=True, kw_only=True)
class TempFail:
    code: ClassVar[bytes] = b"t"


@dataclass(frozen=True, slots=True, kw_only=True)
class Discard:
    code: ClassVar[bytes] = b"d"


@dataclass(frozen=True, slots=True, kw_only=True)
class Skip:
    """Send no more events of this kind (body chunks, in practice)."""

    code: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """Still working: the MTA restarts its timer and keeps waiting."""

    code: ClassVar[bytes] = b"p"


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown:
    """SMFIR_SHUTDOWN: the MTA answers 421 and closes the SMTP session."""

    code: ClassVar[bytes] = b"4"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionFail:
    """SMFIR_CONN_FAIL: Sendmail drops the SMTP session; handled as :class:`Shutdown`."""

    code: ClassVar[bytes] = b"f"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyCode:
    """SMFIR_REPLYCODE: an SMTP reply, one or more CRLF-separated lines, as sent.

    :func:`decode_response` checks it the way Postfix's milter8.c does
    (``milter8_valid_smtp_reply``); :func:`encode` sends any text, so that a
    test filter can send a bad one.
    """

    code: ClassVar[bytes] = b"y"
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Quarantine:
    code: ClassVar[bytes] = b"q"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AddHeader:
    code: ClassVar[bytes] = b"h"
    name: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class InsertHeader:
    """Insert a field before the ``index``-th field of the header (0: at the top)."""

    code: ClassVar[bytes] = b"i"
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeHeader:
    """Change the ``index``-th field named ``name`` (1-based); an empty value deletes it."""

    code: ClassVar[bytes] = b"m"
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeSender:
    code: ClassVar[bytes] = b"e"
    sender: str
    arguments: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AddRecipient:
    code: ClassVar[bytes] = b"+"
    recipient: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AddRecipientWithArguments:
    code: ClassVar[bytes] = b"2"
    recipient: str
    arguments: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteRecipient:
    code: ClassVar[bytes] = b"-"
    recipient: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaceBody:
    """One piece of the new body; consecutive pieces are concatenated."""

    code: ClassVar[bytes] = b"b"
    data: bytes


Modification = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | ChangeSender
    | AddRecipient
    | AddRecipientWithArguments
    | DeleteRecipient
    | ReplaceBody
    | Quarantine
)

Response = (
    Negotiate
    | Continue
    | Accept
    | Reject
    | TempFail
    | Discard
    | Skip
    | Progress
    | Shutdown
    | ConnectionFail
    | ReplyCode
    | Modification
)

# --- encoding ------------------------------------------------------------------------

_LONG = struct.Struct("!I")
_SHORT = struct.Struct("!H")


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _string(value: str) -> bytes:
    octets = _text(value)
    if b"\0" in octets:
        raise ValueError(f"a milter string cannot hold NUL: {value!r}")
    return octets + b"\0"


def _data(packet: Command | Response) -> bytes:
    match packet:
        case Negotiate(version=version, actions=actions, protocol=protocol):
            lists = b"".join(
                _LONG.pack(stage) + _string(" ".join(names)) for stage, names in packet.macro_lists
            )
            return _LONG.pack(version) + _LONG.pack(actions) + _LONG.pack(protocol) + lists
        case DefineMacros(for_code=for_code, macros=macros):
            if len(for_code) != 1:
                raise ValueError(f"a command code is one octet: {for_code!r}")
            return for_code + b"".join(_string(n) + _string(v) for n, v in macros)
        case Connect(hostname=hostname, family=family, port=port, address=address):
            head = _string(hostname) + family.value
            if family is Family.UNKNOWN:
                return head
            return head + _SHORT.pack(port) + _string(address)
        case Helo(name=name):
            return _string(name)
        case MailFrom(sender=first, arguments=rest) | RcptTo(recipient=first, arguments=rest):
            return b"".join(_string(s) for s in (first, *rest))
        case Header(name=name, value=value) | AddHeader(name=name, value=value):
            return _string(name) + _string(value)
        case BodyChunk(data=data) | EndOfMessage(data=data) | ReplaceBody(data=data):
            return data
        case Unknown(line=text) | ReplyCode(text=text) | Quarantine(reason=text):
            return _string(text)
        case AddRecipient(recipient=text) | DeleteRecipient(recipient=text):
            return _string(text)
        case (
            InsertHeader(index=index, name=name, value=value)
            | ChangeHeader(index=index, name=name, value=value)
        ):
            return _LONG.pack(index) + _string(name) + _string(value)
        case (
            ChangeSender(sender=first, arguments=arguments)
            | AddRecipientWithArguments(recipient=first, arguments=arguments)
        ):
            return _string(first) + (b"" if arguments is None else _string(arguments))
        case _:
            return b""


def _header(packet: Header) -> bytes:
    return _string(packet.name) + _string(packet.value)


def _macro_definitions(packet: DefineMacros) -> bytes:
    if len(packet.for_code) != 1:
        raise ValueError(f"a command code is one octet: {packet.for_code!r}")
    return packet.for_code + b"".join(_string(n) + _string(v) for n, v in packet.macros)


def _envelope(packet: MailFrom | RcptTo) -> bytes:
    first = packet.sender if isinstance(packet, MailFrom) else packet.recipient
    return b"".join(_string(s) for s in (first, *packet.arguments))


def _no_data(packet: Command | Response) -> bytes:
    return b""


# The packets an MTA sends for every message, found by their type rather
# than by going down the match in _data; the rest take the match.
_FAST_DATA: dict[type, Callable[[Any], bytes]] = {
    Header: _header,
    DefineMacros: _macro_definitions,
    MailFrom: _envelope,
    RcptTo: _envelope,
    Data: _no_data,
    EndOfHeaders: _no_data,
    Abort: _no_data,
    Quit: _no_data,
}


def encode(packet: Command | Response) -> bytes:
    """One packet's octets: length, code, data."""
    fast = _FAST_DATA.get(type(packet))
    data = fast(packet) if fast is not None else _data(packet)
    return _LONG.pack(len(data) + 1) + packet.code + data


# --- decoding ------------------------------------------------------------------------


class _Fields:
    """Reads a packet's data left to right; any shortfall or leftover is malformed."""

    __slots__ = ("_code", "_data", "_pos")

    def __init__(self, code: bytes, data: bytes) -> None:
        self._code = code
        self._data = data
        self._pos = 0

    def _fail(self, what: str) -> MalformedPacket:
        return MalformedPacket(f"packet {self._code!r}: {what}")

    @property
    def more(self) -> bool:
        return self._pos < len(self._data)

    def long(self) -> int:
        if self._pos + 4 > len(self._data):
            raise self._fail("truncated 32-bit field")
        (value,) = _LONG.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(value)

    def short(self) -> int:
        if self._pos + 2 > len(self._data):
            raise self._fail("truncated 16-bit field")
        (value,) = _SHORT.unpack_from(self._data, self._pos)
        self._pos += 2
        return int(value)

    def octet(self) -> bytes:
        if self._pos >= len(self._data):
            raise self._fail("missing octet")
        self._pos += 1
        return self._data[self._pos - 1 : self._pos]

    def string(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise self._fail("string without its terminating NUL")
        value = self._data[self._pos : end].decode("utf-8", "surrogateescape")
        self._pos = end + 1
        return value

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    def end(self) -> None:
        if self.more:
            raise self._fail(f"{len(self._data) - self._pos} octets after the last field")


def _negotiate(f: _Fields) -> Negotiate:
    version, actions, protocol = f.long(), f.long(), f.long()
    lists: list[tuple[MacroStage, tuple[str, ...]]] = []
    while f.more:
        stage, names = f.long(), f.string()
        # Postfix ignores a list for a stage it does not know; so do we.
        if stage in MacroStage._value2member_map_:
            lists.append((MacroStage(stage), tuple(names.split())))
    return Negotiate(
        version=version,
        actions=ActionFlag(actions),
        protocol=ProtocolFlag(protocol),
        macro_lists=tuple(lists),
    )


def _strings(f: _Fields) -> list[str]:
    values = []
    while f.more:
        values.append(f.string())
    return values


def _decode_command(code: bytes, f: _Fields) -> Command:
    command: Command
    match code:
        case b"O":
            return _negotiate(f)
        case b"D":
            for_code = f.octet()
            values = _strings(f)
            if len(values) % 2:
                raise MalformedPacket("SMFIC_MACRO: a macro name without its value")
            pairs = tuple(zip(values[::2], values[1::2], strict=True))
            return DefineMacros(for_code=for_code, macros=pairs)
        case b"C":
            hostname = f.string()
            try:
                family = Family(f.octet())
            except ValueError:
                raise MalformedPacket("SMFIC_CONNECT: unknown address family") from None
            if family is Family.UNKNOWN:
                command = Connect(hostname=hostname, family=family)
            else:
                command = Connect(
                    hostname=hostname, family=family, port=f.short(), address=f.string()
                )
        case b"H":
            command = Helo(name=f.string())
        case b"M" | b"R":
            values = _strings(f)
            if not values:
                raise MalformedPacket("SMFIC_MAIL/RCPT: no address")
            if code == b"M":
                return MailFrom(sender=values[0], arguments=tuple(values[1:]))
            return RcptTo(recipient=values[0], arguments=tuple(values[1:]))
        case b"T":
            command = Data()
        case b"L":
            command = Header(name=f.string(), value=f.string())
        case b"N":
            command = EndOfHeaders()
        case b"B":
            return BodyChunk(data=f.rest())
        case b"E":
            return EndOfMessage(data=f.rest())
        case b"A":
            command = Abort()
        case b"Q":
            command = Quit()
        case b"K":
            command = QuitNewConnection()
        case b"U":
            command = Unknown(line=f.string())
        case _:
            raise UnknownCode(f"unknown command code {code!r}")
    f.end()
    return command


_EMPTY_RESPONSES: dict[bytes, Response] = {
    r.code: r
    for r in (
        Continue(),
        Accept(),
        Reject(),
        TempFail(),
        Discard(),
        Skip(),
        Progress(),
        Shutdown(),
        ConnectionFail(),
    )
}


def _decode_response(code: bytes, f: _Fields) -> Response:
    response: Response
    if code in _EMPTY_RESPONSES:
        response = _EMPTY_RESPONSES[code]
    else:
        match code:
            case b"O":
                return _negotiate(f)
            case b"y":
                response = ReplyCode(text=f.string())
                check_reply_text(response.text)
            case b"q":
                response = Quarantine(reason=f.string())
            case b"h":
                response = AddHeader(name=f.string(), value=f.string())
            case b"i":
                response = InsertHeader(index=f.long(), name=f.string(), value=f.string())
            case b"m":
                response = ChangeHeader(index=f.long(), name=f.string(), value=f.string())
            case b"e":
                sender = f.string()
                response = ChangeSender(sender=sender, arguments=f.string() if f.more else None)
            case b"+":
                response = AddRecipient(recipient=f.string())
            case b"2":
                rcpt = f.string()
                response = AddRecipientWithArguments(
                    recipient=rcpt, arguments=f.string() if f.more else None
                )
            case b"-":
                response = DeleteRecipient(recipient=f.string())
            case b"b":
                return ReplaceBody(data=f.rest())
            case _:
                raise UnknownCode(f"unknown response code {code!r}")
    f.end()
    return response


def check_reply_text(text: str) -> None:
    """Refuse a SMFIR_REPLYCODE text that is not an SMTP 4xx/5xx reply.

    As Postfix's ``milter8_valid_smtp_reply``: every line is ``ddd-`` (all
    but the last) or ``ddd `` (the last), the first digit 4 or 5, lines
    separated by CRLF, no bare CR or LF, and an enhanced code, if present,
    of the same class as the basic one (RFC 3463 2).  We also require the
    same basic code on every line (RFC 5321 4.2.1).
    """
    lines = text.split("\r\n")
    first = lines[0][:3]
    for number, line in enumerate(lines):
        final = number == len(lines) - 1
        if (
            len(line) < 4
            or "\r" in line
            or "\n" in line
            or line[0] not in "45"
            or not line[:3].isdigit()
            or not line[:3].isascii()
            or line[:3] != first
            or line[3] != (" " if final else "-")
            or (len(line) > 4 and line[4].isdigit() and line[4] != line[0])
        ):
            raise MalformedPacket(f"SMFIR_REPLYCODE: not an SMTP 4xx/5xx reply: {text!r}")


def _split(payload: bytes) -> tuple[bytes, _Fields]:
    if not payload:
        raise MalformedPacket("empty packet: no code")
    code = payload[:1]
    return code, _Fields(code, payload[1:])


def decode_command(payload: bytes) -> Command:
    """A packet's payload (code and data, without the length) as an MTA command."""
    return _decode_command(*_split(payload))


def decode_response(payload: bytes) -> Response:
    """A packet's payload (code and data, without the length) as a filter response."""
    # Most answers are one octet (CONTINUE, above all): no fields to read.
    response = _EMPTY_RESPONSES.get(payload) if len(payload) == 1 else None
    return response if response is not None else _decode_response(*_split(payload))


# --- the receive buffer --------------------------------------------------------------


class Signal(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

T = TypeVar("T")


class PacketReader(Generic[T]):
    """Octets in, whole decoded packets out.

    :meth:`receive_data` takes what the socket gave (``b""`` at end of
    file); :meth:`next_event` returns the next packet, :data:`NEED_DATA`
    until one is whole, or :data:`CLOSED` after a clean end of file.  A
    length over ``max_packet`` is refused as soon as its four octets are in,
    so a peer cannot make us buffer it.  After an error the reader raises
    the same error again: the stream has lost its framing.
    """

    def __init__(self, decode: Callable[[bytes], T], *, max_packet: int = MAX_PACKET) -> None:
        self._decode = decode
        self._max_packet = max_packet
        self._buffer = bytearray()
        self._eof = False
        self._error: MilterProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise RuntimeError("data received after end of file")
        if not data:
            self._eof = True
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_event(self) -> T | Signal:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except MilterProtocolError as error:
            self._error = error
            raise

    def _next(self) -> T | Signal:
        buffer = self._buffer
        if len(buffer) >= 4:
            (length,) = _LONG.unpack_from(buffer)
            if length == 0 or length > self._max_packet:
                raise PacketTooLong(f"packet length {length} (bounds: 1 to {self._max_packet})")
            if len(buffer) >= 4 + length:
                payload = bytes(buffer[4 : 4 + length])
                del buffer[: 4 + length]
                return self._decode(payload)
        if self._eof:
            if buffer:
                raise TruncatedPacket(f"end of file inside a packet ({len(buffer)} octets)")
            return CLOSED
        return NEED_DATA


def command_reader(*, max_packet: int = MAX_PACKET) -> PacketReader[Command]:
    """The filter's side: reads what an MTA sends."""
    return PacketReader(decode_command, max_packet=max_packet)


def response_reader(*, max_packet: int = MAX_PACKET) -> PacketReader[Response]:
    """The MTA's side: reads what a filter sends."""
    return PacketReader(decode_response, max_packet=max_packet)
