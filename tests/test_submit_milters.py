"""Mail from submit through the milters configured with ``submit = true``
(Postfix's non_smtpd_milters), and past the others."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from milterpeer import MilterPeer, Replies
from mmdf_smtp.milter import codec
from test_submit import submit
from wire import queued, stored, write_config

MESSAGE = b"Subject: local\n\nhello\n"


@contextmanager
def milter(replies: dict[bytes, Replies] | None = None) -> Iterator[MilterPeer]:
    """A scripted milter on a loop of its own, for programs run by the test."""
    loop = asyncio.new_event_loop()
    peer = MilterPeer(replies=replies)
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        async with peer:
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield peer
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def config_with(tmp_path: Path, peer: MilterPeer, *, submit_too: bool) -> Path:
    flag = "true" if submit_too else "false"
    return write_config(tmp_path, f'[[milters]]\nsocket = "{peer.socket}"\nsubmit = {flag}\n')


def test_a_submit_milter_sees_the_message_as_from_localhost_and_changes_it(
    tmp_path: Path,
) -> None:
    changes = [codec.AddHeader(name="X-Local-Filter", value="seen"), codec.Continue()]
    with milter({b"E": changes}) as peer:
        result = submit(config_with(tmp_path, peer, submit_too=True), "alice", data=MESSAGE)
        assert result.returncode == 0, result.stderr
        commands = peer.commands()
    connect = next(c for c in commands if isinstance(c, codec.Connect))
    assert (connect.hostname, connect.address) == ("localhost", "127.0.0.1")
    [rcpt] = [c for c in commands if isinstance(c, codec.RcptTo)]
    assert rcpt.recipient == "<alice@example.org>"
    [message] = queued(tmp_path / "mmdf.toml")
    data = stored(tmp_path / "mmdf.toml", message["id"])
    assert data.endswith(b"X-Local-Filter: seen\r\n\r\nhello\r\n")
    assert b"Subject: local\r\n" in data


def test_a_milter_refusal_fails_submit_and_queues_nothing(tmp_path: Path) -> None:
    refusal = [codec.ReplyCode(text="554 5.7.1 not from here")]
    with milter({b"E": refusal}) as peer:
        config = config_with(tmp_path, peer, submit_too=True)
        result = submit(config, "alice", data=MESSAGE)
    assert result.returncode == 65  # EX_DATAERR
    assert b"554 5.7.1 not from here" in result.stderr
    assert queued(config) == []


def test_a_temporary_refusal_is_ex_tempfail(tmp_path: Path) -> None:
    with milter({b"M": [codec.TempFail()]}) as peer:
        config = config_with(tmp_path, peer, submit_too=True)
        result = submit(config, "alice", data=MESSAGE)
    assert result.returncode == 75  # EX_TEMPFAIL
    assert queued(config) == []


def test_milters_without_submit_never_see_local_mail(tmp_path: Path) -> None:
    with milter() as peer:
        config = config_with(tmp_path, peer, submit_too=False)
        result = submit(config, "alice", data=MESSAGE)
        assert result.returncode == 0, result.stderr
        assert peer.sessions == []
    [message] = queued(config)
    assert message["recipients"] == ["alice@example.org"]
