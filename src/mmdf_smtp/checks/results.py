"""The Authentication-Results header field (RFC 8601), made from the verdicts and guarded.

:func:`authentication_results` makes the one field this host adds: its
``authserv_id``, then one ``method=result`` (a "resinfo") per verdict, each
on its own folded line (RFC 5322 2.2.3), with the properties RFC 8601 2.7
and RFC 6008 name::

    Authentication-Results: mx.example.org;
        spf=pass smtp.mailfrom=alice@example.com;
        spf=none smtp.helo=mail.example.com;
        dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b="AbC+/x12";
        arc=none;
        dmarc=pass (p=reject dis=none) header.from=example.com

No verdict at all gives ``Authentication-Results: mx.example.org; none``
(RFC 8601 2.2).

:func:`claims_authserv_id` tells whether an arriving field claims to be
ours: RFC 8601 5 asks an MTA to remove (or rename) those, since only this
host may speak for its authserv-id.  The authserv-id is the first value of
the field (a token or a quoted-string, RFC 2045), after any comments and
folding white space (CFWS, RFC 5322 3.2.2, comments nested and with
quoted-pairs), compared case-insensitively (RFC 8601 2.5), whatever
follows it (a version, a comment, garbage).  A field that cannot be parsed
as far as its authserv-id is kept: it claims nothing.
:func:`remove_claiming_fields` applies that to a whole header block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .verdicts import ArcVerdict, DkimVerdict, DmarcVerdict, SpfVerdicts

FIELD_NAME = "Authentication-Results"
# RFC 5322 2.1.1: lines SHOULD be at most 78 characters.
FOLD_AT = 78
# RFC 6008 2: at least eight characters of b= name a signature.
SIGNATURE_PREFIX = 8

# RFC 2045 5.1 tspecials, with SPACE and CTLs: what a token cannot hold.
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+")
_DOMAIN = re.compile(r"[A-Za-z0-9\-_\u0080-\U0010ffff]+(\.[A-Za-z0-9\-_\u0080-\U0010ffff]+)*")


def _is_token(text: str) -> bool:
    return bool(text) and all(ch not in _TSPECIALS and ch > " " and ch != "\x7f" for ch in text)


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _clean(text: str) -> str:
    # Control characters (CR and LF above all) never reach the header.
    return "".join(ch if ch >= " " and ch != "\x7f" else "?" for ch in text)


def pvalue(text: str) -> str:
    """A property value: token, ``local-part@domain`` or quoted-string (RFC 8601 2.2)."""
    text = _clean(text)
    if _is_token(text):
        return text
    local, at, domain = text.rpartition("@")
    if at and _DOMAIN.fullmatch(domain):
        if not local:
            return f"@{domain}"
        if all(_ATEXT.fullmatch(atom) for atom in local.split(".")):
            return text
    return _quoted(text)


def comment(text: str) -> str:
    escaped = re.sub(r"([()\\])", r"\\\1", _clean(text))
    return f"({escaped})"


def _signature_names(signatures: Sequence[DkimVerdict]) -> list[str]:
    """Each b= cut short, but long enough to tell the signatures apart (RFC 6008 2)."""
    values = [s.signature for s in signatures]
    length = SIGNATURE_PREFIX
    while length < max((len(v) for v in values), default=0) and len(
        {v[:length] for v in values}
    ) < len(set(values)):
        length += 4
    return [v[:length] for v in values]


def resinfos(
    *,
    spf: SpfVerdicts | None = None,
    dkim: Sequence[DkimVerdict] | None = None,
    arc: ArcVerdict | None = None,
    dmarc: DmarcVerdict | None = None,
) -> list[str]:
    """Each ``method=result`` with its properties, in the field's order."""
    parts: list[str] = []
    if spf is not None:
        if spf.mailfrom is not None:
            parts.append(f"spf={spf.mailfrom.result} smtp.mailfrom={pvalue(spf.mailfrom.sender)}")
        if spf.helo is not None:
            parts.append(f"spf={spf.helo.result} smtp.helo={pvalue(spf.helo.sender)}")
    if dkim is not None:
        if not dkim:
            parts.append("dkim=none")
        for verdict, name in zip(dkim, _signature_names(dkim), strict=True):
            words = [f"dkim={verdict.result}"]
            if verdict.reason and verdict.result != "pass":
                words.append(comment(verdict.reason))
            if verdict.domain:
                words.append(f"header.d={pvalue(verdict.domain)}")
            if verdict.selector:
                words.append(f"header.s={pvalue(verdict.selector)}")
            if verdict.algorithm:
                words.append(f"header.a={pvalue(verdict.algorithm)}")
            if name:
                words.append(f"header.b={pvalue(name)}")
            parts.append(" ".join(words))
    if arc is not None:
        parts.append(f"arc={arc.result}")
    if dmarc is not None:
        words = [f"dmarc={dmarc.result}"]
        if dmarc.record_domain:
            words.append(comment(f"p={dmarc.policy} dis={dmarc.disposition}"))
        elif dmarc.reason:
            words.append(comment(dmarc.reason))
        if dmarc.from_domain:
            words.append(f"header.from={pvalue(dmarc.from_domain)}")
        parts.append(" ".join(words))
    return parts


def authentication_results(
    authserv_id: str,
    *,
    spf: SpfVerdicts | None = None,
    dkim: Sequence[DkimVerdict] | None = None,
    arc: ArcVerdict | None = None,
    dmarc: DmarcVerdict | None = None,
    linesep: bytes = b"\r\n",
) -> bytes:
    """The whole field, folded, ending with ``linesep``; UTF-8 (RFC 8601 allows it, RFC 6532)."""
    parts = resinfos(spf=spf, dkim=dkim, arc=arc, dmarc=dmarc)
    head = f"{FIELD_NAME}: {pvalue(authserv_id)};"
    if not parts:
        return f"{head} none".encode() + linesep
    lines = [head]
    for index, part in enumerate(parts):
        text = part + (";" if index < len(parts) - 1 else "")
        lines.extend(_fold(text))
    return linesep.join(line.encode() for line in lines) + linesep


def _fold(text: str) -> list[str]:
    """One resinfo as continuation lines: folded between words, never inside one."""
    lines: list[str] = []
    current = ""
    for word in _words(text):
        if current and len(current) + 1 + len(word) > FOLD_AT - 1:
            lines.append("\t" + current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append("\t" + current)
    return lines


def _words(text: str) -> list[str]:
    """Split at spaces outside quoted-strings and comments (folding there would change them)."""
    words: list[str] = []
    current: list[str] = []
    depth, quoted, escaped = 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(depth - 1, 0)
        elif ch == " " and depth == 0:
            words.append("".join(current))
            current = []
            continue
        current.append(ch)
    words.append("".join(current))
    return [w for w in words if w]


# --- reading an arriving field ------------------------------------------------


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def skip_cfws(self) -> bool:
        """Skip white space, folds and (nested) comments; False on an unclosed comment."""
        text = self.text
        while self.at < len(text):
            ch = text[self.at]
            if ch in " \t\r\n":
                self.at += 1
            elif ch == "(":
                depth = 0
                while self.at < len(text):
                    ch = text[self.at]
                    if ch == "\\":
                        self.at += 2
                        continue
                    if ch == "(":
                        depth += 1
                    elif ch == ")":
                        depth -= 1
                        if depth == 0:
                            self.at += 1
                            break
                    self.at += 1
                else:
                    return False
            else:
                return True
        return True

    def value(self) -> str | None:
        """A token or a quoted-string (RFC 2045 ``value``), unquoted; None if neither."""
        text = self.text
        if self.at >= len(text):
            return None
        if text[self.at] == '"':
            out = []
            self.at += 1
            while self.at < len(text):
                ch = text[self.at]
                if ch == "\\" and self.at + 1 < len(text):
                    out.append(text[self.at + 1])
                    self.at += 2
                    continue
                if ch == '"':
                    self.at += 1
                    return "".join(out)
                if ch not in "\r\n":
                    out.append(ch)
                self.at += 1
            return None
        start = self.at
        while self.at < len(text) and _is_token(text[self.at]):
            self.at += 1
        return text[start : self.at] or None


def authserv_id_of(value: bytes | str) -> str | None:
    """The authserv-id of an Authentication-Results field body (after the colon), or None."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    scanner = _Scanner(text)
    if not scanner.skip_cfws():
        return None
    return scanner.value()


def claims_authserv_id(value: bytes | str, authserv_id: str) -> bool:
    """True when the field body's authserv-id is ``authserv_id`` (RFC 8601 5), any case."""
    found = authserv_id_of(value)
    return found is not None and found.casefold() == authserv_id.casefold()


def remove_claiming_fields(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``header`` without the Authentication-Results fields that claim ``authserv_id``.

    ``header`` is a header block (fields with their folds, line ends kept as
    they are); returns the block and how many fields were removed.
    """
    fields: list[list[bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    kept: list[bytes] = []
    removed = 0
    name_wanted = FIELD_NAME.lower().encode()
    for lines in fields:
        name, colon, rest = lines[0].partition(b":")
        if colon and name.rstrip(b" \t").lower() == name_wanted:
            body = b"".join([rest, *lines[1:]])
            if claims_authserv_id(body, authserv_id):
                removed += 1
                continue
        kept.extend(lines)
    return b"".join(kept), removed
