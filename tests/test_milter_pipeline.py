"""The content of a message pipelined to a milter: the same packets, one wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterpeer import HANG, Item, MilterPeer
from mmdf_smtp.milter import codec
from mmdf_smtp.milter.chain import MilterChain
from mmdf_smtp.milter.client import Milter
from mmdf_smtp.milter.codec import ActionFlag
from mmdf_smtp.milter.protocol import Action, MilterProtocol, Negotiated, State, Verdict
from mmdf_smtp.protocol.replies import Reply
from test_milter_client import BODY, HEADERS, MACROS, config, session

CONNECT = {"hostname": "client.example", "address": "192.0.2.7", "port": 40000}


async def envelope(milter: Milter | MilterChain, sender: str = "<alice@example.net>") -> None:
    await milter.mail(sender, ("SIZE=100",), MACROS)
    await milter.rcpt("<bob@example.org>", (), MACROS)
    await milter.data(MACROS)


async def pipelined(
    milter: Milter, headers: Sequence[tuple[str, str]] = HEADERS, body: bytes = BODY
) -> Verdict:
    """A session of one message, its content through message(): the final verdict."""
    await milter.connect(**CONNECT, macros=MACROS)
    await milter.helo("client.example", MACROS)
    await envelope(milter)
    verdict = await milter.message(headers, [body[:7], body[7:]], MACROS)
    return verdict


def without_negotiation(peer: MilterPeer) -> list[codec.Command]:
    return [c for c in peer.received if not isinstance(c, codec.Negotiate)]


END = [codec.AddHeader(name="X-Seen", value="yes"), codec.Continue()]


def test_the_milter_sees_what_it_sees_in_lock_step() -> None:
    async def main() -> None:
        async with (
            MilterPeer(replies={b"E": END}) as lock_step,
            MilterPeer(replies={b"E": END}) as piped,
        ):
            stepped = (await session(Milter(config(lock_step))))[-1]
            milter = Milter(config(piped))
            verdict = await pipelined(milter)
            await milter.quit()
        assert without_negotiation(piped) == without_negotiation(lock_step)
        assert verdict == stepped
        assert verdict.modifications == (codec.AddHeader(name="X-Seen", value=" yes"),)

    asyncio.run(main())


class CountingMilter(Milter):
    writes = 0

    async def _write(self, data: bytes, timeout: float) -> None:
        self.writes += 1
        await super()._write(data, timeout)


def test_one_write_for_a_message_of_one_chunk() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            milter = CountingMilter(config(peer))
            await milter.connect(**CONNECT, macros=MACROS)
            await envelope(milter)
            before = milter.writes
            verdict = await milter.message(HEADERS, [BODY], MACROS)
            assert verdict.action is Action.CONTINUE
            assert milter.writes - before == 1
            await milter.quit()

    asyncio.run(main())


def test_a_body_of_several_chunks_follows_the_end_of_headers() -> None:
    body = bytes(range(256)) * 700  # about three chunks

    async def main() -> None:
        async with MilterPeer() as peer:
            milter = Milter(config(peer))
            verdict = await pipelined(milter, body=body)
            await milter.quit()
        assert verdict.action is Action.CONTINUE
        chunks = [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)]
        assert b"".join(chunks) == body
        assert all(len(chunk) <= codec.CHUNK_SIZE for chunk in chunks) and len(chunks) == 3
        kinds = [type(c).__name__ for c in peer.commands()]
        assert kinds[-6:] == [
            "EndOfHeaders",
            "BodyChunk",
            "BodyChunk",
            "BodyChunk",
            "EndOfMessage",
            "Quit",
        ]

    asyncio.run(main())


REJECTED = Reply(code=550, enhanced="5.7.1", text="Command rejected")
TEMPFAILED = Reply(code=451, enhanced="4.7.1", text="Service unavailable - try again later")


@pytest.mark.parametrize(
    ("code", "answer", "action", "reply", "new_connection"),
    [
        (b"L", codec.Reject(), Action.REJECT, REJECTED, True),
        (b"L", codec.Discard(), Action.DISCARD, None, True),
        (b"L", codec.Accept(), Action.ACCEPT, None, True),
        (b"N", codec.TempFail(), Action.TEMPFAIL, TEMPFAILED, True),
        (
            b"B",
            codec.ReplyCode(text="554 5.7.0 no"),
            Action.REJECT,
            Reply(code=554, enhanced="5.7.0", text="no"),
            True,
        ),
        (b"E", codec.Reject(), Action.REJECT, REJECTED, False),
    ],
)
def test_an_answer_before_the_last_leaves_the_connection_for_a_new_one(
    code: bytes,
    answer: codec.Response,
    action: Action,
    reply: Reply | None,
    new_connection: bool,
) -> None:
    answered = False

    def once(command: codec.Command) -> Sequence[Item]:
        nonlocal answered
        if answered:
            return [codec.Continue()]
        answered = True
        return [answer]

    async def main() -> None:
        async with MilterPeer(replies={code: once}) as peer:
            milter = Milter(config(peer))
            verdict = await pipelined(milter)
            assert verdict.action is action and verdict.reply == reply
            await milter.abort()
            # The next transaction is asked anew and goes through.
            await envelope(milter, "<carol@example.net>")
            again = await milter.message(HEADERS, [BODY], MACROS)
            assert again.action is Action.CONTINUE
            await milter.quit()
        assert not milter.failed
        assert peer.connections == (2 if new_connection else 1)
        if new_connection:
            second = [c for c in peer.sessions[1].received]
            kinds = [type(c).__name__ for c in second if not isinstance(c, codec.DefineMacros)]
            assert kinds[:4] == ["Negotiate", "Connect", "Helo", "MailFrom"]
            # CONNECT and HELO said again, with their macros.
            assert peer.macros(b"C")[0] == peer.macros(b"C")[1]
            assert peer.macros(b"H")[0] == peer.macros(b"H")[1]

    asyncio.run(main())


def test_a_milter_that_hangs_mid_message_costs_its_timeout() -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"N": [HANG]}) as peer:
            milter = Milter(config(peer, action="reject", timeout=0.3))
            started = time.monotonic()
            verdict = await pipelined(milter)
            assert time.monotonic() - started < 3
            assert verdict.action is Action.REJECT
            assert milter.failed
            await milter.quit()

    asyncio.run(main())


def test_a_chain_stops_at_the_first_refusal_and_aborts_the_rest() -> None:
    async def main() -> None:
        async with (
            MilterPeer(replies={b"L": [codec.Continue(), codec.Reject()]}) as one,
            MilterPeer() as two,
        ):
            chain = MilterChain([config(one), config(two)])
            await chain.connect(**CONNECT, macros=MACROS)
            await envelope(chain)
            verdict = await chain.message(HEADERS, lambda: [BODY], MACROS)
            await chain.quit()
        assert verdict.action is Action.REJECT
        second = [type(c).__name__ for c in two.commands()]
        assert "Header" not in second and "Abort" in second

    asyncio.run(main())


# --- the sans-IO side: pipelined answers agree with lock-step ones ---------------------

ANSWERS = st.sampled_from(
    [
        codec.Continue(),
        codec.Continue(),
        codec.Reject(),
        codec.TempFail(),
        codec.Accept(),
        codec.Discard(),
        codec.Skip(),
    ]
)
CONTENT: list[codec.Command] = [
    codec.Header(name="From", value="a"),
    codec.Header(name="To", value="b"),
    codec.EndOfHeaders(),
    codec.BodyChunk(data=b"x\r\n"),
    codec.EndOfMessage(),
]


def in_transaction() -> MilterProtocol:
    protocol = MilterProtocol()
    protocol.negotiate()
    negotiation = codec.Negotiate(
        version=6, actions=ActionFlag(0x1FF), protocol=codec.ProtocolFlag.SKIP
    )
    protocol.receive_data(codec.encode(negotiation))
    assert isinstance(protocol.next_event(), Negotiated)
    for command in (
        codec.Connect(hostname="h", family=codec.Family.UNKNOWN),
        codec.MailFrom(sender="<a@b>"),
    ):
        protocol.begin(command)
        protocol.receive_data(codec.encode(codec.Continue()))
        protocol.next_event()
    return protocol


@given(st.lists(ANSWERS, min_size=len(CONTENT), max_size=len(CONTENT)))
def test_pipelined_verdicts_are_the_lock_step_ones_up_to_the_first_refusal(
    answers: list[codec.Response],
) -> None:
    stepped = in_transaction()
    lock_step: list[Verdict] = []
    for command, answer in zip(CONTENT, answers, strict=True):
        step = stepped.begin(command)
        if step.verdict is not None:
            lock_step.append(step.verdict)
            continue
        stepped.receive_data(codec.encode(answer))
        event = stepped.next_event()
        assert isinstance(event, Verdict)
        lock_step.append(event)
        if not event.is_continue:
            break

    piped = in_transaction()
    awaited = sum(piped.begin(c, pipelined=True).verdict is None for c in CONTENT)
    assert awaited == len(CONTENT)
    piped.receive_data(b"".join(codec.encode(a) for a in answers))
    pipelined_verdicts: list[Verdict] = []
    while len(pipelined_verdicts) < awaited:
        event = piped.next_event()
        assert isinstance(event, Verdict)
        pipelined_verdicts.append(event)
        if not event.is_continue:
            break
    # Lock-step stops sending after SKIP or ACCEPT; pipelined, all was sent.
    first_other = next(
        (i for i, a in enumerate(answers) if not isinstance(a, codec.Continue)), len(answers)
    )
    assert pipelined_verdicts[: first_other + 1] == lock_step[: first_other + 1]
    refused_early = len(pipelined_verdicts) < len(CONTENT)
    assert piped.desynchronised is refused_early
    assert (piped.state is State.CLOSED) is refused_early


def test_answers_in_several_writes_over_tcp_wait_for_no_delayed_ack() -> None:
    """A milter with Nagle's algorithm on (libmilter's) answering in two writes.

    Without an immediate acknowledgement, each message would wait out the
    kernel's delayed ACK (40 ms on Linux) before the second write left.
    """
    messages = 10

    async def main() -> float:
        replies: dict[bytes, Sequence[Item]] = {
            b"E": [codec.AddHeader(name="X-Signed", value="yes"), codec.Continue()]
        }
        async with MilterPeer(replies=replies, nagle=True) as peer:
            milter = Milter(config(peer))
            await milter.connect(**CONNECT, macros=MACROS)
            started = time.monotonic()
            for _ in range(messages):
                await envelope(milter)
                verdict = await milter.message(HEADERS, [BODY], MACROS)
                assert verdict.modifications == (codec.AddHeader(name="X-Signed", value=" yes"),)
            elapsed = time.monotonic() - started
            await milter.quit()
        return elapsed

    assert asyncio.run(main()) < messages * 0.040 / 2
