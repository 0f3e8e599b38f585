"""Coverage-guided fuzzing of the protocol core with atheris (libFuzzer).

Not part of the test suite: run it by hand, for as long as you like::

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_core.py -max_total_time=600 var/fuzz-corpus

(any libFuzzer option works: ``-runs=N``, ``-jobs=N``, a corpus folder to
keep what it finds).  The first octets of each input choose how the
application answers and where the stream is cut; the rest is what the
client sends.  Each input must give well-formed replies from the
catalogue, keep the buffered octets under the line limits, never complete
a message that was not opened, and close at end of file.  A failed check
or any exception is a crash, which libFuzzer saves for replay.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from driver import Run, session
    from mmdf_smtp.protocol import (
        ConnectionClosed,
        Event,
        Hello,
        Limits,
        MailFrom,
        MessageAborted,
        MessageComplete,
        MessageData,
        RcptTo,
        Reply,
        Reset,
        StartData,
        State,
        replies,
    )

# The model knows nothing of the door's rules (tests/test_protocol.py and
# tests/test_door.py test them): its batches pipeline anything, and its
# content may hold NULs.
LIMITS = Limits(
    message_size=3000, recipients=3, errors=25, forbid_unauth_pipelining=False, allow_nul=True
)
CATALOGUE = {value.code for value in vars(replies).values() if isinstance(value, Reply)}
REPLY = re.compile(rb"(?:[2-5][0-9]{2}-[^\r\n]*\r\n)*[2-5][0-9]{2} [^\r\n]*\r\n")
REFUSAL = Reply(code=550, enhanced="5.7.1", text="Refused")


class Application:
    """Answers decisions as the input's first octet says, and checks the events."""

    def __init__(self, choices: int) -> None:
        self.choices = choices
        self.open = False
        self.closed = False

    def refuses(self, bit: int) -> bool:
        return bool(self.choices >> bit & 1)

    def answer(self, event: Event) -> Reply | None:
        assert not self.closed, f"{event} after the close"
        match event:
            case Hello():
                return REFUSAL if self.refuses(0) else replies.HELLO
            case MailFrom():
                return REFUSAL if self.refuses(1) else replies.SENDER_OK
            case RcptTo():
                return replies.UNKNOWN_USER if self.refuses(2) else replies.RECIPIENT_OK
            case StartData():
                if self.refuses(3):
                    return replies.QUEUE_FULL
                self.open = True
                return replies.OK if event.chunking else replies.START_DATA
            case MessageData():
                assert self.open, "content outside a message"
            case MessageComplete():
                assert self.open, "the end of a message never opened"
                self.open = False
                return replies.QUEUE_FULL if self.refuses(4) else replies.QUEUED
            case MessageAborted():
                assert self.open, "an abort outside a message"
                self.open = False
            case Reset():
                self.open = False
            case ConnectionClosed():
                self.closed = True
        return None


def check(run: Run) -> None:
    output = bytes(run.output)
    assert REPLY.sub(b"", output) == b"", output[-200:]
    for line in output.split(b"\r\n")[:-1]:
        assert int(line[:3]) in CATALOGUE, line
    held = run.conn.pending_input
    match run.conn.state:
        case State.COMMAND | State.REFUSED:
            assert held <= LIMITS.command_line
        case State.DATA:
            assert held <= LIMITS.text_line
        case _:
            assert held == 0, run.conn.state


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    app = Application(provider.ConsumeIntInRange(0, 255))
    handshake_works = provider.ConsumeBool()
    cuts = sorted(
        provider.ConsumeIntInRange(0, 4096) for _ in range(provider.ConsumeIntInRange(0, 8))
    )
    stream = provider.ConsumeBytes(provider.remaining_bytes())
    run = session(limits=LIMITS, tls=True)
    start = 0
    for end in [*cuts, len(stream)]:
        piece = stream[start:end]
        start = max(start, end)
        if not piece:
            continue
        if run.conn.state is State.TLS:
            run.conn.receive_data(piece)  # injected before the handshake: dropped
            if handshake_works:
                run.conn.tls_established()
            else:
                run.conn.tls_failed()
            run.pump(app.answer)
        elif not run.conn.closed:
            run.feed(piece, answer=app.answer)
        check(run)
    if run.conn.state is State.TLS:
        run.conn.tls_failed()
        run.pump(app.answer)
    if not run.conn.closed:
        run.eof(app.answer)
    check(run)
    assert app.closed, "end of file left the session open"


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
