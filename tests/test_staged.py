"""The staged message: its header section parsed into fields, and written back exact."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.filters.staged import Envelope, StagedMessage

TRACE = b"Received: from client (x [127.0.0.1])\r\n\tby mx.test (mmdf-smtp)\r\n"


class Collect:
    """A queue writer that keeps what it is given (the spool's own is tested elsewhere)."""

    def __init__(self) -> None:
        self.data = b""

    id = "0" * 26
    size = 0

    def write(self, data: bytes) -> None:
        self.data += data

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def staged(tmp_path: Path, content: bytes, in_memory: int = 64 * 1024) -> StagedMessage:
    message = StagedMessage(
        queue_id="0" * 26,
        envelope=Envelope(sender="a@example.net", recipients=["b@example.org"]),
        trace=TRACE,
        directory=str(tmp_path),
        in_memory=in_memory,
    )
    message.write(content)
    message.finish()
    return message


def written(message: StagedMessage) -> bytes:
    out = Collect()
    message.write_to(out)
    return out.data


def test_fields_folds_and_body(tmp_path: Path) -> None:
    content = b"Subject: a\r\n b\r\nX-Empty:\r\n\r\nbody\r\n"
    message = staged(tmp_path, content)
    assert message.headers == [
        ("Received", " from client (x [127.0.0.1])\n\tby mx.test (mmdf-smtp)"),
        ("Subject", " a\n b"),
        ("X-Empty", ""),
    ]
    assert written(message) == TRACE + content
    assert message.original(1000) == content


def test_a_line_that_is_no_field_starts_the_body(tmp_path: Path) -> None:
    content = b"Subject: a\r\nnot a field\r\nmore\r\n"
    message = staged(tmp_path, content)
    assert [name for name, _ in message.headers] == ["Received", "Subject"]
    assert written(message) == TRACE + content


def test_a_changed_header_and_a_new_body(tmp_path: Path) -> None:
    message = staged(tmp_path, b"Subject: a\r\n\r\nold\r\n", in_memory=16)
    assert message.on_disk
    message.headers[1] = ("Subject", " new\r\n folded")
    message.replace_body(iter([b"line one\nline", b" two\r", b"\n"]))
    assert written(message) == TRACE + b"Subject: new\r\n folded\r\n\r\nline one\r\nline two\r\n"


field_name = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1
)
field_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
field = st.builds(
    lambda name, first, folds: f"{name}:{first}" + "".join(f"\r\n {f}" for f in folds),
    field_name,
    field_text,
    st.lists(field_text, max_size=2),
)
body_line = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@given(
    fields=st.lists(field, max_size=6),
    separated=st.booleans(),
    body=st.lists(body_line, max_size=5),
    in_memory=st.sampled_from([8, 64 * 1024]),
)
def test_any_message_is_written_back_exactly(
    tmp_path_factory: pytest.TempPathFactory,
    fields: list[str],
    separated: bool,
    body: list[str],
    in_memory: int,
) -> None:
    directory = tmp_path_factory.mktemp("staged")
    head = "".join(f + "\r\n" for f in fields)
    rest = "".join(line + "\r\n" for line in body)
    if separated:
        rest = "\r\n" + rest
    elif body and (":" in body[0] or body[0][:1] in (" ", "\t")):
        return  # the line would read as a field: not a message of this shape
    content = (head + rest).encode()
    assert written(staged(directory, content, in_memory)) == TRACE + content
