"""submit: queue a message from a local program, in sendmail's place.

    submit [-c config] [-f sender] [-F name] [-t] [-i] [--channel name] [recipient...]

The message is read on stdin.  Without ``-i`` (or ``-oi``) a line of a
single "." ends it, as with sendmail.  ``-t`` adds the recipients of the
To, Cc and Bcc headers to those of the command line (as Postfix does).
The options that cron, mailx, mutt, git send-email, PHP's mail() and
logwatch pass to sendmail are accepted; those that mean nothing here are
ignored.

Exit status (sysexits.h): 0 when the message is queued (or, for users
other than root and the mail system's, safely in the maildrop), 64 for
bad arguments (no recipients included), 65 for a message over the size
limit, with a bad address in its headers or too many Received headers,
67 for an unknown local user, 69 when the maildrop is not set up, 74
when stdin cannot be read, 75 when the queue cannot take the message now,
77 for a recipient the channel may not send to or an option only trusted
users may give, 78 for a bad configuration.  On any error nothing is
queued.
"""

from __future__ import annotations

import contextlib
import getopt
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TypeVar

from ..config import ConfigError, load
from ..policy import Policy, UnknownChannel
from ..privileges import drop_privileges
from ..protocol import dsnparams
from ..queue import QueueError, open_backend
from ..queue.maildrop import MaildropError, drop, prepare
from ..queue.spool import Spool
from ..submission import (
    AddressError,
    FilterRefused,
    MailLoop,
    MessageTooBig,
    NoRecipients,
    NotPermitted,
    Planner,
    RecipientRefused,
    Request,
    SubmissionError,
    Submitter,
    UnknownLogin,
    is_trusted,
    queue_message,
    read_headers,
    read_lines,
)
from .common import (
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)

USAGE = (
    "usage: submit [-c config] [-f sender] [-F fullname] [-t] [-i] [--channel name] [recipient...]"
)
# sendmail's options, getopt style.  Those with a value but no meaning here
# (-h hops, -L tag, -X log, -O option, -A, -p, -e)
# are taken and ignored, so that callers written for sendmail work.
_SHORT = "c:f:r:F:tio:b:B:e:vN:R:V:h:L:X:O:A:p:nUGm"
_LONG = ["channel="]


_T = TypeVar("_T")


class _Interrupted(Exception):
    pass


class _Input:
    """stdin, interrupted by a signal only while it is being read.

    SIGTERM, SIGINT and SIGHUP abort a message being read, and then
    nothing is queued; but one arriving while the queue file is created or
    committed must wait, or a message could be queued and reported as not
    (and sent twice), or its file left behind.  So the handler raises only
    during a read, and a signal that came in between is raised at the next.
    """

    def __init__(self) -> None:
        self.reading = False
        self.received: str | None = None
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        if self.reading:
            raise _Interrupted(self.received)

    def readline(self, size: int = -1, /) -> bytes:
        if self.received:
            raise _Interrupted(self.received)
        self.reading = True
        try:
            return sys.stdin.buffer.readline(size)
        finally:
            self.reading = False


@dataclass
class Options:
    config: str | None = None
    sender: str | None = None
    full_name: str | None = None
    extract: bool = False
    ignore_dots: bool = False
    body: str | None = None
    verbose: bool = False
    channel: str | None = None
    recipients: list[str] = field(default_factory=list)
    notify: tuple[str, ...] | None = None  # -N: DSN's NOTIFY (RFC 3461), every recipient's
    ret: str | None = None  # -R full|hdrs
    envid: str | None = None  # -V: the envelope id


def parse_arguments(argv: list[str]) -> Options:
    """sendmail's command line; ValueError with the reason when it is bad."""
    try:
        pairs, recipients = getopt.getopt(argv, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        raise ValueError(str(exc)) from None
    options = Options(recipients=recipients)
    for option, value in pairs:
        match option:
            case "-c":
                options.config = value
            case "-f" | "-r":
                options.sender = value
            case "-F":
                options.full_name = value
            case "-t":
                options.extract = True
            case "-i":
                options.ignore_dots = True
            case "-o":
                # -oi is -i; -odb, -oem, -oQ/dir and the rest mean nothing here.
                if value == "i":
                    options.ignore_dots = True
            case "-B":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise ValueError(f"-B {value}: the body type is 7BIT or 8BITMIME")
                options.body = value.upper()
            case "-b":
                if value != "m":
                    raise ValueError(f"-b{value}: only -bm (read a message and queue it) is here")
            case "-v":
                options.verbose = True
            case "--channel":
                options.channel = value
            case "-N":
                options.notify = _dsn_option("-N", dsnparams.parse_notify, value)
            case "-R":
                options.ret = _dsn_option("-R", dsnparams.parse_ret, value)
            case "-V":
                # sendmail takes the id as it is; the limits are xtext's.
                encoded = dsnparams.encode_xtext(value)
                options.envid = _dsn_option("-V", dsnparams.parse_envid, encoded)
    return options


def _dsn_option(option: str, parse: Callable[[str | None], _T], value: str) -> _T:
    try:
        return parse(value)
    except ValueError as exc:
        raise ValueError(f"{option} {value}: {exc}") from None


def status_of(error: SubmissionError) -> int:
    match error:
        case AddressError():
            return EX_DATAERR if error.in_message else EX_USAGE
        case RecipientRefused():
            return EX_NOUSER if error.unknown_user else EX_NOPERM
        case NoRecipients():
            return EX_USAGE
        case MessageTooBig() | MailLoop():
            return EX_DATAERR
        case UnknownLogin():
            return EX_NOUSER
        case NotPermitted():
            return EX_NOPERM
        case FilterRefused():
            return EX_TEMPFAIL if error.temporary else EX_DATAERR
    return EX_SOFTWARE


def main(argv: list[str] | None = None) -> int:
    program = Path(sys.argv[0]).name
    if program not in ("sendmail", "submit"):
        program = "submit"

    def fail(status: int, message: str) -> int:
        for line in message.splitlines():
            print(f"{program}: {line}", file=sys.stderr)
        return status

    try:
        options = parse_arguments(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(USAGE, file=sys.stderr)
        return fail(EX_USAGE, str(exc))
    request = Request(
        recipients=tuple(options.recipients),
        sender=options.sender,
        full_name=options.full_name,
        extract=options.extract,
        body=options.body,
        channel=options.channel,
        notify=options.notify,
        ret=options.ret,
        envid=options.envid,
    )
    if not request.recipients and not request.extract:
        print(USAGE, file=sys.stderr)
        return fail(EX_USAGE, "no recipients")
    try:
        config = load(options.config)
        policy = Policy(config)
    except ConfigError as exc:
        return fail(EX_CONFIG, str(exc))
    if not config.user:
        # Without a mail system user the spool's owner is trusted; the
        # first to submit may create it (as smtpd would).
        with contextlib.suppress(OSError):
            config.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    uid = os.getuid()
    planner = Planner(config, policy)
    try:
        submitter = Submitter.of_uid(uid, trusted=is_trusted(uid, config))
        # Arguments first: a bad one is reported before stdin is read.
        planner.plan(request, submitter)
    except SubmissionError as exc:
        return fail(status_of(exc), str(exc))
    except UnknownChannel as exc:
        return fail(EX_USAGE, str(exc))
    except ConfigError as exc:
        return fail(EX_CONFIG, str(exc))

    stdin = _Input()
    # The maildrop is in the local spool directory, whatever the queue's backend.
    spool = Spool(config.spool)
    try:
        if submitter.trusted:
            drop_privileges(config.user, config.spool)
            queue = open_backend(config)  # before stdin: a bad [queue] is said at once
            with contextlib.suppress(OSError):
                prepare(spool)  # users' maildrop, as soon as someone may create it
        pieces = read_lines(
            stdin,
            dot_ends=not options.ignore_dots,
            limit=config.limits.message_size,
        )
        message = read_headers(pieces)
        plan = planner.plan(request, submitter, message)
        if submitter.trusted:
            queue_id = queue.new_id()
            queue_id = queue_message(
                lambda envelope: queue.open(envelope, queue_id=queue_id),
                plan,
                message,
                datetime.now(UTC),
                queue_id=queue_id,
                milters=[m for m in config.milters if m.submit],
                staging_directory=str(spool.tmp),
            )
            done = f"queued as {queue_id}"
        else:
            name = drop(spool, request, message.octets())
            done = f"in the maildrop as {name}, for pickup"
    except SubmissionError as exc:
        return fail(status_of(exc), str(exc))
    except ConfigError as exc:
        return fail(EX_CONFIG, str(exc))
    except QueueError as exc:
        return fail(EX_TEMPFAIL, f"message not queued: {exc}")
    except MaildropError as exc:
        if exc.missing:
            return fail(
                EX_UNAVAILABLE,
                f"{exc}\nthe maildrop is made by pickup (the queue runner) or by root's submit",
            )
        return fail(EX_TEMPFAIL, f"message not queued: {exc}")
    except _Interrupted as exc:
        return fail(EX_TEMPFAIL, f"{exc}: message not queued")
    except OSError as exc:
        if exc.filename is None:
            return fail(EX_IOERR, f"cannot read the message: {exc.strerror}")
        return fail(EX_OSERR, f"{exc.filename}: {exc.strerror}")
    if options.verbose:
        print(f"{program}: {done}", file=sys.stderr)
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
