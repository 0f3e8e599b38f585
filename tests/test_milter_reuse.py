"""Milter connections kept across SMTP sessions with SMFIC_QUIT_NC, over real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterpeer import CLOSE, Item, MilterPeer
from mmdf_smtp.milter import codec
from mmdf_smtp.milter.client import Milter, close_idle_connections, idle_connections
from mmdf_smtp.milter.codec import ActionFlag, ProtocolFlag
from mmdf_smtp.milter.config import DefaultAction, MilterConfig
from mmdf_smtp.milter.protocol import Action, MilterProtocol, Negotiated
from test_milter_client import config as unpooled_config
from test_milter_client import session


def config(peer: MilterPeer, action: str = "tempfail", timeout: float = 5.0) -> MilterConfig:
    """A milter whose connections are kept for the next session (``reuse = true``)."""
    return replace(unpooled_config(peer, action, timeout), reuse=True)


def kinds(commands: Sequence[codec.Command]) -> list[str]:
    return [type(c).__name__ for c in commands if not isinstance(c, codec.DefineMacros)]


WHOLE = [
    "Connect",
    "Helo",
    "MailFrom",
    "RcptTo",
    "Data",
    "Header",
    "Header",
    "Header",
    "EndOfHeaders",
    "BodyChunk",
    "EndOfMessage",
]


def test_two_sessions_share_one_connection() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            first = await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 1
            second = await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 1
        assert all(v.action is Action.CONTINUE for v in first + second)
        assert peer.connections == 1
        assert [s.connection for s in peer.sessions] == [0, 0]
        # Negotiated once; the second session starts at CONNECT.
        assert kinds(peer.sessions[0].received) == ["Negotiate", *WHOLE, "QuitNewConnection"]
        assert kinds(peer.sessions[1].received) == [*WHOLE, "QuitNewConnection"]
        # Every session gets its own connect macros again.
        assert len(peer.macros(b"C")) == 2

    asyncio.run(main())


def test_kept_connections_are_closed_at_shutdown() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 1
            conversations = list(peer._tasks)
            close_idle_connections()
            assert idle_connections(peer.socket) == 0
            # The milter sees its connection end (it would wait for more otherwise).
            _, pending = await asyncio.wait(conversations, timeout=10)
            assert not pending
        assert peer.sessions[0].closed_by_mta

    asyncio.run(main())


def test_a_milter_below_version_6_gets_a_new_connection_each_session() -> None:
    async def main() -> None:
        async with MilterPeer(version=5) as peer:
            await session(Milter(config(peer)))
            await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 0
        assert peer.connections == 2
        assert [kinds(s.received)[-1] for s in peer.sessions] == ["Quit", "Quit"]

    asyncio.run(main())


def test_reuse_off_gives_each_session_its_own_connection() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            unpooled = MilterConfig(socket=peer.socket, reuse=False)
            await session(Milter(unpooled))
            await session(Milter(unpooled))
        assert peer.connections == 2
        assert [kinds(s.received)[0] for s in peer.sessions] == ["Negotiate", "Negotiate"]

    asyncio.run(main())


@pytest.mark.parametrize(
    "end",
    [codec.Reject(), codec.TempFail(), codec.Accept(), codec.Discard()],
    ids=["reject", "tempfail", "accept", "discard"],
)
def test_after_any_answer_but_continue_at_end_of_message_the_session_quits(
    end: codec.Response,
) -> None:
    """libmilter takes QUIT_NC only after an end of message it answered CONTINUE."""

    async def main() -> None:
        async with MilterPeer(replies={b"E": [end]}) as peer:
            await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 0
        assert kinds(peer.sessions[0].received)[-2:] == ["EndOfMessage", "Quit"]

    asyncio.run(main())


def test_a_session_without_a_message_quits() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            milter = Milter(config(peer))
            await milter.connect(hostname="client.example", address="192.0.2.7", port=1)
            await milter.helo("client.example")
            await milter.mail("<alice@example.net>")
            await milter.abort()
            await milter.quit()
            assert idle_connections(peer.socket) == 0
        assert kinds(peer.sessions[0].received)[-2:] == ["Abort", "Quit"]

    asyncio.run(main())


def test_a_connection_that_broke_is_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"E": [CLOSE]}) as peer:
            verdicts = await session(Milter(config(peer)))
            assert verdicts[-1].action is Action.TEMPFAIL
            assert idle_connections(peer.socket) == 0
            await session(Milter(config(peer)))
        assert peer.connections == 2

    with caplog.at_level(logging.WARNING, "mmdf_smtp.milter"):
        asyncio.run(main())
    assert len(caplog.records) == 2  # one for each broken session


def test_a_kept_connection_the_milter_dropped_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The milter closes the kept connection as the next session starts: a new one, no failure."""
    connects = 0

    def at_connect(command: codec.Command) -> Sequence[Item]:
        nonlocal connects
        connects += 1
        return [CLOSE] if connects == 2 else [codec.Continue()]

    async def main() -> None:
        async with MilterPeer(replies={b"C": at_connect}) as peer:
            await session(Milter(config(peer)))
            verdicts = await session(Milter(config(peer)))
        assert all(v.action is Action.CONTINUE for v in verdicts)
        assert peer.connections == 2
        assert kinds(peer.sessions[-1].received) == ["Negotiate", *WHOLE, "QuitNewConnection"]

    with caplog.at_level(logging.WARNING, "mmdf_smtp.milter"):
        asyncio.run(main())
    assert caplog.records == []


def test_a_milter_that_closes_at_quit_nc_costs_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with MilterPeer(quit_nc=False) as peer:
            for _ in range(3):
                verdicts = await session(Milter(config(peer)))
                assert all(v.action is Action.CONTINUE for v in verdicts)
        assert peer.connections == 3

    with caplog.at_level(logging.WARNING, "mmdf_smtp.milter"):
        asyncio.run(main())
    assert caplog.records == []


def test_a_dead_milter_still_gets_the_default_action() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            await session(Milter(config(peer, action="reject")))
        # The peer is gone; its kept connection with it.
        verdicts = await session(Milter(config(peer, action="reject")))
        assert verdicts[0].action is Action.REJECT

    asyncio.run(main())


# A milter with no callback for unknown commands, as libmilter tells the MTA.
NO_UNKNOWN = ProtocolFlag.NOUNKNOWN


@pytest.mark.parametrize(
    "end",
    [codec.Accept(), codec.Reject(), codec.TempFail(), codec.Discard()],
    ids=["accept", "reject", "tempfail", "discard"],
)
def test_after_any_end_of_message_unknown_then_quit_nc_keeps_the_connection(
    end: codec.Response,
) -> None:
    """libmilter takes QUIT_NC right after an UNKNOWN, whatever state it was in."""

    async def main() -> None:
        async with MilterPeer(replies={b"E": [end]}, protocol=NO_UNKNOWN) as peer:
            first = await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 1
            second = await session(Milter(config(peer)))
        assert first[-1].action is second[-1].action
        assert all(v.action is Action.CONTINUE for v in first[:-1] + second[:-1])
        assert peer.connections == 1
        ending = ["EndOfMessage", "Unknown", "QuitNewConnection"]
        assert kinds(peer.sessions[0].received)[-3:] == ending
        # The UNKNOWN's answer was read and dropped: the second session is in step.
        assert kinds(peer.sessions[1].received) == [*WHOLE, "Unknown", "QuitNewConnection"]
        assert len(peer.macros(b"C")) == 2

    asyncio.run(main())


def test_a_session_without_a_message_keeps_the_connection_through_unknown() -> None:
    async def main() -> None:
        async with MilterPeer(protocol=NO_UNKNOWN) as peer:
            milter = Milter(config(peer))
            await milter.connect(hostname="client.example", address="192.0.2.7", port=1)
            await milter.helo("client.example")
            await milter.mail("<alice@example.net>")
            await milter.abort()
            await milter.quit()
            assert idle_connections(peer.socket) == 1
            verdicts = await session(Milter(config(peer)))
        assert all(v.action is Action.CONTINUE for v in verdicts)
        assert peer.connections == 1
        assert kinds(peer.sessions[0].received)[-3:] == ["Abort", "Unknown", "QuitNewConnection"]

    asyncio.run(main())


def test_no_answer_is_owed_to_an_unknown_the_milter_does_not_answer() -> None:
    async def main() -> None:
        flags = NO_UNKNOWN | ProtocolFlag.NR_UNKN
        async with MilterPeer(replies={b"E": [codec.Accept()]}, protocol=flags) as peer:
            for _ in range(3):
                verdicts = await session(Milter(config(peer, timeout=10)))
                assert verdicts[-1].action is Action.ACCEPT
        assert peer.connections == 1
        assert len(peer.sessions) == 3

    asyncio.run(main())


@pytest.mark.parametrize(
    "answer",
    [codec.Reject(), codec.ReplyCode(text="550 5.7.1 no"), codec.Skip()],
    ids=["reject", "replycode", "skip"],
)
def test_whatever_the_unknown_is_answered_the_next_session_goes_on(
    answer: codec.Response,
) -> None:
    async def main() -> None:
        replies: dict[bytes, Sequence[Item]] = {b"E": [codec.Accept()], b"U": [answer]}
        async with MilterPeer(replies=replies, protocol=NO_UNKNOWN) as peer:
            await session(Milter(config(peer)))
            verdicts = await session(Milter(config(peer)))
        assert all(v.action is Action.CONTINUE for v in verdicts[:-1])
        assert peer.connections == 1

    asyncio.run(main())


def test_a_shutdown_for_the_unknown_costs_a_new_connection_and_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        replies: dict[bytes, Sequence[Item]] = {
            b"E": [codec.Accept()],
            b"U": [codec.Shutdown()],
        }
        async with MilterPeer(replies=replies, protocol=NO_UNKNOWN) as peer:
            await session(Milter(config(peer)))
            verdicts = await session(Milter(config(peer)))
        assert all(v.action is Action.CONTINUE for v in verdicts[:-1])
        assert peer.connections == 2

    with caplog.at_level(logging.WARNING, "mmdf_smtp.milter"):
        asyncio.run(main())
    assert caplog.records == []


def test_a_milter_that_sees_unknown_commands_is_not_sent_one_to_keep_its_connection() -> None:
    """Without SMFIP_NOUNKNOWN the UNKNOWN would reach the milter's own code: QUIT."""

    async def main() -> None:
        async with MilterPeer(replies={b"E": [codec.Accept()]}) as peer:
            await session(Milter(config(peer)))
            assert idle_connections(peer.socket) == 0
        assert kinds(peer.sessions[0].received)[-2:] == ["EndOfMessage", "Quit"]

    asyncio.run(main())


# --- the sans-IO side ------------------------------------------------------------------


def negotiated(version: int = 6) -> MilterProtocol:
    protocol = MilterProtocol()
    protocol.negotiate()
    protocol.receive_data(
        codec.encode(
            codec.Negotiate(
                version=version, actions=ActionFlag(0x1FF), protocol=codec.ProtocolFlag(0)
            )
        )
    )
    assert isinstance(protocol.next_event(), Negotiated)
    return protocol


def through_end_of_message(protocol: MilterProtocol, answer: codec.Response) -> None:
    for command in (
        codec.Connect(hostname="h", family=codec.Family.UNKNOWN),
        codec.MailFrom(sender="<a@b>"),
        codec.EndOfMessage(),
    ):
        step = protocol.begin(command)
        assert step.verdict is None
        protocol.receive_data(
            codec.encode(answer if command == codec.EndOfMessage() else codec.Continue())
        )
        protocol.next_event()


@pytest.mark.parametrize(
    ("version", "answer", "reusable"),
    [
        (6, codec.Continue(), True),
        (5, codec.Continue(), False),
        (6, codec.Accept(), False),
        (6, codec.Reject(), False),
        (6, codec.Discard(), False),
    ],
)
def test_reusable_only_after_a_clean_end_of_message(
    version: int, answer: codec.Response, reusable: bool
) -> None:
    protocol = negotiated(version)
    assert not protocol.reusable
    through_end_of_message(protocol, answer)
    assert protocol.reusable is reusable
    if reusable:
        assert protocol.abort() == b""  # RSET after the message: nothing sent, still clean
        assert protocol.reusable
        assert protocol.quit_new_connection() == codec.encode(codec.QuitNewConnection())
        assert not protocol.reusable


def test_a_new_transaction_is_not_a_clean_end() -> None:
    protocol = negotiated()
    through_end_of_message(protocol, codec.Continue())
    protocol.begin(codec.MailFrom(sender="<a@b>"))
    protocol.receive_data(codec.encode(codec.Continue()))
    protocol.next_event()
    assert not protocol.reusable
    protocol.abort()
    assert not protocol.reusable


def test_resume_skips_negotiation() -> None:
    first = negotiated()
    assert first.negotiated is not None
    second = MilterProtocol()
    second.resume(first.negotiated)
    step = second.begin(codec.Connect(hostname="h", family=codec.Family.UNKNOWN))
    assert step.data.endswith(
        codec.encode(codec.Connect(hostname="h", family=codec.Family.UNKNOWN))
    )
    with pytest.raises(RuntimeError):
        second.resume(first.negotiated)


def test_the_reuse_key() -> None:
    # Off unless asked: a milter that claims version 6 but ignores QUIT_NC
    # would hold each following session for command_timeout.
    assert MilterConfig.from_table({"socket": "inet:127.0.0.1:1"}).reuse is False
    assert MilterConfig.from_table({"socket": "inet:127.0.0.1:1", "reuse": True}).reuse is True
    assert MilterConfig.from_table({"socket": "inet:127.0.0.1:1", "reuse": False}).reuse is False
    with pytest.raises(ValueError, match="reuse"):
        MilterConfig.from_table({"socket": "inet:127.0.0.1:1", "reuse": "yes"})
    assert MilterConfig(socket="unix:/x", default_action=DefaultAction.ACCEPT).reuse is False


def negotiated_without_unknown(no_reply: bool = False) -> MilterProtocol:
    protocol = MilterProtocol()
    protocol.negotiate()
    flags = ProtocolFlag.NOUNKNOWN | (ProtocolFlag.NR_UNKN if no_reply else ProtocolFlag(0))
    protocol.receive_data(
        codec.encode(codec.Negotiate(version=6, actions=ActionFlag(0x1FF), protocol=flags))
    )
    assert isinstance(protocol.next_event(), Negotiated)
    return protocol


@pytest.mark.parametrize("no_reply", [False, True])
@pytest.mark.parametrize(
    "answer",
    [codec.Continue(), codec.Accept(), codec.Reject(), codec.TempFail(), codec.Discard()],
)
def test_unknown_then_quit_nc_after_any_end_of_message(
    answer: codec.Response, no_reply: bool
) -> None:
    protocol = negotiated_without_unknown(no_reply)
    through_end_of_message(protocol, answer)
    assert protocol.reusable
    data = protocol.quit_new_connection()
    clean = isinstance(answer, codec.Continue)
    unknown = b"" if clean else codec.encode(codec.Unknown(line="QUIT"))
    assert data == unknown + codec.encode(codec.QuitNewConnection())
    assert protocol.owed == (0 if clean or no_reply else 1)
    assert not protocol.reusable


def test_not_reusable_inside_a_transaction() -> None:
    protocol = negotiated_without_unknown()
    through_end_of_message(protocol, codec.Accept())
    protocol.begin(codec.MailFrom(sender="<a@b>"))
    protocol.receive_data(codec.encode(codec.Continue()))
    protocol.next_event()
    assert not protocol.reusable
    assert protocol.abort() == codec.encode(codec.Abort())
    assert protocol.reusable


_OWED = st.sampled_from(
    [
        codec.Continue(),
        codec.Accept(),
        codec.Reject(),
        codec.TempFail(),
        codec.Discard(),
        codec.Skip(),
        codec.ReplyCode(text="451 4.3.0 later"),
        codec.Progress(),
    ]
)


@given(
    owed=st.lists(_OWED, max_size=4).map(lambda answers: [*answers, codec.Continue()]),
    connect_answer=st.sampled_from([codec.Continue(), codec.Reject(), codec.Accept()]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_owed_answers_are_dropped_before_the_first_of_the_next_conversation(
    owed: list[codec.Response], connect_answer: codec.Response, cuts: list[int]
) -> None:
    """However the octets are cut, the next conversation's first verdict is CONNECT's."""
    first = negotiated_without_unknown()
    assert first.negotiated is not None
    count = sum(not isinstance(a, codec.Progress) for a in owed)
    protocol = MilterProtocol()
    protocol.resume(first.negotiated, owed=count)
    step = protocol.begin(codec.Connect(hostname="h", family=codec.Family.UNKNOWN))
    assert step.verdict is None
    wire = b"".join(codec.encode(a) for a in [*owed, connect_answer])
    verdicts = []
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(wire)), len(wire)]:
        if cut <= start:
            continue  # b"" would mean end of file
        protocol.receive_data(wire[start:cut])
        start = cut
        while (event := protocol.next_event()) is not codec.NEED_DATA:
            verdicts.append(event)
    assert protocol.owed == 0
    expected = {
        codec.Continue: Action.CONTINUE,
        codec.Reject: Action.REJECT,
        codec.Accept: Action.ACCEPT,
    }[type(connect_answer)]
    assert [v.action for v in verdicts if not isinstance(v, Negotiated)] == [expected]


def test_a_shutdown_for_the_unknown_breaks_the_next_conversation() -> None:
    first = negotiated_without_unknown()
    assert first.negotiated is not None
    protocol = MilterProtocol()
    protocol.resume(first.negotiated, owed=1)
    protocol.begin(codec.Connect(hostname="h", family=codec.Family.UNKNOWN))
    protocol.receive_data(codec.encode(codec.Shutdown()))
    with pytest.raises(codec.MilterProtocolError):
        protocol.next_event()
