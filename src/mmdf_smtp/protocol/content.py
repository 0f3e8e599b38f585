"""Readers for message content: DATA's dot-stuffed stream and its checks.

Both work on whole blocks with bytes methods (find, count, replace, split)
rather than byte by byte, so a 20 MiB message costs a few hundred C-level
passes over 64 KiB blocks, not millions of Python steps.  Memory stays
bounded: a reader keeps at most one partial line, and that only up to the
text line limit.
"""

from __future__ import annotations

from . import replies
from .limits import Limits
from .replies import Reply

_END_AT_START = b".\r\n"
_END = b"\r\n.\r\n"


class ContentChecker:
    """Checks message content as it streams past, in blocks of any size.

    The first problem found is kept in :attr:`problem`:

    * size over ``limits.message_size`` (RFC 1870: 552 after DATA);
    * a bare CR or LF.  End of data is only CRLF.CRLF (RFC 5321 4.1.1.4);
      a bare LF or CR inside the message could end it for another parser
      downstream (the 2023 "SMTP smuggling" attacks), so such a message is
      refused rather than passed on;
    * a line over ``limits.text_line`` octets with its CRLF (RFC 5321
      4.5.3.1.6); refused rather than folded, so the stored octets are
      always the octets received;
    * more than ``limits.received_headers`` Received headers (RFC 5321 6.3).
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.size = 0
        self.problem: Reply | None = None
        self._cr_pending = False  # the last block ended in CR
        self._line_length = 0  # octets of the current, unfinished line
        self._in_headers = True
        self._line_prefix = b""  # the first octets of the current line, in headers
        self._received = 0

    def feed(self, block: bytes) -> None:
        self.size += len(block)
        if self.problem is not None:
            return
        limit = self._limits.message_size
        if limit and self.size > limit:
            self.problem = replies.MESSAGE_TOO_BIG
            return
        self._check_line_ends(block)
        self._check_line_lengths(block)
        if self._in_headers:
            self._count_received(block)

    def _check_line_ends(self, block: bytes) -> None:
        text = b"\r" + block if self._cr_pending else block
        crlf = text.count(b"\r\n")
        trailing_cr = 1 if text.endswith(b"\r") else 0
        if text.count(b"\n") != crlf or text.count(b"\r") - trailing_cr != crlf:
            self.problem = replies.BARE_LINE_END_IN_DATA
        self._cr_pending = bool(trailing_cr)

    def _check_line_lengths(self, block: bytes) -> None:
        pieces = block.split(b"\n")
        # Every piece but the last ended with LF, which counts to its line.
        first = self._line_length + len(pieces[0]) + (1 if len(pieces) > 1 else 0)
        longest = max(first, max(map(len, pieces[1:-1]), default=0) + 1)
        if len(pieces) > 1:
            longest = max(longest, len(pieces[-1]))
            self._line_length = len(pieces[-1])
        else:
            self._line_length = first
        if longest > self._limits.text_line:
            self.problem = replies.DATA_LINE_TOO_LONG

    def _count_received(self, block: bytes) -> None:
        # Only the start of each header line matters: keep a short prefix.
        pieces = block.split(b"\n")
        self._line_prefix = (self._line_prefix + pieces[0])[:16]
        for piece in pieces[1:]:
            if self._line_prefix in (b"", b"\r"):
                self._in_headers = False  # the empty line ends the header section
                return
            if self._line_prefix[:9].lower() == b"received:":
                self._received += 1
                if self._received > self._limits.received_headers:
                    self.problem = replies.TOO_MANY_HOPS
                    return
            self._line_prefix = piece[:16]

    def finish(self) -> None:
        """The message ended.

        DATA content always ends with CRLF.  A BDAT message may end without
        one (its chunks are counted, not delimited), but not with a bare CR.
        """
        if self.problem is None and self._cr_pending:
            self.problem = replies.BARE_LINE_END_IN_DATA


class DotReader:
    """DATA's transparency (RFC 5321 4.5.2): finds CRLF.CRLF and unstuffs.

    :meth:`read` takes what it can from ``buffer`` (consuming it) and
    returns the unstuffed content so far, and whether the end was seen.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._at_line_start = True  # DATA's own CRLF started the first line

    def read(self, buffer: bytearray) -> tuple[bytes, bool]:
        if self._at_line_start and buffer[:3] == _END_AT_START:
            del buffer[:3]
            return b"", True
        end = buffer.find(_END)
        if end >= 0:
            block = self._unstuff(bytes(buffer[: end + 2]))
            del buffer[: end + 5]
            return block, True
        cut = buffer.rfind(b"\r\n")
        if cut >= 0:
            # Whole lines up to the last CRLF; what follows may be the start
            # of the end marker and waits for more input.
            block = self._unstuff(bytes(buffer[: cut + 2]))
            del buffer[: cut + 2]
            self._at_line_start = True
            return block, False
        if len(buffer) > self._limits.text_line:
            # One line longer than any allowed: pass it on (the checker will
            # refuse the message) rather than hold it; keep a trailing CR,
            # which may be half of the CRLF that ends it.
            keep = 1 if buffer.endswith(b"\r") else 0
            block = bytes(buffer[: len(buffer) - keep])
            del buffer[: len(buffer) - keep]
            if self._at_line_start and block.startswith(b"."):
                block = block[1:]
            self._at_line_start = False
            return block, False
        return b"", False

    def _unstuff(self, block: bytes) -> bytes:
        # "If the first character [of a line] is a period and there are
        # other characters on the line, the first character is deleted."
        if self._at_line_start and block.startswith(b"."):
            block = block[1:]
        self._at_line_start = True
        return block.replace(b"\r\n.", b"\r\n")
