"""The milter codec: byte tables, malformed packets, and round trips of every packet type."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.milter import codec
from mmdf_smtp.milter.codec import ActionFlag, Family, MacroStage, ProtocolFlag


def packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(code) + len(data)) + code + data


# (packet, the octets on the wire): commands the MTA sends.
COMMANDS: list[tuple[codec.Command, bytes]] = [
    (
        codec.Negotiate(version=6, actions=ActionFlag(0x1FF), protocol=ProtocolFlag(0x1FFFFF)),
        packet(b"O", b"\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff"),
    ),
    (
        codec.DefineMacros(for_code=b"C", macros=(("j", "mx.example"), ("{client_addr}", "::1"))),
        packet(b"D", b"Cj\0mx.example\0{client_addr}\0::1\0"),
    ),
    (
        codec.Connect(hostname="client.example", family=Family.INET, port=25, address="192.0.2.1"),
        packet(b"C", b"client.example\x004\x00\x19192.0.2.1\0"),
    ),
    (
        codec.Connect(hostname="[::1]", family=Family.INET6, port=65535, address="::1"),
        packet(b"C", b"[::1]\x006\xff\xff::1\0"),
    ),
    (
        codec.Connect(hostname="localhost", family=Family.UNIX, port=0, address="/run/smtp"),
        packet(b"C", b"localhost\0L\0\0/run/smtp\0"),
    ),
    (codec.Connect(hostname="unknown", family=Family.UNKNOWN), packet(b"C", b"unknown\0U")),
    (codec.Helo(name="client.example"), packet(b"H", b"client.example\0")),
    (
        codec.MailFrom(sender="<a@example.org>", arguments=("SIZE=10", "BODY=8BITMIME")),
        packet(b"M", b"<a@example.org>\0SIZE=10\0BODY=8BITMIME\0"),
    ),
    (codec.MailFrom(sender="<>"), packet(b"M", b"<>\0")),
    (codec.RcptTo(recipient="<b@example.net>"), packet(b"R", b"<b@example.net>\0")),
    (codec.Data(), packet(b"T")),
    (codec.Header(name="Subject", value="hi\n\tthere"), packet(b"L", b"Subject\0hi\n\tthere\0")),
    (codec.Header(name="X-8bit", value="caf\udce9 é"), packet(b"L", b"X-8bit\0caf\xe9 \xc3\xa9\0")),
    (codec.EndOfHeaders(), packet(b"N")),
    (codec.BodyChunk(data=b"line\r\n\0\xff"), packet(b"B", b"line\r\n\0\xff")),
    (codec.EndOfMessage(), packet(b"E")),
    (codec.Abort(), packet(b"A")),
    (codec.Quit(), packet(b"Q")),
    (codec.QuitNewConnection(), packet(b"K")),
    (codec.Unknown(line="XYZZY now"), packet(b"U", b"XYZZY now\0")),
]

# Responses a milter sends.
RESPONSES: list[tuple[codec.Response, bytes]] = [
    (
        codec.Negotiate(
            version=6,
            actions=ActionFlag.ADDHDRS | ActionFlag.SETSYMLIST,
            protocol=ProtocolFlag.NOCONNECT | ProtocolFlag.NR_HDR,
            macro_lists=((MacroStage.ENVFROM, ("{auth_type}", "i")),),
        ),
        packet(b"O", b"\0\0\0\x06\0\0\x01\x01\0\0\0\x81\0\0\0\x02{auth_type} i\0"),
    ),
    (codec.Continue(), packet(b"c")),
    (codec.Accept(), packet(b"a")),
    (codec.Reject(), packet(b"r")),
    (codec.TempFail(), packet(b"t")),
    (codec.Discard(), packet(b"d")),
    (codec.Skip(), packet(b"s")),
    (codec.Progress(), packet(b"p")),
    (codec.Shutdown(), packet(b"4")),
    (codec.ConnectionFail(), packet(b"f")),
    (codec.ReplyCode(text="554 5.7.1 No"), packet(b"y", b"554 5.7.1 No\0")),
    (
        codec.ReplyCode(text="451-4.7.1 one\r\n451 4.7.1 two"),
        packet(b"y", b"451-4.7.1 one\r\n451 4.7.1 two\0"),
    ),
    (codec.Quarantine(reason="looks odd"), packet(b"q", b"looks odd\0")),
    (codec.AddHeader(name="X-A", value="1"), packet(b"h", b"X-A\x001\0")),
    (
        codec.InsertHeader(index=0, name="DKIM-Signature", value="v=1"),
        packet(b"i", b"\0\0\0\0DKIM-Signature\0v=1\0"),
    ),
    (
        codec.ChangeHeader(index=2, name="Subject", value=""),
        packet(b"m", b"\0\0\0\x02Subject\0\0"),
    ),
    (codec.ChangeSender(sender="<new@example>"), packet(b"e", b"<new@example>\0")),
    (
        codec.ChangeSender(sender="<new@example>", arguments="SIZE=1"),
        packet(b"e", b"<new@example>\0SIZE=1\0"),
    ),
    (codec.AddRecipient(recipient="<c@example>"), packet(b"+", b"<c@example>\0")),
    (
        codec.AddRecipientWithArguments(recipient="<c@example>", arguments="NOTIFY=NEVER"),
        packet(b"2", b"<c@example>\0NOTIFY=NEVER\0"),
    ),
    (codec.AddRecipientWithArguments(recipient="<c@example>"), packet(b"2", b"<c@example>\0")),
    (codec.DeleteRecipient(recipient="<b@example>"), packet(b"-", b"<b@example>\0")),
    (codec.ReplaceBody(data=b"new\r\nbody\r\n"), packet(b"b", b"new\r\nbody\r\n")),
]


@pytest.mark.parametrize(("command", "wire"), COMMANDS)
def test_command_table(command: codec.Command, wire: bytes) -> None:
    assert codec.encode(command) == wire
    _read_three_ways(codec.command_reader, wire, command)


@pytest.mark.parametrize(("response", "wire"), RESPONSES)
def test_response_table(response: codec.Response, wire: bytes) -> None:
    assert codec.encode(response) == wire
    _read_three_ways(codec.response_reader, wire, response)


def _read_three_ways(make_reader, wire: bytes, expected: object) -> None:  # type: ignore[no-untyped-def]
    # Whole.
    reader = make_reader()
    reader.receive_data(wire)
    assert reader.next_event() == expected
    assert reader.next_event() is codec.NEED_DATA
    # Byte by byte: nothing until the last octet.
    reader = make_reader()
    for i in range(len(wire)):
        assert reader.next_event() is codec.NEED_DATA
        reader.receive_data(wire[i : i + 1])
    assert reader.next_event() == expected
    # With trailing data: the next packet's first octets stay buffered.
    reader = make_reader()
    reader.receive_data(wire + wire + wire[:3])
    assert reader.next_event() == expected
    assert reader.next_event() == expected
    assert reader.next_event() is codec.NEED_DATA
    assert reader.buffered == 3
    reader.receive_data(b"")
    with pytest.raises(codec.TruncatedPacket):
        reader.next_event()


def test_clean_end_of_file() -> None:
    reader = codec.response_reader()
    reader.receive_data(packet(b"c"))
    reader.receive_data(b"")
    assert reader.next_event() == codec.Continue()
    assert reader.next_event() is codec.CLOSED


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"\0\0\0\0", codec.PacketTooLong),
        (struct.pack("!I", codec.MAX_PACKET + 1), codec.PacketTooLong),
        (b"\xff\xff\xff\xff", codec.PacketTooLong),
        (packet(b"Z"), codec.UnknownCode),
        (packet(b"c", b"x"), codec.MalformedPacket),  # continue carries no data
        (packet(b"O", b"\0\0\0\x06\0\0"), codec.MalformedPacket),
        (packet(b"O", b"\0\0\0\x06\0\0\0\0\0\0\0\0\0\0\0\x01macro"), codec.MalformedPacket),
        (packet(b"h", b"X-A\0value"), codec.MalformedPacket),  # no NUL after the value
        (packet(b"h", b"X-A\0"), codec.MalformedPacket),
        (packet(b"h", b"X-A\0v\0extra\0"), codec.MalformedPacket),
        (packet(b"m", b"\0\0\x01"), codec.MalformedPacket),
        (packet(b"y", b"250 2.0.0 fine\0"), codec.MalformedPacket),  # not 4xx/5xx
        (packet(b"y", b"550 4.7.1 mismatch\0"), codec.MalformedPacket),
        (packet(b"y", b"550-5.7.1 a\r\n551 5.7.1 b\0"), codec.MalformedPacket),
        (packet(b"y", b"550-5.7.1 a\n550 5.7.1 b\0"), codec.MalformedPacket),
        (packet(b"y", b"550 5.7.1 a\r\n\0"), codec.MalformedPacket),
        (packet(b"y", b"550-5.7.1 a\0"), codec.MalformedPacket),
        (packet(b"y", b"55\0"), codec.MalformedPacket),
        (packet(b"y", b"550 a\0b\0"), codec.MalformedPacket),
    ],
)
def test_malformed_responses(wire: bytes, error: type[Exception]) -> None:
    reader = codec.response_reader()
    reader.receive_data(wire)
    with pytest.raises(error):
        reader.next_event()
    # The stream has lost its framing: the error stays.
    reader.receive_data(packet(b"c"))
    with pytest.raises(error):
        reader.next_event()


@pytest.mark.parametrize(
    "wire",
    [
        packet(b"C", b"host\0X\0\0addr\0"),  # unknown family
        packet(b"C", b"host\x004\0"),  # port cut short
        packet(b"C", b"host\x004\0\x19addr"),
        packet(b"D", b"Cj\0"),  # a name without its value
        packet(b"D"),
        packet(b"M"),
        packet(b"H", b"name\0more\0"),
        packet(b"T", b"x"),
        packet(b"#"),
    ],
)
def test_malformed_commands(wire: bytes) -> None:
    reader = codec.command_reader()
    reader.receive_data(wire)
    with pytest.raises(codec.MilterProtocolError):
        reader.next_event()


def test_absurd_length_refused_before_buffering() -> None:
    reader = codec.response_reader()
    reader.receive_data(struct.pack("!I", 1 << 30) + b"h")
    with pytest.raises(codec.PacketTooLong):
        reader.next_event()


def test_bound_is_configurable() -> None:
    reader = codec.response_reader(max_packet=10)
    reader.receive_data(codec.encode(codec.AddHeader(name="X-Long", value="12345")))
    with pytest.raises(codec.PacketTooLong):
        reader.next_event()


def test_unknown_macro_stage_is_ignored() -> None:
    wire = packet(b"O", b"\0\0\0\x06\0\0\0\0\0\0\0\0\0\0\0\x09x\0\0\0\0\x01y\0")
    reader = codec.response_reader()
    reader.receive_data(wire)
    event = reader.next_event()
    assert isinstance(event, codec.Negotiate)
    assert event.macro_lists == ((MacroStage.HELO, ("y",)),)


def test_nul_in_a_string_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="NUL"):
        codec.encode(codec.Helo(name="a\0b"))


# --- round trips ----------------------------------------------------------------------

# Text that survives UTF-8 with surrogateescape: no NUL, no surrogates (the
# escapes for undecodable octets are covered by the byte table above).
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
word = st.text(
    st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp"), blacklist_characters="\0"),
    min_size=1,
    max_size=12,
).filter(lambda s: not any(c.isspace() for c in s))
u32 = st.integers(0, 2**32 - 1)
octets = st.binary(max_size=300)
command_code = st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E", b"U"])

enhanced = st.tuples(st.integers(0, 999), st.integers(0, 999)).map(lambda t: f".{t[0]}.{t[1]}")
reply_line_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r\n"), max_size=30
)


@st.composite
def reply_texts(draw: st.DrawFn) -> str:
    code = draw(st.sampled_from(["421", "450", "451", "452", "550", "552", "553", "554"]))
    ext = code[0] + draw(enhanced) if draw(st.booleans()) else ""
    lines = draw(st.lists(reply_line_text, min_size=1, max_size=4))
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        # A text that starts with a digit would read as an enhanced code.
        body = f"{ext} {line}" if ext else "x" + line
        out.append(f"{code}{sep}{body}")
    return "\r\n".join(out)


macro_lists = st.lists(
    st.tuples(st.sampled_from(list(MacroStage)), st.lists(word, max_size=4).map(tuple)),
    max_size=7,
).map(tuple)

commands = st.one_of(
    st.builds(
        codec.Negotiate,
        version=u32,
        actions=u32.map(ActionFlag),
        protocol=u32.map(ProtocolFlag),
    ),
    st.builds(
        codec.DefineMacros,
        for_code=command_code,
        macros=st.lists(st.tuples(text, text), max_size=5).map(tuple),
    ),
    st.builds(
        codec.Connect,
        hostname=text,
        family=st.sampled_from([Family.INET, Family.INET6, Family.UNIX]),
        port=st.integers(0, 65535),
        address=text,
    ),
    st.builds(codec.Connect, hostname=text, family=st.just(Family.UNKNOWN)),
    st.builds(codec.Helo, name=text),
    st.builds(codec.MailFrom, sender=text, arguments=st.lists(text, max_size=4).map(tuple)),
    st.builds(codec.RcptTo, recipient=text, arguments=st.lists(text, max_size=4).map(tuple)),
    st.builds(codec.Data),
    st.builds(codec.Header, name=text, value=text),
    st.builds(codec.EndOfHeaders),
    st.builds(codec.BodyChunk, data=octets),
    st.builds(codec.EndOfMessage, data=octets),
    st.builds(codec.Abort),
    st.builds(codec.Quit),
    st.builds(codec.QuitNewConnection),
    st.builds(codec.Unknown, line=text),
)

responses = st.one_of(
    st.builds(
        codec.Negotiate,
        version=u32,
        actions=u32.map(ActionFlag),
        protocol=u32.map(ProtocolFlag),
        macro_lists=macro_lists,
    ),
    st.sampled_from(
        [
            codec.Continue(),
            codec.Accept(),
            codec.Reject(),
            codec.TempFail(),
            codec.Discard(),
            codec.Skip(),
            codec.Progress(),
            codec.Shutdown(),
            codec.ConnectionFail(),
        ]
    ),
    st.builds(codec.ReplyCode, text=reply_texts()),
    st.builds(codec.Quarantine, reason=text),
    st.builds(codec.AddHeader, name=text, value=text),
    st.builds(codec.InsertHeader, index=u32, name=text, value=text),
    st.builds(codec.ChangeHeader, index=u32, name=text, value=text),
    st.builds(codec.ChangeSender, sender=text, arguments=st.none() | text),
    st.builds(codec.AddRecipient, recipient=text),
    st.builds(codec.AddRecipientWithArguments, recipient=text, arguments=st.none() | text),
    st.builds(codec.DeleteRecipient, recipient=text),
    st.builds(codec.ReplaceBody, data=octets),
)


@given(st.lists(commands, min_size=1, max_size=5), st.data())
def test_commands_round_trip(packets: list[codec.Command], data: st.DataObject) -> None:
    wire = b"".join(codec.encode(p) for p in packets)
    reader = codec.command_reader()
    _feed_in_pieces(reader, wire, data)
    assert [reader.next_event() for _ in packets] == packets
    assert reader.next_event() is codec.NEED_DATA


@given(st.lists(responses, min_size=1, max_size=5), st.data())
def test_responses_round_trip(packets: list[codec.Response], data: st.DataObject) -> None:
    wire = b"".join(codec.encode(p) for p in packets)
    reader = codec.response_reader()
    _feed_in_pieces(reader, wire, data)
    assert [reader.next_event() for _ in packets] == packets
    assert reader.next_event() is codec.NEED_DATA


def _feed_in_pieces(reader: codec.PacketReader[object], wire: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    start = 0
    for cut in [*cuts, len(wire)]:
        if cut > start:  # b"" would mean end of file
            reader.receive_data(wire[start:cut])
            start = cut


@given(st.binary(max_size=200))
def test_arbitrary_octets_are_packets_or_protocol_errors(wire: bytes) -> None:
    for make in (codec.command_reader, codec.response_reader):
        reader = make()
        reader.receive_data(wire)
        reader.receive_data(b"")
        try:
            while reader.next_event() is not codec.CLOSED:
                pass
        except codec.MilterProtocolError:
            pass
