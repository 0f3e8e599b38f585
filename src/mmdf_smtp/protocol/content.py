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
_STUFFED = b"\r\n."


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
    * more than ``limits.received_headers`` Received headers (RFC 5321 6.3);
    * a NUL octet, unless ``limits.allow_nul``.  RFC 5321 4.5.2 lets any
      octet but CR and LF through, but many programs stop at or strip a NUL
      (C strings): relayed on, it lets a next hop read a different message
      than the one checked here, as bare line ends do.
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
        # find, not "in", as in the command reader (connection.py).
        if self.problem is None and not self._limits.allow_nul and block.find(b"\0") >= 0:
            self.problem = replies.NUL_IN_DATA
        self._check_line_lengths(block)
        if self._in_headers:
            self._count_received(block)

    def _check_line_ends(self, block: bytes) -> None:
        text = b"\r" + block if self._cr_pending else block
        crlf = text.count(b"\r\n")
        trailing_cr = 1 if text.endswith(b"\r") else 0
        # Every CR and every LF must be half of a CRLF (a trailing CR may be,
        # with the next block's LF): as many of them as twice the CRLFs.
        # Deleting them all is one pass; counting CR and LF, two.
        line_ends = len(text) - len(text.translate(None, b"\r\n"))
        if line_ends - trailing_cr != 2 * crlf:
            self.problem = replies.BARE_LINE_END_IN_DATA
        self._cr_pending = bool(trailing_cr)

    def _check_line_lengths(self, block: bytes) -> None:
        # A line's length counts its LF.  Rather than split the block into
        # its lines, hop from LF to the last LF within a line's length of
        # it: a hop a line limit long, not a line, and no list of lines.
        limit = self._limits.text_line
        last = block.find(b"\n")
        if last < 0:
            self._line_length += len(block)
            if self._line_length > limit:
                self.problem = replies.DATA_LINE_TOO_LONG
            return
        if self._line_length + last + 1 > limit:
            self.problem = replies.DATA_LINE_TOO_LONG
            return
        end = len(block)
        rfind = block.rfind
        while end - last - 1 > limit:
            # More than a line's worth follows: its first `limit` octets must hold an LF.
            last = rfind(b"\n", last + 1, last + 1 + limit)
            if last < 0:
                self.problem = replies.DATA_LINE_TOO_LONG
                return
        # Lines after the last hop are shorter than a hop; the block's last
        # line goes on in the next block.
        self._line_length = end - rfind(b"\n") - 1

    def _count_received(self, block: bytes) -> None:
        # Only the start of each header line matters: keep a short prefix.
        # From line end to line end with find, not split: the header
        # section is a few lines at the start of a block that may hold
        # 64 KiB of body.
        find = block.find
        end = find(b"\n")
        if len(self._line_prefix) < 16:
            head = block[: 16 if end < 0 else min(end, 16)]
            self._line_prefix = (self._line_prefix + head)[:16]
        while end >= 0:
            if self._line_prefix in (b"", b"\r"):
                self._in_headers = False  # the empty line ends the header section
                return
            if self._line_prefix[:9].lower() == b"received:":
                self._received += 1
                if self._received > self._limits.received_headers:
                    self.problem = replies.TOO_MANY_HOPS
                    return
            start = end + 1
            end = find(b"\n", start)
            self._line_prefix = block[start : start + 16 if end < 0 else min(end, start + 16)]

    def finish(self) -> None:
        """The message ended.

        DATA content always ends with CRLF.  A BDAT message may end without
        one (its chunks are counted, not delimited), but not with a bare CR.
        """
        if self.problem is None and self._cr_pending:
            self.problem = replies.BARE_LINE_END_IN_DATA


REASONS = {
    replies.MESSAGE_TOO_BIG: "too-big",
    replies.BARE_LINE_END_IN_DATA: "bare-line-end",
    replies.NUL_IN_DATA: "nul",
    replies.DATA_LINE_TOO_LONG: "line-too-long",
    replies.TOO_MANY_HOPS: "loop",
}
"""A word for each of the checker's problems, for the log."""


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
        # The end marker starts as a stuffed line does, with CRLF ".": where
        # there is none, neither is to be looked for.
        stuffed = buffer.find(_STUFFED)
        end = buffer.find(_END, stuffed) if stuffed >= 0 else -1
        if end >= 0:
            block = self._unstuff(_head(buffer, end + 2), stuffed >= 0)
            del buffer[: end + 5]
            return block, True
        cut = buffer.rfind(b"\r\n")
        if cut >= 0:
            # Whole lines up to the last CRLF; what follows may be the start
            # of the end marker and waits for more input.
            block = self._unstuff(_head(buffer, cut + 2), stuffed >= 0)
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

    def _unstuff(self, block: bytes, stuffed: bool) -> bytes:
        # "If the first character [of a line] is a period and there are
        # other characters on the line, the first character is deleted."
        if self._at_line_start and block.startswith(b"."):
            block = block[1:]
        self._at_line_start = True
        return block.replace(_STUFFED, b"\r\n") if stuffed else block


def _head(buffer: bytearray, size: int) -> bytes:
    """The first ``size`` octets of ``buffer``, copied once (a slice would copy twice)."""
    with memoryview(buffer) as view:
        return bytes(view[:size])
