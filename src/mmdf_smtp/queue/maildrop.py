"""The maildrop: how users who may not write the spool hand messages in.

The spool belongs to the mail system's user (mode 0700); root and that
user queue directly.  Anyone else's ``submit`` writes the message into
``<spool>/maildrop/`` (mode 1733: anyone may create a file there, no one
but the owner may list it, and the sticky bit keeps users off each
other's files), as classic Postfix's postdrop did.  :func:`pickup`, run
by the spool's owner (the queue runner calls it at the start of each
pass), turns each file into a queued message.

Layout, beside the spool's ``tmp/`` and ``queue/``::

    <spool>/maildrop/.<random>   a file being written by submit
    <spool>/maildrop/<random>    a complete submission
    <spool>/pickup/<id>          a submission claimed by pickup, or its queued form
    <spool>/corrupt/<id>         what pickup refused, kept for the administrator

A maildrop file is one line, ``MMDF-MAILDROP 1 `` and the request as JSON
(recipients, -f, -F, -t, -B), then the message as submit read it (CRLF
line ends, the terminating "." already taken off).  Nothing in it is
trusted: the submitter is the file's owner (``st_uid``, which a user
cannot forge), and pickup decides sender and trace from that uid alone,
through the same :class:`~mmdf_smtp.submission.Planner` that ``submit``
uses, recipient checks included.

Pickup is idempotent across a crash.  It claims a file by renaming it to
``pickup/<id>``, where users cannot reach it.  The queued form is written
to ``tmp/<id>`` by the spool's own writer (:meth:`.Spool.open_claimed`:
the same envelope line, seal and fsyncs as a message smtpd receives) and
renamed over the claim: that rename is the commit, one atomic step from
"submission" to "queued message", and the file then moves on to
``queue/<id>``.  Whatever a crash leaves in ``pickup/`` is
told apart by owner: a file of the spool's owner is a committed message
(moved on to ``queue/``), anyone else's a claim to do again.  So a
submission is never queued twice and never lost.

Into another queue (a database: :func:`pickup`'s ``into``), the same
steps up to the queued form in ``pickup/<id>``, which is then handed over
by :meth:`.Queue.adopt` under its id and removed after that commit.  A
crash between the two leaves it in ``pickup/``, the spool owner's, and
the next pickup adopts it again: the queue, which holds that id already
(or held it within the hour), takes nothing twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ..config import Config, ConfigError
from ..policy import Policy
from ..protocol import dsnparams
from ..submission import (
    FilterRefused,
    Message,
    Planner,
    Request,
    SubmissionError,
    Submitter,
    queue_message,
    read_headers,
    read_lines,
)
from . import (
    NewerFormat,
    Queue,
    QueuedMessage,
    QueueError,
    known_fields,
    must_understand,
    warn_newer_format,
)
from .spool import Spool, _fsync_directory, read_envelope

log = logging.getLogger("mmdf_smtp.maildrop")

MAGIC = b"MMDF-MAILDROP 1 "
MAILDROP_MODE = 0o1733
# A request line longer than this is not one submit wrote.
_MAX_REQUEST = 1024 * 1024
# A file still called ".name" this long after its last write was abandoned.
STALE = 24 * 3600


class MaildropError(Exception):
    """The maildrop cannot take a message; ``missing`` when it is not set up."""

    def __init__(self, message: str, *, missing: bool = False, full: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        self.full = full


def maildrop_dir(spool: Spool) -> Path:
    return spool.directory / "maildrop"


def spool_owner(config: Config) -> tuple[int, int] | None:
    """Whom root gives what it creates in the spool: the configured ``user``.

    None when not root or no user is configured (files are then the
    caller's).  Raises ConfigError when the user does not exist.
    """
    if os.geteuid() != 0 or not config.user:
        return None
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(f"{config.source}: user: no such user {config.user!r}") from None
    return entry.pw_uid, entry.pw_gid


def prepare(spool: Spool, owner: tuple[int, int] | None = None) -> None:
    """Create the maildrop and the directories pickup writes, owned by ``owner`` if given.

    The spool directory becomes searchable by all (0711, still not
    listable) so that users reach ``maildrop/``; ``tmp/`` and ``queue/``
    stay 0700.  Raises OSError.
    """
    drop = maildrop_dir(spool)
    private = [
        spool.tmp,
        spool.queue,
        spool.hold_dir,
        spool.directory / "pickup",
        spool.directory / "corrupt",
    ]
    spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    drop.mkdir(exist_ok=True)
    for path in private:
        path.mkdir(mode=0o700, exist_ok=True)
    for path in (spool.directory, drop, *private):
        info = path.stat()
        if owner is not None and (info.st_uid, info.st_gid) != owner:
            os.chown(path, *owner)
    mode = stat.S_IMODE(spool.directory.stat().st_mode)
    if mode & 0o011 != 0o011:
        os.chmod(spool.directory, mode | 0o011)
    # mkdir's mode passes through the umask; the sticky bit must be exact.
    if stat.S_IMODE(drop.stat().st_mode) != MAILDROP_MODE:
        os.chmod(drop, MAILDROP_MODE)


# The request's fields, and those a pickup must not ignore when set
# (docs/design.md, "Queue format"): DSN's, as in the envelope.
_REQUEST_FIELDS = frozenset(
    ("recipients", "sender", "full_name", "extract", "body", "notify", "ret", "envid")
)
_REQUEST_CRITICAL: dict[str, Any] = {"notify": None, "ret": None, "envid": None}


def request_to_json(request: Request) -> bytes:
    data: dict[str, Any] = {
        "recipients": list(request.recipients),
        "sender": request.sender,
        "full_name": request.full_name,
        "extract": request.extract,
        "body": request.body,
        "notify": list(request.notify) if request.notify is not None else None,
        "ret": request.ret,
        "envid": request.envid,
    }
    must_understand(data, _REQUEST_CRITICAL)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def request_from_json(line: bytes) -> Request:
    """The request of a maildrop file's first line; ValueError when it is
    not one, :class:`NewerFormat` when a newer submit wrote it (fields this
    version does not know are ignored unless its ``must_understand`` names them)."""
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise ValueError("not a maildrop file")
    data: Any = json.loads(line[len(MAGIC) :])
    if not isinstance(data, dict):
        raise ValueError("the request is not a JSON object")
    data = known_fields(data, _REQUEST_FIELDS)
    recipients = data.get("recipients")
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ValueError("recipients: not a list of strings")
    sender, full_name = data.get("sender"), data.get("full_name")
    extract, body = data.get("extract"), data.get("body")
    if not all(v is None or isinstance(v, str) for v in (sender, full_name)):
        raise ValueError("sender and full_name must be strings")
    if not isinstance(extract, bool) or body not in (None, "7BIT", "8BITMIME"):
        raise ValueError("bad extract or body")
    # DSN's, absent from files dropped before; checked as the SMTP side checks them.
    notify, ret, envid = data.get("notify"), data.get("ret"), data.get("envid")
    if notify is not None:
        if not isinstance(notify, list) or not all(isinstance(n, str) for n in notify):
            raise ValueError("notify: not a list of strings")
        notify = dsnparams.parse_notify(",".join(notify))
    if ret is not None:
        ret = dsnparams.parse_ret(ret if isinstance(ret, str) else None)
    if envid is not None:
        envid = dsnparams.parse_envid(
            dsnparams.encode_xtext(envid) if isinstance(envid, str) else None
        )
    return Request(
        recipients=tuple(recipients),
        sender=sender,
        full_name=full_name,
        extract=extract,
        body=body,
        notify=notify,
        ret=ret,
        envid=envid,
    )


def drop(spool: Spool, request: Request, octets: Iterable[bytes]) -> str:
    """Write a submission into the maildrop as the calling user; its file name.

    The file is written under a random dot-name (created O_EXCL, so no one
    else's file is touched), fsynced, and renamed to its final name, which
    pickup may take from then on.  The submitter cannot open the maildrop
    to fsync it (it is not readable to them); the file is fsynced again
    after the rename, which on journalling file systems commits the
    rename too.  Raises MaildropError, or what reading ``octets`` raises;
    either way no file is left.
    """
    directory = maildrop_dir(spool)
    name = secrets.token_hex(16)
    partial = directory / f".{name}"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        missing = exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR)
        raise MaildropError(
            f"cannot write to the maildrop {directory}: {exc.strerror}", missing=missing
        ) from exc
    try:
        with os.fdopen(fd, "wb", buffering=256 * 1024) as file:
            # The spool's owner reads it; its name, in a directory no user
            # can list, keeps it from everyone else.
            os.fchmod(file.fileno(), 0o644)
            file.write(MAGIC + request_to_json(request) + b"\n")
            for data in octets:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
            os.rename(partial, directory / name)
            os.fsync(file.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise MaildropError(f"cannot write to the maildrop: {exc.strerror}", full=full) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return name


def _nothing_in(*folders: Path) -> bool:
    """Whether each of ``folders`` exists and is empty.  One missing or
    unreadable is not: :func:`prepare` has yet to make it, or says why not."""
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                if next(entries, None) is not None:
                    return False
        except OSError:
            return False
    return True


def _trusted_uids(config: Config) -> set[int]:
    """Whose files in ``pickup/`` are queued messages: root, us, the spool's user."""
    uids = {0, os.geteuid()}
    if config.user:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(config.user).pw_uid)
    return uids


class _Pickup:
    def __init__(
        self,
        spool: Spool,
        config: Config,
        policy: Policy,
        owner: tuple[int, int] | None,
        into: Queue | None = None,
    ) -> None:
        self.spool = spool
        self.into = into
        self.owner = owner
        self.config = config
        self.planner = Planner(config, policy)
        self.maildrop = maildrop_dir(spool)
        self.claims = spool.directory / "pickup"
        self.corrupt = spool.directory / "corrupt"
        self.trusted = _trusted_uids(config)
        self.queued: list[str] = []

    def set_aside(self, path: Path, reason: str) -> None:
        # A fresh id: a name from the maildrop is the user's choice.
        target = self.corrupt / self.spool.new_id()
        try:
            os.rename(path, target)
        except OSError as exc:
            log.warning("pickup: %s: %s; cannot move it aside: %s", path, reason, exc.strerror)
            return
        log.warning("pickup: %s: %s; moved to %s", path, reason, target)

    def claim(self, source: Path) -> Path | None:
        """Rename a file into ``pickup/`` under a new queue id, out of users' reach."""
        claim = self.claims / self.spool.new_id()
        try:
            os.rename(source, claim)
        except FileNotFoundError:
            return None
        _fsync_directory(self.claims)
        return claim

    def take(self, name: str) -> None:
        """Claim and queue one maildrop file."""
        source = self.maildrop / name
        try:
            info = os.lstat(source)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            log.warning("pickup: %s: a directory, left alone", source)
            return
        if info.st_uid in self.trusted:
            # Root and the mail system queue directly; a file of theirs in
            # pickup/ would be taken for a queued message after a crash.
            self.set_aside(source, f"owned by uid {info.st_uid}, who does not use the maildrop")
            return
        claim = self.claim(source)
        if claim is not None:
            self.process(claim)

    def recover(self, name: str) -> None:
        """Finish what a crashed pickup left in ``pickup/``."""
        path = self.claims / name
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_uid in self.trusted:
            self.finish(path)
            return
        # A claim not yet queued: claimed again, under an id of this process,
        # whose tmp/ file no recovery of the spool takes for a dead writer's.
        claim = self.claim(path)
        if claim is not None:
            self.process(claim)

    def process(self, claim: Path) -> None:
        """Queue a claimed file, or set it aside; QueueError leaves it for later."""
        try:
            fd = os.open(claim, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            # A symbolic link, a socket, a file its owner made unreadable:
            # set aside, lest one user's file stop every pass.
            reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            self.set_aside(claim, f"cannot be opened: {reason}")
            return
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                self.set_aside(claim, "not a regular file")
            elif info.st_uid in self.trusted:
                self.set_aside(claim, f"owned by uid {info.st_uid}")
            elif info.st_nlink != 1:
                self.set_aside(claim, f"{info.st_nlink} links (a file of someone else?)")
            else:
                self.queue_submission(claim, file, info.st_uid)

    def finish(self, claim: Path) -> None:
        """A queued message a crash left in ``pickup/``: on into the queue.

        One a newer version queued moves on into the spool's queue/ as it
        is (a rename), for that version to deliver; into another queue it
        would be written anew, its fields this version does not know lost:
        it stays in ``pickup/`` for that version's pickup."""
        try:
            with open(claim, "rb") as file:
                envelope = read_envelope(file)
        except NewerFormat as exc:
            if exc.envelope is None or self.into is not None:
                warn_newer_format(claim.name, exc)
                return
            envelope = exc.envelope
        except ValueError as exc:
            self.set_aside(claim, f"owned by the mail system but not a queued message ({exc})")
            return
        if self.into is not None:
            self.hand_on(claim)
        else:
            self.spool.enqueue_claimed(claim, into_hold=envelope.quarantine is not None)
        self.queued.append(claim.name)
        log.info("pickup: queued id=%s (committed before a restart)", claim.name)

    def hand_on(self, claim: Path) -> bool:
        """A queued form in ``pickup/`` into the other queue, then removed:
        False when that queue had it already.  Raises QueueError."""
        assert self.into is not None
        try:
            with open(claim, "rb") as file:
                envelope = read_envelope(file)
                size = os.fstat(file.fileno()).st_size - file.tell()
                message = QueuedMessage(
                    claim.name, envelope, size, held=envelope.quarantine is not None
                )
                adopted = self.into.adopt(message, file, None)
            os.unlink(claim)
            _fsync_directory(self.claims)
        except (OSError, ValueError) as exc:
            raise QueueError(f"cannot hand {claim.name} on: {exc}") from exc
        return adopted

    def queue_submission(self, claim: Path, file: BinaryIO, uid: int) -> None:
        try:
            request = request_from_json(file.readline(_MAX_REQUEST))
        except NewerFormat as exc:
            # Left claimed: the newer version's pickup takes it.  Claimed
            # anew at each pass, under a new name: the file's inode names it
            # for the warning, given once.
            key = f"maildrop inode {os.fstat(file.fileno()).st_ino}"
            warn_newer_format(claim.name, exc, key=key, where="pickup/")
            return
        except ValueError as exc:
            self.set_aside(claim, f"not a maildrop file ({exc})")
            return
        try:
            submitter = Submitter.of_uid(uid, trusted=False)
            pieces = read_lines(file, dot_ends=False, limit=self.config.limits.message_size)
            message: Message = read_headers(pieces)
            plan = self.planner.plan(request, submitter, message)
            now = datetime.now(UTC)
            queue_id = queue_message(
                lambda envelope: self.spool.open_claimed(
                    envelope, claim, owner=self.owner, move_on=self.into is None
                ),
                plan,
                message,
                now,
                queue_id=claim.name,
                milters=[m for m in self.config.milters if m.submit],
                staging_directory=str(self.spool.tmp),
            )
        except FilterRefused as exc:
            if exc.temporary:
                # Left claimed: the next pass tries it again.
                raise QueueError(f"{claim.name}: a milter said: {exc}") from exc
            self.set_aside(claim, f"uid {uid}: refused by a milter: {exc}")
            return
        except SubmissionError as exc:
            self.set_aside(claim, f"uid {uid}: {exc}")
            return
        except OSError as exc:
            raise QueueError(f"cannot read {claim}: {exc.strerror}") from exc
        if self.into is not None:
            self.hand_on(claim)
        self.queued.append(queue_id)
        log.info(
            "pickup: queued id=%s uid=%d from=<%s> to=%s",
            queue_id,
            uid,
            plan.sender,
            ",".join(f"<{r}>" for r in plan.recipients),
        )

    def remove_stale(self, name: str) -> None:
        path = self.maildrop / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if time.time() - info.st_mtime > STALE:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            except OSError as exc:
                log.warning("pickup: %s: abandoned, cannot remove it: %s", path, exc.strerror)
                return
            log.warning("pickup: removed %s, abandoned by uid %d", path, info.st_uid)


def pickup(
    spool: Spool, config: Config, *, policy: Policy | None = None, into: Queue | None = None
) -> list[str]:
    """Queue what users left in the maildrop; return the new queue ids.

    ``spool``: where the maildrop lies (its ``maildrop/``, ``pickup/`` and
    ``corrupt/``); ``into``: the queue the messages go into, when not that
    spool (the configured backend, :func:`.open_backend`).

    Run as the spool's owner, before each queue run.  One pickup runs at a
    time (a lock on ``pickup/``); a second returns at once with nothing.
    Files that cannot be queued (not a submission, a refused recipient,
    too big) are moved to ``corrupt/`` with a warning logged.  When a
    message cannot be written (a full disk), the error is logged and the
    rest wait for the next pass.  Raises OSError when the spool cannot be
    prepared, and ConfigError when the configuration has no ``local``
    channel or its ``user`` does not exist.  Run as root, pickup gives
    what it creates to ``user``.
    """
    if _nothing_in(maildrop_dir(spool), spool.directory / "pickup"):
        return []  # deliver asks at each new mail: the usual answer costs two reads
    owner = spool_owner(config)
    prepare(spool, owner)
    if into is spool:
        into = None
    job = _Pickup(spool, config, policy or Policy(config), owner, into)
    lock = os.open(job.claims, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        try:
            for name in sorted(os.listdir(job.claims)):
                job.recover(name)
            for name in sorted(os.listdir(job.maildrop)):
                if name.startswith("."):
                    job.remove_stale(name)
                else:
                    job.take(name)
        except (QueueError, OSError) as exc:
            # Most likely a full disk: the rest wait for the next pass.
            log.error("pickup: stopped: %s", exc)
    finally:
        os.close(lock)
    return job.queued
