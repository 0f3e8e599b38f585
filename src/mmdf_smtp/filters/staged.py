"""A message held between its end of data and its commit, for the filters.

The filters may change what is queued: the envelope (a milter's CHGFROM,
ADDRCPT, DELRCPT), the header (our Authentication-Results, a milter's
DKIM-Signature or a changed Subject) and the body (REPLBODY).  A queue
file is written once, envelope first, so a message that may change is
staged first: in memory while it is small, in an unlinked temporary file
beside the queue once it is not (never whole in memory), and its queue
file is written from it once the filters are done (:meth:`write_to`).

The staged octets are what the queue file would have held: our trace
header, then the message as received (dot-unstuffed, CRLF line ends).
The header section is parsed once the data has ended (:meth:`finish`)
into fields a filter may change; the body is left where it lies.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..queue import MessageWriter

# The header section is held as fields in memory: past this many octets the
# rest of the message counts as body (as Postfix's header_size_limit does
# for one field), so a message that is all header cannot take memory.
HEADER_LIMIT = 1024 * 1024
CHUNK = 64 * 1024
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # any octet survives the round trip


Header = tuple[str, str]
"""One header field: its name, and its value as it follows the colon (the
leading space kept; a folded value's lines joined by LF, as Sendmail and
Postfix hold them and hand them to milters)."""


def header_bytes(header: Header) -> bytes:
    name, value = header
    # A milter's value may come with CRLF or LF between its lines.
    value = value.replace("\r\n", "\n").replace("\n", "\r\n")
    return f"{name}:{value}\r\n".encode(_ENCODING, _ERRORS)


@dataclass(slots=True, kw_only=True)
class Envelope:
    """The parts of the envelope a filter may change."""

    sender: str
    recipients: list[str] = field(default_factory=list)


class StagedMessage:
    """One message, staged.  ``queue_id`` is the id its queue file will have."""

    def __init__(
        self,
        *,
        queue_id: str,
        envelope: Envelope,
        trace: bytes,
        directory: str,
        in_memory: int = CHUNK,
    ) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self.headers: list[Header] = []
        # Set by a filter that holds the message for an administrator.
        self.quarantine: str | None = None
        self._file = _spooled(in_memory, directory)
        self._directory = directory
        self._in_memory = in_memory
        self._trace_size = len(trace)
        self._staged = len(trace)  # octets written so far
        self._file.write(trace)
        self._body_start = 0
        self._separator = b""  # the empty line between header and body, if any
        self._body: tempfile.SpooledTemporaryFile[bytes] | None = None  # a replaced body

    def write(self, data: bytes) -> None:
        self._staged += len(data)
        self._file.write(data)

    @property
    def on_disk(self) -> bool:
        """Whether the message outgrew memory (writing it out then waits on a disk)."""
        # SpooledTemporaryFile moves to its file once past max_size.
        return self._staged > self._in_memory

    def finish(self) -> None:
        """The data has ended: parse the header section into :attr:`headers`."""
        file = self._file
        file.seek(0)
        lines: list[bytes] = []
        taken = 0
        while taken < HEADER_LIMIT:
            line = file.readline(HEADER_LIMIT - taken)
            if not line:
                break
            if line == b"\r\n":
                self._separator = line
                taken += len(line)
                break
            folded = line[:1] in (b" ", b"\t") and bool(lines)
            if folded or (b":" in line and _field_name(line)):
                lines.append(line)
            else:
                break  # not a field: the body starts here, with no empty line
            taken += len(line)
        # A field cut by the limit ends the section before it.
        while lines and not lines[-1].endswith(b"\n"):
            taken -= len(lines.pop())
        self._body_start = taken
        self.headers = list(_fields(lines))

    def original(self, limit: int) -> bytes:
        """The message as the client sent it (no trace of ours), up to ``limit`` octets."""
        self._file.seek(self._trace_size)
        return self._file.read(limit)

    def body_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The body as it stands (replaced or as received), in pieces."""
        file = self._body if self._body is not None else self._file
        file.seek(0 if self._body is not None else self._body_start)
        while chunk := file.read(size):
            yield chunk

    def replace_body(self, chunks: Iterator[bytes]) -> None:
        """A new body (a milter's REPLBODY), line ends as given made CRLF."""
        body = _spooled(self._in_memory, self._directory)
        held = b""  # a CR that ended a piece: its LF may start the next
        for chunk in chunks:
            data = held + chunk
            data, held = (data[:-1], b"\r") if data.endswith(b"\r") else (data, b"")
            # Milters send LF or CRLF line ends; the queue holds CRLF only.
            body.write(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        body.write(held)
        if self._separator == b"":
            self._separator = b"\r\n"
        if self._body is not None:
            self._body.close()
        self._body = body

    def write_to(self, writer: MessageWriter) -> int:
        """Write the message as it now stands into its queue file; return its size."""
        size = 0
        head = b"".join(map(header_bytes, self.headers)) + self._separator
        writer.write(head)
        size += len(head)
        for chunk in self.body_chunks():
            writer.write(chunk)
            size += len(chunk)
        return size

    def close(self) -> None:
        self._file.close()
        if self._body is not None:
            self._body.close()


def _spooled(in_memory: int, directory: str) -> tempfile.SpooledTemporaryFile[bytes]:
    # Closed by StagedMessage.close: it lives from DATA to the commit.
    return tempfile.SpooledTemporaryFile(max_size=in_memory, dir=directory)


def _field_name(line: bytes) -> bool:
    """RFC 5322 2.2: a field name is printable ASCII but the colon, at least one."""
    name = line.split(b":", 1)[0]
    return bool(name) and all(33 <= octet <= 126 for octet in name)


def _fields(lines: list[bytes]) -> Iterator[Header]:
    current: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            current.append(line)
            continue
        if current:
            yield _header(current)
        current = [line]
    if current:
        yield _header(current)


def _header(lines: list[bytes]) -> Header:
    text = b"".join(lines).decode(_ENCODING, _ERRORS)
    if text.endswith("\r\n"):
        text = text[:-2]
    name, _, value = text.partition(":")
    return name, value.replace("\r\n", "\n")
