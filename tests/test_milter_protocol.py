"""The sans-IO milter conversation, header edits and the [[milters]] table, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.milter import codec
from mmdf_smtp.milter.chain import apply_header_changes
from mmdf_smtp.milter.codec import ActionFlag, MacroStage, ProtocolFlag
from mmdf_smtp.milter.config import DefaultAction, MilterConfig, SocketAddress, parse_socket
from mmdf_smtp.milter.protocol import (
    CONTINUE,
    DEFAULT_MACROS,
    Action,
    MilterProtocol,
    Negotiated,
    NegotiationError,
    Stage,
    UnexpectedResponse,
    Verdict,
    macro_name,
    message_header_value,
    milter_header_value,
    reply_from_text,
)
from mmdf_smtp.protocol.replies import Reply


def answer(**fields: object) -> codec.Negotiate:
    values: dict[str, object] = {
        "version": 6,
        "actions": ActionFlag(0),
        "protocol": ProtocolFlag(0),
    }
    values.update(fields)
    return codec.Negotiate(**values)  # type: ignore[arg-type]


def ready(reply: codec.Negotiate | None = None) -> MilterProtocol:
    protocol = MilterProtocol()
    protocol.negotiate()
    protocol.receive_data(codec.encode(reply or answer(actions=ActionFlag(0x1FF))))
    assert isinstance(protocol.next_event(), Negotiated)
    return protocol


# --- negotiation ----------------------------------------------------------------------


def test_the_offer() -> None:
    wire = MilterProtocol().negotiate()
    reader = codec.command_reader()
    reader.receive_data(wire)
    assert reader.next_event() == codec.Negotiate(
        version=6, actions=ActionFlag(0x1FF), protocol=ProtocolFlag(0x1FFFFF)
    )


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (answer(version=7), "version 7"),
        (answer(version=1), "version 1"),
        (answer(actions=ActionFlag(1 << 9)), "asks for actions"),
    ],
)
def test_negotiation_refused(reply: codec.Negotiate, message: str) -> None:
    with pytest.raises(NegotiationError, match=message):
        Negotiated.from_reply(reply)


def test_flags_not_offered_are_ignored() -> None:
    negotiated = Negotiated.from_reply(answer(protocol=ProtocolFlag(1 << 25 | 1)))
    assert negotiated.protocol == ProtocolFlag.NOCONNECT


@pytest.mark.parametrize(
    ("flags", "stage", "sends", "replies"),
    [
        (ProtocolFlag(0), Stage.CONNECT, True, True),
        (ProtocolFlag.NOCONNECT, Stage.CONNECT, False, False),
        (ProtocolFlag.NR_CONN, Stage.CONNECT, True, False),
        (ProtocolFlag.NR_HDR, Stage.HEADER, True, False),
        (ProtocolFlag.NOBODY | ProtocolFlag.NR_BODY, Stage.BODY, False, False),
        (ProtocolFlag(0x1FFFFF), Stage.END_OF_MESSAGE, True, True),
    ],
)
def test_stages_to_send_and_replies_to_expect(
    flags: ProtocolFlag, stage: Stage, sends: bool, replies: bool
) -> None:
    negotiated = Negotiated.from_reply(answer(protocol=flags))
    assert negotiated.sends(stage) is sends
    assert negotiated.expects_reply(stage) is replies


def test_old_versions_get_no_events_they_do_not_know() -> None:
    for version, unknown, data in ((2, False, False), (3, True, False), (4, True, True)):
        negotiated = Negotiated.from_reply(answer(version=version))
        assert negotiated.sends(Stage.UNKNOWN) is unknown
        assert negotiated.sends(Stage.DATA) is data
    protocol = ready(answer(version=2))
    assert protocol.begin(codec.Unknown(line="X")) == protocol.begin(codec.Data())
    assert protocol.begin(codec.Data()).data == b""


def test_macro_lists() -> None:
    assert (
        Negotiated.from_reply(answer()).macro_names(Stage.CONNECT)
        == DEFAULT_MACROS[MacroStage.CONNECT]
    )
    negotiated = Negotiated.from_reply(answer(macro_lists=((MacroStage.EOM, ("i", "mail_addr")),)))
    assert negotiated.macro_names(Stage.END_OF_MESSAGE) == ("i", "{mail_addr}")
    assert negotiated.macro_names(Stage.BODY) == ("i", "{mail_addr}")
    assert negotiated.macro_names(Stage.CONNECT) == ()
    assert negotiated.macro_names(Stage.UNKNOWN) == ()


@pytest.mark.parametrize(
    ("name", "wire"), [("j", "j"), ("_", "_"), ("{j}", "{j}"), ("client_addr", "{client_addr}")]
)
def test_macro_names(name: str, wire: str) -> None:
    assert macro_name(name) == wire


# --- the conversation ---------------------------------------------------------------


def test_begin_before_negotiation() -> None:
    with pytest.raises(RuntimeError):
        MilterProtocol().begin(codec.Helo(name="x"))


def test_an_answer_nobody_asked_for() -> None:
    protocol = ready()
    protocol.receive_data(codec.encode(codec.Continue()))
    with pytest.raises(UnexpectedResponse):
        protocol.next_event()


def test_replbody_interleaved_with_other_changes() -> None:
    protocol = ready()
    assert protocol.begin(codec.MailFrom(sender="<a@x>")).verdict is None
    protocol.receive_data(codec.encode(codec.Continue()))
    assert protocol.next_event() == CONTINUE
    assert protocol.begin(codec.EndOfMessage()).verdict is None
    for change in (
        codec.ReplaceBody(data=b"a"),
        codec.AddHeader(name="X", value="1"),
        codec.ReplaceBody(data=b"b"),
    ):
        protocol.receive_data(codec.encode(change))
    with pytest.raises(UnexpectedResponse, match="interleaved"):
        protocol.next_event()


@pytest.mark.parametrize("name", ["", "Bad:Name"])
def test_header_change_with_a_bad_name(name: str) -> None:
    protocol = ready()
    protocol.begin(codec.EndOfMessage())
    protocol.receive_data(codec.encode(codec.ChangeHeader(index=1, name=name, value="v")))
    with pytest.raises(UnexpectedResponse):
        protocol.next_event()


def test_skip_holds_until_another_stage() -> None:
    protocol = ready()
    protocol.begin(codec.Header(name="A", value=" 1"))
    protocol.receive_data(codec.encode(codec.Skip()))
    assert protocol.next_event() == CONTINUE
    assert protocol.begin(codec.Header(name="B", value=" 2")).data == b""
    step = protocol.begin(codec.EndOfHeaders())
    assert step.verdict is None and step.data.endswith(codec.encode(codec.EndOfHeaders()))


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("550 5.7.1 No", Reply(code=550, enhanced="5.7.1", text="No")),
        ("550 No", Reply(code=550, enhanced="", text="No")),
        ("450 4.2.0", Reply(code=450, enhanced="4.2.0", text="")),
        (
            "550-5.7.1 a\r\n550-b\r\n550 5.7.1 c",
            Reply(code=550, enhanced="5.7.1", text="a\nb\nc"),
        ),
        (
            "554 5.7.1 100%% sure, 5% less",
            Reply(code=554, enhanced="5.7.1", text="100% sure, 5less"),
        ),
    ],
)
def test_reply_from_text(text: str, reply: Reply) -> None:
    assert reply_from_text(text) == reply


def test_a_refusal_as_a_verdict() -> None:
    protocol = ready()
    protocol.begin(codec.RcptTo(recipient="<a@x>"))
    protocol.receive_data(codec.encode(codec.ReplyCode(text="452 4.5.3 Too many")))
    assert protocol.next_event() == Verdict(
        action=Action.TEMPFAIL, reply=Reply(code=452, enhanced="4.5.3", text="Too many")
    )
    # A refusal of one recipient leaves the conversation as it was.
    assert protocol.begin(codec.RcptTo(recipient="<b@x>")).verdict is None


# --- header values and edits ---------------------------------------------------------

values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r"))


@given(values, st.booleans())
def test_header_value_round_trip(value: str, leading_space: bool) -> None:
    in_message = message_header_value(value, leading_space=leading_space)
    assert "\n" not in in_message.replace("\r\n", "")
    assert milter_header_value(in_message, leading_space=leading_space) == value


def test_header_values_with_and_without_leading_space() -> None:
    assert milter_header_value(" a\r\n\tb", leading_space=False) == "a\n\tb"
    assert milter_header_value(" a", leading_space=True) == " a"
    assert milter_header_value("\ta", leading_space=False) == "\ta"
    assert message_header_value("a\n\tb", leading_space=False) == " a\r\n\tb"
    assert message_header_value("a", leading_space=True) == "a"


HEADER = [
    ("Received", " from a"),
    ("Subject", " one"),
    ("X-Tag", " 1"),
    ("subject", " two"),
    ("X-Tag", " 2"),
]


@pytest.mark.parametrize(
    ("change", "result"),
    [
        (codec.AddHeader(name="X-New", value=" n"), [*HEADER, ("X-New", " n")]),
        (codec.InsertHeader(index=0, name="X-New", value=" n"), [("X-New", " n"), *HEADER]),
        (
            codec.InsertHeader(index=2, name="X-New", value=" n"),
            [*HEADER[:2], ("X-New", " n"), *HEADER[2:]],
        ),
        (codec.InsertHeader(index=99, name="X-New", value=" n"), [*HEADER, ("X-New", " n")]),
        (
            codec.ChangeHeader(index=2, name="SUBJECT", value=" new"),
            [*HEADER[:3], ("SUBJECT", " new"), HEADER[4]],
        ),
        (
            codec.ChangeHeader(index=0, name="Subject", value=" new"),
            [HEADER[0], ("Subject", " new"), *HEADER[2:]],
        ),
        (codec.ChangeHeader(index=1, name="X-Tag", value=""), [*HEADER[:2], *HEADER[3:]]),
        (codec.ChangeHeader(index=2, name="X-Tag", value=""), HEADER[:4]),
        (codec.ChangeHeader(index=3, name="X-Tag", value=""), HEADER),
        (codec.ChangeHeader(index=3, name="X-Tag", value=" 3"), [*HEADER, ("X-Tag", " 3")]),
        (codec.AddRecipient(recipient="<a@x>"), HEADER),
    ],
)
def test_header_changes(change: codec.Modification, result: list[tuple[str, str]]) -> None:
    assert apply_header_changes(HEADER, [change]) == result


def test_header_changes_apply_in_order() -> None:
    changes = [
        codec.InsertHeader(index=0, name="X-A", value=" a"),
        codec.ChangeHeader(index=1, name="x-a", value=" b"),
        codec.ChangeHeader(index=1, name="Subject", value=""),
        codec.ChangeHeader(index=1, name="Subject", value=""),
    ]
    assert apply_header_changes(HEADER, changes) == [
        ("x-a", " b"),
        *HEADER[:1],
        *HEADER[2:3],
        HEADER[4],
    ]


names = st.sampled_from(["A", "a", "B", "Subject", "X-Y"])
fields = st.lists(st.tuples(names, st.text(max_size=5)), max_size=8)


@given(fields, names, st.integers(0, 10))
def test_delete_removes_exactly_that_occurrence(
    header: list[tuple[str, str]], name: str, index: int
) -> None:
    result = apply_header_changes(header, [codec.ChangeHeader(index=index, name=name, value="")])
    same_name = [i for i, (n, _) in enumerate(header) if n.lower() == name.lower()]
    position = max(index, 1) - 1
    if position < len(same_name):
        expected = header[: same_name[position]] + header[same_name[position] + 1 :]
        assert result == expected
    else:
        assert result == header


@given(fields, names, st.integers(0, 10))
def test_change_keeps_everything_else(header: list[tuple[str, str]], name: str, index: int) -> None:
    change = codec.ChangeHeader(index=index, name=name, value=" new")
    result = apply_header_changes(header, [change])
    same_name = [i for i, (n, _) in enumerate(header) if n.lower() == name.lower()]
    position = max(index, 1) - 1
    if position < len(same_name):
        assert len(result) == len(header)
        assert result[same_name[position]] == (name, " new")
        assert [f for i, f in enumerate(result) if i != same_name[position]] == [
            f for i, f in enumerate(header) if i != same_name[position]
        ]
    else:
        assert result == [*header, (name, " new")]


@given(fields, st.integers(0, 2**32 - 1))
def test_insert_lands_at_its_index(header: list[tuple[str, str]], index: int) -> None:
    result = apply_header_changes(header, [codec.InsertHeader(index=index, name="N", value="v")])
    at = min(index, len(header))
    assert result[at] == ("N", "v")
    assert result[:at] + result[at + 1 :] == header


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("inet:127.0.0.1:8891", SocketAddress(kind="inet", host="127.0.0.1", port=8891)),
        ("inet:localhost:8891", SocketAddress(kind="inet", host="localhost", port=8891)),
        ("inet:8891@127.0.0.1", SocketAddress(kind="inet", host="127.0.0.1", port=8891)),
        ("inet6:[::1]:8891", SocketAddress(kind="inet6", host="::1", port=8891)),
        ("inet6:::1:8891", SocketAddress(kind="inet6", host="::1", port=8891)),
        ("inet6:8891@::1", SocketAddress(kind="inet6", host="::1", port=8891)),
        ("unix:/run/milter.sock", SocketAddress(kind="unix", path="/run/milter.sock")),
        ("local:/run/milter.sock", SocketAddress(kind="unix", path="/run/milter.sock")),
    ],
)
def test_socket_forms(text: str, address: SocketAddress) -> None:
    assert parse_socket(text) == address


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "socket = None"),
        ({"socket": 8891}, "socket = 8891"),
        ({"socket": "127.0.0.1:8891"}, "unknown transport"),
        ({"socket": "tcp:127.0.0.1:8891"}, "unknown transport"),
        ({"socket": "inet:127.0.0.1"}, "no port"),
        ({"socket": "inet:host:0"}, "port '0'"),
        ({"socket": "inet:host:65536"}, "port '65536'"),
        ({"socket": "inet::8891"}, "no host"),
        ({"socket": "inet6:[example.org]:8891"}, "not an IPv6 address"),
        ({"socket": "unix:"}, "expected inet:host:port"),
        ({"socket": "inet:h:1", "default_action": "bounce"}, "default_action = 'bounce'"),
        ({"socket": "inet:h:1", "command_timeout": 0}, "command_timeout = 0"),
        ({"socket": "inet:h:1", "connect_timeout": "30s"}, "connect_timeout = '30s'"),
        ({"socket": "inet:h:1", "content_timeout": True}, "content_timeout = True"),
        ({"socket": "inet:h:1", "content_timeout": float("inf")}, "content_timeout = inf"),
        ({"socket": "inet:h:1", "macros": []}, "unknown key(s) macros"),
    ],
)
def test_bad_tables(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MilterConfig.from_table(table)


def test_a_good_table_and_the_defaults() -> None:
    assert MilterConfig.from_table({"socket": "inet:127.0.0.1:8891"}) == MilterConfig(
        socket="inet:127.0.0.1:8891",
        default_action=DefaultAction.TEMPFAIL,
        connect_timeout=30,
        command_timeout=30,
        content_timeout=300,
    )
    config = MilterConfig.from_table(
        {"socket": "unix:/run/m", "default_action": "accept", "command_timeout": 2.5}
    )
    assert config.default_action is DefaultAction.ACCEPT
    assert config.command_timeout == 2.5
    assert str(config.address) == "unix:/run/m"
