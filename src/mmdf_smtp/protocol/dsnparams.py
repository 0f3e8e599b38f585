"""The DSN extension's parameters (RFC 3461 4): xtext, RET, ENVID, NOTIFY, ORCPT.

Pure functions: a parameter's value in, its meaning out, or
:class:`ValueError` saying why not (the core answers that 501 5.5.4).
"""

from __future__ import annotations

import re
from typing import Literal

# RFC 3461 4: "xtext = *( xchar / hexchar )"; "xchar = any ASCII CHAR
# between "!" (33) and "~" (126) inclusive, except for "+" and "="";
# "hexchar = ASCII "+" immediately followed by two upper case
# hexadecimal digits".
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 3461 4.2 and 4.4: the original recipient address and the envelope
# id "MUST consist entirely of printable (graphic and white space)
# characters from the US-ASCII repertoire".
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
# addr-type = atom (RFC 3461 4.2, an RFC 822 atom): "rfc822", "utf-8", ...
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")

# RFC 3461 4.4: "The ENVID esmtp-value MUST NOT exceed 100 characters";
# 4.2: an ORCPT's "MUST NOT exceed 500 characters".  Both are counted
# as sent (xtext-encoded), which is what limits the command line.
MAX_ENVID = 100
MAX_ORCPT = 500

NOTIFY_NEVER = "NEVER"
# The canonical order of a notify-list, whatever order the client used.
NOTIFY_CONDITIONS = ("SUCCESS", "FAILURE", "DELAY")

Ret = Literal["FULL", "HDRS"]


def decode_xtext(text: str) -> str:
    """The octets an xtext stands for, as text (each hexchar one octet of Latin-1)."""
    if not _XTEXT.fullmatch(text):
        raise ValueError("not xtext")
    return _HEXCHAR.sub(lambda m: chr(int(m[1], 16)), text)


def encode_xtext(text: str) -> str:
    """``text`` (printable ASCII) as xtext: "+", "=" and what is not xchar as "+XX"."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def parse_ret(value: str | None) -> Ret:
    """RFC 3461 4.3: ``RET=FULL`` or ``RET=HDRS`` (case-blind, as keywords are)."""
    word = (value or "").upper()
    if word == "FULL":
        return "FULL"
    if word == "HDRS":
        return "HDRS"
    raise ValueError("RET takes FULL or HDRS")


def parse_envid(value: str | None) -> str:
    """RFC 3461 4.4: the envelope id, decoded."""
    if not value:
        raise ValueError("ENVID takes a value")
    if len(value) > MAX_ENVID:
        raise ValueError(f"ENVID longer than {MAX_ENVID} characters")
    decoded = decode_xtext(value)
    if not _PRINTABLE.fullmatch(decoded):
        raise ValueError("ENVID is not printable US-ASCII")
    return decoded


def parse_notify(value: str | None) -> tuple[str, ...]:
    """RFC 3461 4.1: ``("NEVER",)`` or the conditions asked, in canonical order.

    "NEVER" stands alone: "If the NEVER keyword appears, it MUST NOT be
    used with any of the other keywords".
    """
    if not value:
        raise ValueError("NOTIFY takes a value")
    words = value.upper().split(",")
    if words == [NOTIFY_NEVER]:
        return (NOTIFY_NEVER,)
    if any(word not in NOTIFY_CONDITIONS for word in words):
        if NOTIFY_NEVER in words:
            raise ValueError("NOTIFY=NEVER must stand alone")
        raise ValueError("NOTIFY takes NEVER or a list of SUCCESS, FAILURE and DELAY")
    return tuple(c for c in NOTIFY_CONDITIONS if c in words)


def parse_orcpt(value: str | None) -> str:
    """RFC 3461 4.2: ``addr-type ";" xtext``, decoded as ``"rfc822;alice@example.org"``:
    the form of a DSN's Original-Recipient field (RFC 3464 2.3.1)."""
    if not value:
        raise ValueError("ORCPT takes a value")
    if len(value) > MAX_ORCPT:
        raise ValueError(f"ORCPT longer than {MAX_ORCPT} characters")
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type):
        raise ValueError("ORCPT takes addr-type;xtext")
    decoded = decode_xtext(address)
    if not decoded or not _PRINTABLE.fullmatch(decoded):
        raise ValueError("ORCPT's address is not printable US-ASCII")
    return f"{addr_type};{decoded}"


def orcpt_parameter(orcpt: str) -> str:
    """The ``ORCPT=`` value that hands ``orcpt`` (as :func:`parse_orcpt` made it) on."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{encode_xtext(address)}"
