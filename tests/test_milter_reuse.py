"""Milter connections kept across SMTP sessions with SMFIC_QUIT_NC, over real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

import pytest

from milterpeer import CLOSE, Item, MilterPeer
from mmdf_smtp.milter import Action, DefaultAction, Milter, MilterConfig, codec
from mmdf_smtp.milter.client import close_idle_connections, idle_connections
from mmdf_smtp.milter.codec import ActionFlag
from mmdf_smtp.milter.protocol import MilterProtocol, Negotiated
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
