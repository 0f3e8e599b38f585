"""The command grammar of RFC 5321 4.1.2, extended by RFC 6531, as regexes.

Each fragment quotes the ABNF it implements.  Parsers here are pure: text
in, a value or :class:`GrammarError` (carrying the reply to send) out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from . import replies
from .events import Path
from .replies import Reply


class GrammarError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _with_non_ascii(ascii_class: str) -> str:
    """The class ``[ascii_class]`` joined by every code point above U+007F.

    RFC 6531 3.3: UTF8-non-ascii joins atext, qtextSMTP, esmtp-value and
    sub-domain (as U-labels); Python str has already decoded UTF-8.  The
    class is written as the negation of the ASCII it leaves out: the same
    set, but re takes milliseconds to compile a class spanning U+0080 to
    U+10FFFF, and every program paid that for each one here at start-up.
    """
    member = re.compile(f"[{ascii_class}]")
    left_out = "".join(f"\\x{code:02x}" for code in range(0x80) if not member.fullmatch(chr(code)))
    return f"[^{left_out}]"


# Let-dig = ALPHA / DIGIT; Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig
# sub-domain = Let-dig [Ldh-str]  (=/ U-label, RFC 6531)
_LET_DIG = _with_non_ascii("A-Za-z0-9")
_LDH = _with_non_ascii("A-Za-z0-9-")
_SUB_DOMAIN = rf"{_LET_DIG}(?:{_LDH}*{_LET_DIG})?"
# Domain = sub-domain *("." sub-domain)
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
# address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
#                         General-address-literal ) "]"
# General-address-literal = Standardized-tag ":" 1*dcontent
# dcontent = %d33-90 / %d94-126
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
# atext (RFC 5322 3.2.3), =/ UTF8-non-ascii
_ATEXT = _with_non_ascii("A-Za-z0-9!#$%&'*+/=?^_`{|}~-")
# Dot-string = Atom *("." Atom)
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# Quoted-string = DQUOTE *QcontentSMTP DQUOTE
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 (=/ UTF8-non-ascii)
# quoted-pairSMTP = %d92 %d32-126
_QTEXT = _with_non_ascii(r"\x20\x21\x23-\x5b\x5d-\x7e")
_QUOTED_STRING = rf'"(?:{_QTEXT}|\\[\x20-\x7e])*"'
# Local-part = Dot-string / Quoted-string
_LOCAL_PART = rf"(?:{_DOT_STRING}|{_QUOTED_STRING})"
# A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*"

# Path = "<" [ A-d-l ":" ] Mailbox ">"; Mailbox = Local-part "@" ( Domain / address-literal )
_PATH = re.compile(
    rf"<(?:{_ADL}:)?(?P<local>{_LOCAL_PART})@(?P<domain>{_DOMAIN}|{_ADDRESS_LITERAL})>"
)
# RFC 5321 4.1.1.3: "<Postmaster>" (case-insensitive) needs no domain.
_POSTMASTER = re.compile(r"<(?i:postmaster)>")
# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
# esmtp-value = 1*(%d33-60 / %d62-126)  (=/ UTF8-non-ascii, RFC 6531)
_ESMTP_VALUE_CHAR = _with_non_ascii(r"\x21-\x3c\x3e-\x7e")
_ESMTP_PARAM = re.compile(
    rf"(?P<keyword>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>{_ESMTP_VALUE_CHAR}+))?"
)
# "MAIL FROM:" and "RCPT TO:".  RFC 5321 has no space after the colon, but
# deployed clients send one; like Postfix, accept it.
# The path is cut out first (a quoted local part may hold ">") and then
# checked against the Path grammar.
_PATH_TOKEN = r'<(?:[^">]|"(?:[^"\\]|\\.)*")*>'
_MAIL_ARGUMENT = re.compile(rf"(?i:FROM):[ ]*(?P<path>{_PATH_TOKEN})(?:[ ]+(?P<params>.*))?")
_RCPT_ARGUMENT = re.compile(rf"(?i:TO):[ ]*(?P<path>{_PATH_TOKEN})(?:[ ]+(?P<params>.*))?")
# RFC 3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF
_BDAT_ARGUMENT = re.compile(r"(?P<size>[0-9]{1,20})(?P<last>[ ]+(?i:LAST))?")
# EHLO/HELO: a Domain or an address literal (RFC 5321 4.1.1.1).  Clients
# that send a bare name with odd characters are common; accept any
# printable token without spaces, as Postfix does, and keep it for Received.
_HELO_ARGUMENT = re.compile(_with_non_ascii(r"\x21-\x7e") + "+")

# RFC 5321 4.5.3.1.1-3
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper case
    argument: str  # after the first space, "" when none


def split_command(line: str) -> Command:
    """Split a command line (without CRLF) into its verb and argument."""
    verb, _, argument = line.partition(" ")
    # Verbs are ASCII (RFC 5321 4.1.1).  str.upper() would make "MAIL" of a
    # dotless i ("MA\u0131L") or STARTTLS of a ligature: leave those unknown.
    return Command(verb.upper() if verb.isascii() else verb, argument.strip(" "))


def parse_helo(argument: str) -> str:
    if not _HELO_ARGUMENT.fullmatch(argument):
        raise GrammarError(replies.HELO_SYNTAX)
    return argument


_ASCII_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_UTF8_DOMAIN = re.compile(_DOMAIN)
_LITERAL = re.compile(_ADDRESS_LITERAL)


def is_domain_or_literal(text: str, *, utf8: bool = False) -> bool:
    """Whether ``text`` is a Domain or an address-literal (RFC 5321 4.1.2).

    U-labels count only with ``utf8`` (RFC 6531 3.3): elsewhere a header
    must be ASCII.
    """
    if _LITERAL.fullmatch(text):
        return _address_literal_ok(text)
    domain = _UTF8_DOMAIN if utf8 else _ASCII_DOMAIN
    return len(text.encode()) <= MAX_DOMAIN and domain.fullmatch(text) is not None


def _address_literal_ok(literal: str) -> bool:
    body = literal[1:-1]
    if body[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(body[5:])
        except ValueError:
            return False
        return True
    if ":" in body:
        # General-address-literal: a tag we do not know; syntactically fine.
        return True
    try:
        ipaddress.IPv4Address(body)
    except ValueError:
        return False
    return True


def parse_path(text: str, *, bad: Reply, allow_null: bool) -> Path:
    """Parse ``<...>`` into a :class:`Path`, raising with ``bad`` on error."""
    if text == "<>":
        if allow_null:
            return Path(local="", domain="")
        raise GrammarError(bad)
    if _POSTMASTER.fullmatch(text):
        return Path(local=text[1:-1], domain="")
    match = _PATH.fullmatch(text)
    if match is None:
        raise GrammarError(bad)
    local, domain = match["local"], match["domain"]
    if domain.startswith("[") and not _address_literal_ok(domain):
        raise GrammarError(bad)
    too_long = (
        len(local.encode()) > MAX_LOCAL_PART
        or len(domain.encode()) > MAX_DOMAIN
        or len(local.encode()) + 1 + len(domain.encode()) + 2 > MAX_PATH
    )
    if too_long:
        raise GrammarError(bad.with_text(bad.text + " (too long, RFC 5321 4.5.3.1)"))
    return Path(local=local, domain=domain)


def parse_parameters(text: str | None) -> dict[str, str | None]:
    """``Mail-parameters`` into an upper-case keyword map."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for token in text.split(" "):
        if not token:
            continue  # several spaces between parameters: be liberal
        match = _ESMTP_PARAM.fullmatch(token)
        if match is None:
            raise GrammarError(replies.BAD_PARAMETER_VALUE)
        keyword, value = match["keyword"].upper(), match["value"]
        if keyword in params:
            # A parameter given twice alike says nothing new: Python's smtplib
            # repeats SMTPUTF8 and BODY=8BITMIME when the caller gave them
            # too, and Postfix takes that.  Two different values conflict.
            if not _same_value(keyword, params[keyword], value):
                raise GrammarError(
                    replies.BAD_PARAMETER_VALUE.with_text(f"Duplicate {keyword} with another value")
                )
            continue
        params[keyword] = value
    return params


# Parameters whose values are keywords, and so case-blind; the others'
# (SIZE, and xtext: ENVID, ORCPT) are compared as sent.
_KEYWORD_VALUED = frozenset({"BODY", "RET", "NOTIFY"})


def _same_value(keyword: str, first: str | None, second: str | None) -> bool:
    """Whether two values of one parameter mean the same."""
    if first is None or second is None:
        return first is second
    if keyword in _KEYWORD_VALUED:
        return first.upper() == second.upper()
    return first == second


@dataclass(frozen=True, slots=True)
class MailArgument:
    sender: Path
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class RcptArgument:
    recipient: Path
    params: dict[str, str | None]


def parse_mail(argument: str) -> MailArgument:
    match = _MAIL_ARGUMENT.fullmatch(argument)
    if match is None:
        raise GrammarError(replies.MAIL_SYNTAX)
    sender = parse_path(match["path"], bad=replies.BAD_SENDER_ADDRESS, allow_null=True)
    return MailArgument(sender, parse_parameters(match["params"]))


def parse_rcpt(argument: str) -> RcptArgument:
    match = _RCPT_ARGUMENT.fullmatch(argument)
    if match is None:
        raise GrammarError(replies.RCPT_SYNTAX)
    recipient = parse_path(match["path"], bad=replies.BAD_RECIPIENT_ADDRESS, allow_null=False)
    return RcptArgument(recipient, parse_parameters(match["params"]))


@dataclass(frozen=True, slots=True)
class BdatArgument:
    size: int
    last: bool


def parse_bdat(argument: str) -> BdatArgument:
    match = _BDAT_ARGUMENT.fullmatch(argument)
    if match is None:
        raise GrammarError(replies.BDAT_SYNTAX)
    return BdatArgument(int(match["size"]), match["last"] is not None)
