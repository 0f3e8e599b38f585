"""bench/lmtp_sink.py: the end-to-end cases' next hop answers as RFC 2033 says, and counts right.

The bench's end-to-end figures stop the clock at the sink's last 250: a
sink that missed the end of a message, or counted one twice, would make
them wrong, so its data scanning is checked over every way of cutting
the stream into reads.
"""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from lmtp_sink import Counter, Session  # noqa: E402


class Transport(asyncio.Transport):
    """Collects what the session writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


TRANSACTION = (
    b"LHLO client\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.org>\r\n"
    b"RCPT TO:<b@example.org>\r\nDATA\r\n"
)


@given(
    bodies=st.lists(
        st.lists(
            st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
            max_size=5,
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_each_message_gets_a_250_per_recipient_however_the_stream_is_cut(
    bodies: list[list[bytes]], cuts: list[int]
) -> None:
    stream = bytearray()
    for lines in bodies:
        # Dot-stuffed as a client sends it (RFC 5321 4.5.2).
        content = b"".join(
            (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
        )
        stream += TRANSACTION + content + b".\r\n"
    stream += b"QUIT\r\n"
    counter = Counter()
    session = Session(counter)
    transport = Transport()
    session.connection_made(transport)
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        session.data_received(bytes(stream[start:cut]))
        start = cut
    replies = bytes(transport.written).split(b"\r\n")
    assert replies.count(b"250 2.0.0 delivered") == 2 * len(bodies)
    assert counter.delivered == 2 * len(bodies)
    assert replies[-2] == b"221 2.0.0 bye"
    assert transport.closed


@pytest.fixture
def sink() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "lmtp_sink.py"), "127.0.0.1", "0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(b"listening on 127.0.0.1:"), line
        yield int(line.strip().rsplit(b":", 1)[1])
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_smtplib_lmtp_delivers_to_the_sink_and_xstat_counts_it(sink: int) -> None:
    # One recipient a message: smtplib.LMTP reads one reply after the data,
    # where LMTP gives one per recipient (RFC 2033 4.2); the property test
    # above covers several.
    with smtplib.LMTP("127.0.0.1", sink) as client:
        for body in (b"Subject: x\r\n\r\n.dot\r\n", b"Subject: y\r\n\r\n"):
            assert client.sendmail("s@example.org", ["a@example.org"], body) == {}
        code, text = client.docmd("XSTAT")
    delivered, last = text.split()
    assert (code, int(delivered)) == (250, 2)
    assert float(last) > 0
