"""The milter client over real sockets, against the scripted filter in milterpeer.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from milterpeer import CLOSE, HANG, Delay, Item, MilterPeer
from mmdf_smtp.milter import codec
from mmdf_smtp.milter.chain import MilterChain
from mmdf_smtp.milter.client import Milter
from mmdf_smtp.milter.codec import ActionFlag, Family, MacroStage, ProtocolFlag
from mmdf_smtp.milter.config import DefaultAction, MilterConfig
from mmdf_smtp.milter.protocol import Action, Verdict
from mmdf_smtp.protocol.replies import Reply

MACROS = {
    "j": "mx.example.org",
    "{daemon_name}": "smtpd",
    "_": "client.example [192.0.2.7]",
    "client_addr": "192.0.2.7",  # bare names are accepted too
    "{client_name}": "client.example",
    "{client_port}": "40000",
    "i": "Q1234",
    "{mail_addr}": "alice@example.net",
    "{rcpt_addr}": "bob@example.org",
    "{tls_version}": "TLSv1.3",
    "{unlisted}": "never sent",
}

HEADERS = [("From", " alice@example.net"), ("Subject", " hello\r\n\tworld"), ("To", " bob")]
BODY = b"line one\r\nline two\r\n"


def config(peer: MilterPeer, action: str = "tempfail", timeout: float = 5.0) -> MilterConfig:
    return MilterConfig(
        socket=peer.socket,
        default_action=DefaultAction(action),
        connect_timeout=timeout,
        command_timeout=timeout,
        content_timeout=timeout,
    )


async def session(
    milter: Milter | MilterChain,
    *,
    headers: Sequence[tuple[str, str]] = HEADERS,
    body: bytes = BODY,
    recipients: Sequence[str] = ("<bob@example.org>",),
) -> list[Verdict]:
    """One SMTP session's stages in order; the verdict of each."""
    verdicts = [
        await milter.connect(
            hostname="client.example", address="192.0.2.7", port=40000, macros=MACROS
        ),
        await milter.helo("client.example", MACROS),
        await milter.mail("<alice@example.net>", ("SIZE=100",), MACROS),
    ]
    verdicts += [await milter.rcpt(r, (), MACROS) for r in recipients]
    verdicts.append(await milter.data(MACROS))
    verdicts += [await milter.header(n, v, MACROS) for n, v in headers]
    verdicts.append(await milter.end_of_headers(MACROS))
    verdicts.append(await milter.body(body, MACROS))
    verdicts.append(await milter.end_of_message(MACROS))
    await milter.quit()
    return verdicts


def run(coroutine: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coroutine())  # type: ignore[arg-type]


def test_a_whole_session_as_the_milter_sees_it() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            verdicts = await session(Milter(config(peer)))
            await peer.ended.wait()
        assert all(v.action is Action.CONTINUE for v in verdicts)
        assert peer.commands() == [
            codec.Negotiate(version=6, actions=ActionFlag(0x1FF), protocol=ProtocolFlag(0x1FFFFF)),
            codec.Connect(
                hostname="client.example", family=Family.INET, port=40000, address="192.0.2.7"
            ),
            codec.Helo(name="client.example"),
            codec.MailFrom(sender="<alice@example.net>", arguments=("SIZE=100",)),
            codec.RcptTo(recipient="<bob@example.org>"),
            codec.Data(),
            # Without SMFIP_HDR_LEADSPC the space after the colon is left out,
            # and folded lines are separated by LF, as Sendmail sends them.
            codec.Header(name="From", value="alice@example.net"),
            codec.Header(name="Subject", value="hello\n\tworld"),
            codec.Header(name="To", value="bob"),
            codec.EndOfHeaders(),
            codec.BodyChunk(data=BODY),
            codec.EndOfMessage(),
            # Right after an end of message answered CONTINUE, a version 6
            # milter's connection is kept for the next session.
            codec.Quit(),
        ]
        # Postfix's default macros, in its order, those with a value only.
        assert peer.macros(b"C") == [
            {
                "j": "mx.example.org",
                "{daemon_name}": "smtpd",
                "_": "client.example [192.0.2.7]",
                "{client_addr}": "192.0.2.7",
                "{client_name}": "client.example",
                "{client_port}": "40000",
            }
        ]
        assert list(peer.macros(b"C")[0]) == [
            "j",
            "{daemon_name}",
            "_",
            "{client_addr}",
            "{client_name}",
            "{client_port}",
        ]
        assert peer.macros(b"H") == [{"{tls_version}": "TLSv1.3"}]
        assert peer.macros(b"M") == [{"i": "Q1234", "{mail_addr}": "alice@example.net"}]
        assert peer.macros(b"R") == [{"{rcpt_addr}": "bob@example.org"}]
        assert peer.macros(b"T") == [{"i": "Q1234"}]
        assert peer.macros(b"L") == [{"i": "Q1234"}] * 3
        assert peer.macros(b"N") == [{"i": "Q1234"}]
        # Body chunks get the end-of-message macros, as in Postfix.
        assert peer.macros(b"B") == peer.macros(b"E") == [{"i": "Q1234"}]
        assert peer.sessions[0].closed_by_mta

    run(main)


REJECTED = Reply(code=550, enhanced="5.7.1", text="Command rejected")
TEMPFAILED = Reply(code=451, enhanced="4.7.1", text="Service unavailable - try again later")


@pytest.mark.parametrize(
    ("code", "items", "action", "reply"),
    [
        (b"M", [codec.Reject()], Action.REJECT, REJECTED),
        (b"R", [codec.TempFail()], Action.TEMPFAIL, TEMPFAILED),
        (b"T", [codec.Reject()], Action.REJECT, REJECTED),
        (
            b"R",
            [codec.ReplyCode(text="550 5.1.1 <bob@example.org>: no such user")],
            Action.REJECT,
            Reply(code=550, enhanced="5.1.1", text="<bob@example.org>: no such user"),
        ),
        (
            b"E",
            [codec.ReplyCode(text="451-4.7.1 greylisted\r\n451 4.7.1 come back in 5 min, 100%%")],
            Action.TEMPFAIL,
            Reply(code=451, enhanced="4.7.1", text="greylisted\ncome back in 5 min, 100%"),
        ),
        (
            b"N",
            [codec.ReplyCode(text="554 no enhanced code")],
            Action.REJECT,
            Reply(code=554, enhanced="", text="no enhanced code"),
        ),
        (b"L", [codec.Discard()], Action.DISCARD, None),
        (b"E", [codec.Discard()], Action.DISCARD, None),
        (
            b"B",
            [codec.Shutdown()],
            Action.SHUTDOWN,
            Reply(code=421, enhanced="4.7.0", text="Server closing connection"),
        ),
    ],
)
def test_each_reply(code: bytes, items: list[Item], action: Action, reply: Reply | None) -> None:
    async def main() -> None:
        async with MilterPeer(replies={code: items}) as peer:
            milter = Milter(config(peer))
            verdicts = await session(milter)
        final = [v for v in verdicts if not v.is_continue]
        assert final[0].action is action
        assert final[0].reply == reply

    run(main)


def test_multi_line_reply_reaches_the_client_as_sent() -> None:
    async def main() -> None:
        text = "550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 last line"
        async with MilterPeer(replies={b"E": [codec.ReplyCode(text=text)]}) as peer:
            verdicts = await session(Milter(config(peer)))
        reply = verdicts[-1].reply
        assert reply is not None
        assert reply.to_bytes() == (text + "\r\n").encode()

    run(main)


def test_accept_excuses_the_milter_for_the_rest_of_the_message() -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"R": [codec.Accept()]}) as peer:
            milter = Milter(config(peer))
            verdicts = await session(milter, recipients=("<a@x>", "<b@x>"))
        assert [v.action for v in verdicts[3:]] == [Action.ACCEPT, *[Action.CONTINUE] * 8]
        names = [type(c).__name__ for c in peer.commands()]
        assert names == ["Negotiate", "Connect", "Helo", "MailFrom", "RcptTo", "Quit"]

    run(main)


def test_after_accept_the_next_transaction_is_filtered_again() -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"M": [codec.Accept()]}) as peer:
            milter = Milter(config(peer))
            await milter.connect(hostname="c", address="127.0.0.1", port=1)
            assert (await milter.mail("<a@x>")).action is Action.ACCEPT
            assert (await milter.rcpt("<b@x>")).action is Action.CONTINUE
            await milter.abort()
            peer.replies = {}
            assert (await milter.mail("<c@x>")).action is Action.CONTINUE
            assert (await milter.rcpt("<d@x>")).action is Action.CONTINUE
            await milter.quit()
            await peer.ended.wait()
        names = [type(c).__name__ for c in peer.commands()]
        # No RCPT for the transaction it had accepted; its ABORT, as Postfix sends.
        assert names == ["Negotiate", "Connect", "MailFrom", "Abort", "MailFrom", "RcptTo", "Quit"]

    run(main)


def test_abort_between_transactions() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            milter = Milter(config(peer))
            await milter.connect(hostname="c", address="127.0.0.1", port=1)
            await milter.abort()  # no transaction: nothing sent
            await milter.mail("<a@x>")
            await milter.abort()
            await milter.abort()
            await milter.quit()
            await peer.ended.wait()
        names = [type(c).__name__ for c in peer.commands()]
        assert names == ["Negotiate", "Connect", "MailFrom", "Abort", "Quit"]

    run(main)


@pytest.mark.parametrize(
    ("item", "action", "reply"),
    [
        (codec.Reject(), Action.REJECT, REJECTED),
        (codec.TempFail(), Action.TEMPFAIL, TEMPFAILED),
        (
            codec.ReplyCode(text="554 5.7.1 go away"),
            Action.REJECT,
            Reply(code=554, enhanced="5.7.1", text="go away"),
        ),
    ],
)
def test_refusal_at_connect_answers_the_whole_session(
    item: codec.Response, action: Action, reply: Reply
) -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"C": [item]}) as peer:
            verdicts = await session(Milter(config(peer)))
            await peer.ended.wait()
        assert {(v.action, v.reply) for v in verdicts} == {(action, reply)}
        assert [type(c).__name__ for c in peer.commands()] == ["Negotiate", "Connect"]
        assert peer.sessions[0].closed_by_mta

    run(main)


def test_accept_at_helo_drops_the_milter_for_the_session() -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"H": [codec.Accept()]}) as peer:
            verdicts = await session(Milter(config(peer)))
            await peer.ended.wait()
        assert verdicts[1].action is Action.ACCEPT
        assert all(v.action is Action.CONTINUE for v in verdicts[2:])
        assert [type(c).__name__ for c in peer.commands()] == ["Negotiate", "Connect", "Helo"]

    run(main)


def test_every_modification_in_order() -> None:
    changes: list[Item] = [
        codec.AddHeader(name="X-Added", value="yes"),
        codec.InsertHeader(index=0, name="X-Top", value="first"),
        codec.ChangeHeader(index=1, name="Subject", value="changed\n\tfolded"),
        codec.ChangeHeader(index=1, name="To", value=""),
        codec.ChangeSender(sender="<bounce@example.org>", arguments="SIZE=100"),
        codec.AddRecipient(recipient="<carol@example.org>"),
        codec.AddRecipientWithArguments(recipient="<dave@example.org>", arguments="NOTIFY=NEVER"),
        codec.DeleteRecipient(recipient="<bob@example.org>"),
        codec.ReplaceBody(data=b"new "),
        codec.ReplaceBody(data=b"body\r\n"),
        codec.Quarantine(reason="suspicious"),
        codec.Continue(),
    ]

    async def main() -> None:
        async with MilterPeer(replies={b"E": changes}) as peer:
            verdicts = await session(Milter(config(peer)))
        final = verdicts[-1]
        assert final.action is Action.CONTINUE
        assert final.quarantine == "suspicious"
        # Header values as they go in the message: the space after the colon
        # put back, folds as CRLF.
        assert final.modifications == (
            codec.AddHeader(name="X-Added", value=" yes"),
            codec.InsertHeader(index=0, name="X-Top", value=" first"),
            codec.ChangeHeader(index=1, name="Subject", value=" changed\r\n\tfolded"),
            codec.ChangeHeader(index=1, name="To", value=""),
            *changes[4:11],
        )

    run(main)


def test_leading_space_negotiated() -> None:
    async def main() -> None:
        replies: dict[bytes, Sequence[Item]] = {
            b"E": [codec.AddHeader(name="X-A", value="  two spaces"), codec.Accept()]
        }
        async with MilterPeer(protocol=ProtocolFlag.HDR_LEADSPC, replies=replies) as peer:
            verdicts = await session(Milter(config(peer)))
        assert codec.Header(name="From", value=" alice@example.net") in peer.commands()
        assert verdicts[-1].action is Action.ACCEPT
        assert verdicts[-1].modifications == (codec.AddHeader(name="X-A", value="  two spaces"),)

    run(main)


@pytest.mark.parametrize(
    ("actions", "change"),
    [
        (ActionFlag.CHGHDRS, codec.AddHeader(name="X-A", value="1")),
        (ActionFlag.ADDHDRS, codec.ChangeHeader(index=1, name="X-A", value="1")),
        (ActionFlag.ADDHDRS, codec.ReplaceBody(data=b"x")),
        (ActionFlag.ADDHDRS, codec.Quarantine(reason="x")),
        (ActionFlag.ADDRCPT, codec.DeleteRecipient(recipient="<a@x>")),
    ],
)
def test_a_modification_not_negotiated_is_a_protocol_error(
    actions: ActionFlag, change: codec.Response
) -> None:
    async def main() -> None:
        async with MilterPeer(actions=actions, replies={b"E": [change, codec.Continue()]}) as peer:
            verdicts = await session(Milter(config(peer, "reject")))
        assert verdicts[-1].action is Action.REJECT
        assert verdicts[-1].reply == Reply(code=550, enhanced="5.7.1", text="Service unavailable")

    run(main)


def test_skipped_stages_are_not_sent_and_answer_continue() -> None:
    skip = (
        ProtocolFlag.NOCONNECT
        | ProtocolFlag.NOHELO
        | ProtocolFlag.NORCPT
        | ProtocolFlag.NODATA
        | ProtocolFlag.NOHDRS
        | ProtocolFlag.NOEOH
        | ProtocolFlag.NOBODY
    )

    async def main() -> None:
        async with MilterPeer(protocol=skip, replies={b"E": [codec.Reject()]}) as peer:
            verdicts = await session(Milter(config(peer)))
        assert [v.action for v in verdicts[:-1]] == [Action.CONTINUE] * (len(verdicts) - 1)
        assert verdicts[-1].reply == REJECTED
        assert [type(c).__name__ for c in peer.commands()] == [
            "Negotiate",
            "MailFrom",
            "EndOfMessage",
            "Quit",
        ]
        # The envelope stages' macros go even when the stage does not (as
        # Postfix does); declined content gets none.
        assert [c.for_code for c in peer.received if isinstance(c, codec.DefineMacros)] == [
            b"C",
            b"H",
            b"M",
            b"R",
            b"T",
            b"E",
        ]

    run(main)


def test_no_reply_stages_are_not_waited_for() -> None:
    no_reply = (
        ProtocolFlag.NR_CONN
        | ProtocolFlag.NR_HELO
        | ProtocolFlag.NR_MAIL
        | ProtocolFlag.NR_RCPT
        | ProtocolFlag.NR_DATA
        | ProtocolFlag.NR_HDR
        | ProtocolFlag.NR_EOH
        | ProtocolFlag.NR_BODY
    )

    async def main() -> None:
        # The peer answers nothing but end of message; a client that waited
        # would time out and give the default action.
        replies: dict[bytes, Sequence[Item]] = {b"E": [codec.AddHeader(name="X", value="1")]}
        replies[b"E"] = [*replies[b"E"], codec.Continue()]
        async with MilterPeer(protocol=no_reply, replies=replies) as peer:
            verdicts = await session(Milter(config(peer, "reject", timeout=2)))
        assert all(v.action is Action.CONTINUE for v in verdicts)
        assert verdicts[-1].modifications == (codec.AddHeader(name="X", value=" 1"),)
        assert len(peer.commands()) == 13

    run(main)


def test_skip_during_body_stops_the_chunks() -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"B": [codec.Skip()]}) as peer:
            milter = Milter(config(peer))
            body = bytes(range(256)) * 1024  # 262144 octets: five chunks' worth
            verdicts = await session(milter, body=body)
        assert all(v.action is Action.CONTINUE for v in verdicts)
        chunks = [c for c in peer.commands() if isinstance(c, codec.BodyChunk)]
        assert chunks == [codec.BodyChunk(data=body[: codec.CHUNK_SIZE])]
        assert isinstance(peer.commands()[-2], codec.EndOfMessage)

    run(main)


def test_body_goes_in_chunks_of_at_most_65535() -> None:
    async def main() -> None:
        async with MilterPeer() as peer:
            milter = Milter(config(peer))
            await milter.connect(hostname="c", address="::1", port=2)
            await milter.mail("<a@x>")
            body = b"".join(b"%07d\r\n" % n for n in range(17_000))  # 153000 octets
            for start in range(0, len(body), 1000):
                assert (await milter.body(body[start : start + 1000])).is_continue
            assert (await milter.end_of_message()).is_continue
            await milter.quit()
        chunks = [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)]
        assert [len(c) for c in chunks] == [65535, 65535, len(body) - 2 * 65535]
        assert b"".join(chunks) == body
        connect = peer.commands()[1]
        assert connect == codec.Connect(hostname="c", family=Family.INET6, port=2, address="::1")

    run(main)


def test_setsymlist_replaces_the_default_macros() -> None:
    lists = (
        (MacroStage.CONNECT, ("j", "client_addr")),
        (MacroStage.ENVFROM, ("{mail_addr}", "{unlisted}")),
    )

    async def main() -> None:
        async with MilterPeer(macro_lists=lists) as peer:
            await session(Milter(config(peer)))
        assert peer.macros(b"C") == [{"j": "mx.example.org", "{client_addr}": "192.0.2.7"}]
        assert peer.macros(b"M") == [
            {"{mail_addr}": "alice@example.net", "{unlisted}": "never sent"}
        ]
        # Stages the milter's lists leave out get no macros, as in Postfix.
        assert peer.macros(b"H") == peer.macros(b"R") == peer.macros(b"E") == []

    run(main)


def test_progress_restarts_the_wait() -> None:
    async def main() -> None:
        slow: list[Item] = [codec.Progress(), Delay(0.2), codec.Progress(), Delay(0.2)]
        slow += [codec.Progress(), Delay(0.2), codec.Continue()]
        async with MilterPeer(replies={b"E": slow}) as peer:
            verdicts = await session(Milter(config(peer, "reject", timeout=0.4)))
        assert verdicts[-1].action is Action.CONTINUE

    run(main)


def test_older_protocol_version_gets_only_its_events() -> None:
    async def main() -> None:
        async with MilterPeer(version=2, actions=ActionFlag.ADDHDRS) as peer:
            milter = Milter(config(peer))
            await session(milter)
            assert milter.negotiated is not None and milter.negotiated.version == 2
        names = [type(c).__name__ for c in peer.commands()]
        assert "Data" not in names and names.count("Header") == 3

    run(main)


def test_unix_socket(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "milter.sock")
        async with MilterPeer(unix_path=path, replies={b"R": [codec.Reject()]}) as peer:
            assert peer.socket == f"unix:{path}"
            verdicts = await session(Milter(config(peer)))
        assert verdicts[3].reply == REJECTED

    run(main)


def test_inet6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")

    async def main() -> None:
        try:
            peer_cm = MilterPeer(host="::1")
            await peer_cm.__aenter__()
        except OSError:
            pytest.skip("no ::1 on this host")
        try:
            assert peer_cm.socket.startswith("inet6:[::1]:")
            verdicts = await session(Milter(config(peer_cm)))
            assert all(v.is_continue for v in verdicts)
        finally:
            await peer_cm.__aexit__(None, None, None)

    run(main)


# --- failures ------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mmdf_smtp.milter" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("tempfail", Verdict(action=Action.TEMPFAIL, reply=TEMPFAILED)),
        (
            "reject",
            Verdict(
                action=Action.REJECT,
                reply=Reply(code=550, enhanced="5.7.1", text="Service unavailable"),
            ),
        ),
        ("accept", Verdict(action=Action.CONTINUE)),
    ],
)
def test_connection_refused_gives_the_default_action(
    action: str, expected: Verdict, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        socket_name = f"inet:127.0.0.1:{closed_port()}"
        milter = Milter(
            MilterConfig(socket=socket_name, default_action=DefaultAction(action)), name="dkim"
        )
        verdicts = await session(milter)
        assert set(verdicts) == {expected}

    run(main)
    [line] = warnings(caplog)
    assert line.startswith("milter dkim: connect: ")
    assert line.endswith(f"default action {action}")


FAILURES: list[tuple[str, dict[bytes, Sequence[Item]], int, str]] = [
    # (what, script, index of the stage that fails in session(), log text)
    ("hangs at MAIL", {b"M": [HANG]}, 2, "MailFrom: no answer in 0.3 s"),
    ("hangs at end of message", {b"E": [HANG]}, 10, "EndOfMessage: no answer in 0.3 s"),
    # A short body goes at end of message.
    ("dies at the body", {b"B": [CLOSE]}, 10, "BodyChunk: protocol error: the milter closed"),
    ("dies after a partial packet", {b"R": [b"\0\0\0\x05ab", CLOSE]}, 3, "end of file inside"),
    ("sends garbage", {b"H": [b"\0\0\0\x03zzz"]}, 1, "unknown response code b'z'"),
    ("sends an absurd length", {b"T": [b"\x7f\xff\xff\xff"]}, 4, "packet length 2147483647"),
    ("sends a bad reply code", {b"R": [codec.ReplyCode(text="250 ok")]}, 3, "not an SMTP 4xx/5xx"),
    (
        "answers with a modification early",
        {b"R": [codec.AddHeader(name="X", value="1")]},
        3,
        "AddHeader at rcpt",
    ),
    ("discards at connect", {b"C": [codec.Discard()]}, 0, "DISCARD is not allowed at connect"),
]


@pytest.mark.parametrize(
    ("script", "index", "log"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
@pytest.mark.parametrize("action", ["tempfail", "reject", "accept"])
def test_a_broken_milter_costs_bounded_time_and_gets_the_default_action(
    script: dict[bytes, Sequence[Item]],
    index: int,
    log: str,
    action: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = {
        "tempfail": Action.TEMPFAIL,
        "reject": Action.REJECT,
        "accept": Action.CONTINUE,
    }[action]

    async def main() -> None:
        async with MilterPeer(replies=script) as peer:
            milter = Milter(config(peer, action, timeout=0.3))
            started = time.monotonic()
            verdicts = await session(milter)
            elapsed = time.monotonic() - started
            await peer.ended.wait()  # the client closed its end
        assert elapsed < 2.0
        assert all(v.is_continue for v in verdicts[:index])
        assert {v.action for v in verdicts[index:]} == {expected}
        assert milter.failed
        # The client closed the connection (unless the milter did first).
        milter_closed = any(CLOSE in items for items in script.values())  # type: ignore[operator]
        assert peer.sessions[0].closed_by_mta is not milter_closed
        # Nothing more reached the milter after the failure.
        assert not any(isinstance(c, codec.Quit) for c in peer.commands())

    run(main)
    [line] = warnings(caplog)
    assert line.startswith("milter inet:127.0.0.1:")
    assert log in line
    assert line.endswith(f"default action {action}")


def test_a_milter_that_dies_mid_body(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        replies: dict[bytes, Sequence[Item]] = {b"B": lambda c: [codec.Continue()]}
        async with MilterPeer(replies=replies) as peer:
            milter = Milter(config(peer, "reject", timeout=2))
            await milter.connect(hostname="c", address="127.0.0.1", port=1)
            await milter.mail("<a@x>")
            chunk = b"x" * 40_000
            assert (await milter.body(chunk)).is_continue
            assert (await milter.body(chunk)).is_continue  # the first 65535 went
            peer.replies = {b"B": [CLOSE]}
            verdict = await milter.body(chunk * 2)  # the second chunk: the milter is gone
            assert verdict.action is Action.REJECT
            assert (await milter.end_of_message()).action is Action.REJECT
            await milter.quit()
        chunks = [c for c in peer.commands() if isinstance(c, codec.BodyChunk)]
        assert len(chunks) == 2

    run(main)
    [line] = warnings(caplog)
    assert "BodyChunk: protocol error: the milter closed the connection" in line


@pytest.mark.parametrize(
    ("negotiation", "log"),
    [
        ([HANG], "negotiation: no answer in 0.3 s"),
        ([codec.Continue()], "Continue instead of the OPTNEG answer"),
        (
            [codec.Negotiate(version=7, actions=ActionFlag(0), protocol=ProtocolFlag(0))],
            "version 7",
        ),
        (
            [codec.Negotiate(version=6, actions=ActionFlag(1 << 9), protocol=ProtocolFlag(0))],
            "asks for actions",
        ),
        ([CLOSE], "the milter closed the connection"),
    ],
)
def test_failed_negotiation(
    negotiation: list[Item], log: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with MilterPeer(negotiate_reply=negotiation) as peer:
            verdicts = await session(Milter(config(peer, timeout=0.3)))
        assert {v.action for v in verdicts} == {Action.TEMPFAIL}

    run(main)
    [line] = warnings(caplog)
    assert log in line


def test_a_short_timeout_after_a_long_one_still_bounds_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The end of message, answered after longer than the command timeout,
    # was waited for with the content timeout; the next transaction's MAIL
    # must get the command timeout again.
    mails: list[codec.Command] = []
    slow_end: list[Item] = [Delay(0.5), codec.Continue()]

    def second_mail_hangs(command: codec.Command) -> Sequence[Item]:
        mails.append(command)
        return [codec.Continue()] if len(mails) == 1 else [HANG]

    async def main() -> None:
        async with MilterPeer(replies={b"M": second_mail_hangs, b"E": slow_end}) as peer:
            milter = Milter(
                MilterConfig(socket=peer.socket, command_timeout=0.3, content_timeout=60.0)
            )
            first = [
                await milter.connect(hostname="c", address="127.0.0.1", port=1),
                await milter.mail("<alice@example.net>"),
                await milter.rcpt("<bob@example.org>"),
                await milter.header("Subject", " hi"),
                await milter.end_of_message(),
            ]
            assert all(v.is_continue for v in first)
            started = time.monotonic()
            verdict = await milter.mail("<alice@example.net>")
            elapsed = time.monotonic() - started
            await milter.quit()
        assert verdict.action is Action.TEMPFAIL
        assert 0.3 <= elapsed < 5.0

    run(main)
    [line] = warnings(caplog)
    assert "MailFrom: no answer in 0.3 s" in line


def test_cancellation_closes_the_connection() -> None:
    async def main() -> None:
        async with MilterPeer(replies={b"M": [HANG]}) as peer:
            milter = Milter(config(peer))
            await milter.connect(hostname="c", address="127.0.0.1", port=1)
            task = asyncio.create_task(milter.mail("<a@x>"))
            while not any(isinstance(c, codec.MailFrom) for c in peer.received):
                await asyncio.sleep(0)  # yield until the peer has it
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await peer.ended.wait()
            assert peer.sessions[0].closed_by_mta

    run(main)


# --- the chain -----------------------------------------------------------------------


def test_chain_stops_at_the_first_refusal_and_collects_modifications_in_order() -> None:
    async def main() -> None:
        first_eom: list[Item] = [codec.AddHeader(name="X-First", value="1"), codec.Continue()]
        second_eom: list[Item] = [
            codec.InsertHeader(index=0, name="X-Second", value="2"),
            codec.Quarantine(reason="second says so"),
            codec.Accept(),
        ]
        async with (
            MilterPeer(replies={b"E": first_eom}) as one,
            MilterPeer(replies={b"E": second_eom}) as two,
        ):
            chain = MilterChain([config(one), config(two)])
            verdicts = await session(chain)
        final = verdicts[-1]
        assert final.action is Action.CONTINUE
        assert final.quarantine == "second says so"
        assert final.modifications == (
            codec.AddHeader(name="X-First", value=" 1"),
            codec.InsertHeader(index=0, name="X-Second", value=" 2"),
            codec.Quarantine(reason="second says so"),
        )

    run(main)


def test_chain_refusal_skips_later_milters() -> None:
    async def main() -> None:
        async with (
            MilterPeer(replies={b"R": [codec.Reject()]}) as one,
            MilterPeer() as two,
        ):
            chain = MilterChain([config(one), config(two)])
            verdicts = await session(chain)
        assert verdicts[3].reply == REJECTED
        assert not any(isinstance(c, codec.RcptTo) for c in two.commands())

    run(main)


def test_chain_accept_excuses_only_that_milter() -> None:
    async def main() -> None:
        async with (
            MilterPeer(replies={b"M": [codec.Accept()]}) as one,
            MilterPeer(replies={b"E": [codec.Reject()]}) as two,
        ):
            chain = MilterChain([config(one), config(two)])
            verdicts = await session(chain)
        assert verdicts[-1].reply == REJECTED
        assert not any(isinstance(c, codec.RcptTo) for c in one.commands())
        assert any(isinstance(c, codec.EndOfMessage) for c in two.commands())

    run(main)


def test_chain_discard_holds_for_the_rest_of_the_transaction() -> None:
    async def main() -> None:
        async with (
            MilterPeer(replies={b"R": [codec.Discard()]}) as one,
            MilterPeer() as two,
        ):
            chain = MilterChain([config(one), config(two)])
            verdicts = await session(chain)
        assert [v.action for v in verdicts[3:]] == [Action.DISCARD] * 8
        second = [type(c).__name__ for c in two.commands()]
        # The second milter saw the transaction start, then its abort.
        assert second == ["Negotiate", "Connect", "Helo", "MailFrom", "Abort", "Quit"]

    run(main)


def test_chain_with_a_dead_milter_that_defaults_to_accept() -> None:
    async def main() -> None:
        dead = MilterConfig(
            socket=f"inet:127.0.0.1:{closed_port()}", default_action=DefaultAction.ACCEPT
        )
        async with MilterPeer(replies={b"R": [codec.TempFail()]}) as live:
            verdicts = await session(MilterChain([dead, config(live)]))
        assert verdicts[3].reply == TEMPFAILED

    run(main)
