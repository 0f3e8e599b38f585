"""Writing one message into a Maildir, exactly once across crashes.

The file name is chosen by the caller from the queue id and the
recipient's index, so it is the same on every attempt: a retry after a
crash first looks for it in ``new/`` and ``cur/`` (where a mail reader
may have moved it, with ``:2,flags`` added) and writes nothing when it is
there.  Otherwise the message is written in ``tmp/``, fsynced, linked
into ``new/`` and ``new/`` fsynced (the Maildir protocol, maildir(5)); the
deliveries into one ``new/`` at once share that fsync.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..queue.spool import GroupSync, begin_writeback

_CHUNK = 256 * 1024


def file_name(received_epoch: int, queue_id: str, index: int, hostname: str) -> str:
    """``<time>.M<queue id>R<index>.<host>``; the host with '/' and ':' escaped (maildir(5))."""
    host = hostname.replace("/", r"\057").replace(":", r"\072")
    return f"{received_epoch}.M{queue_id}R{index}.{host}"


def base_of(template: str) -> Path:
    """The fixed folder above every Maildir of ``template``: ``/var/mail`` for
    ``/var/mail/{user}/Maildir``; for a template without ``{user}``, its parent."""
    head, user, _ = template.partition("{user}")
    return Path(head) if user and head.endswith("/") else Path(head).parent


def give_base(template: str, user: str) -> None:
    """Create the folder the Maildirs go in, for ``user``, when it is missing.

    Run as root, before becoming ``user``: deliver and smtpd's commit
    processes write Maildirs as ``user`` (as smtpd serves sessions as it);
    a missing base such as ``var/mail`` is made its own, as the spool is.
    An existing folder is left as it is; the administrator chose its owner.
    """
    base = base_of(template)
    if base.exists():
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return  # dropping privileges says so
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(base, entry.pw_uid, entry.pw_gid)


def create(maildir: Path) -> None:
    """The Maildir and its three folders, private to the user, if missing."""
    for folder in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700, parents=True)


def already_delivered(maildir: Path, name: str) -> bool:
    if (maildir / "new" / name).exists():
        return True
    try:
        with os.scandir(maildir / "cur") as entries:
            return any(e.name == name or e.name.startswith(name + ":") for e in entries)
    except FileNotFoundError:
        return False


def deliver(
    maildir: Path, name: str, header: bytes, message: BinaryIO, *, look_first: bool = True
) -> bool:
    """Store ``header`` then ``message`` (CRLF turned into LF) as ``name``.

    Returns False when the message was there already.  ``look_first``
    searches ``new/`` and ``cur/`` before writing; without it (no earlier
    attempt can have written the file) only ``new/`` is guarded, by the
    link.  Raises OSError.
    """
    create(maildir)
    if look_first and already_delivered(maildir, name):
        return False
    copy = Copy(maildir, name)
    copy.write(header, message)
    try:
        copy.sync()
        if not copy.link():
            return False
        sync_new(maildir)
    finally:
        copy.abort()  # the name in tmp/
    return True


class Copy:
    """One copy on its way into a Maildir, in the steps maildir(5) asks for:
    written in ``tmp/`` (:meth:`write`), fsynced (:meth:`sync`), linked
    into ``new/`` (:meth:`link`); ``new/`` itself is synced by
    :func:`sync_new`, once for every copy linked into it meanwhile, and
    the name in ``tmp/`` removed last (:meth:`abort`).

    deliver runs the steps one copy at a time; smtpd's commit process runs
    each step for every copy of a group before the next step, so that
    their write-outs overlap and their fsyncs share journal commits, as
    the spool's commit does: a link between two fsyncs would make the
    second one commit the journal again.  The Maildir must exist
    (:func:`create`).
    """

    def __init__(self, maildir: Path, name: str) -> None:
        self.maildir = maildir
        self.name = name
        self._temporary = maildir / "tmp" / name
        self._fd = -1

    def write(self, header: bytes, message: BinaryIO, *, start_writeback: bool = False) -> None:
        """``header`` then ``message`` with LF line ends, into ``tmp/``; with
        ``start_writeback``, on its way to the disk.  Raises OSError, leaving nothing."""
        self._fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(self._fd, header)
            for chunk in lf_line_ends(message):
                _write_all(self._fd, chunk)
            if start_writeback:
                begin_writeback(self._fd)
        except BaseException:
            self.abort()
            raise

    def sync(self) -> None:
        """On stable storage, and closed.  Raises OSError, leaving nothing."""
        fd, self._fd = self._fd, -1
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self.abort()
            raise

    def link(self) -> bool:
        """Into ``new/`` under its name; False when a file of that name is
        there already.  Raises OSError."""
        try:
            # A link, not a rename: it never replaces a file of that name.
            os.link(self._temporary, self.maildir / "new" / self.name)
        except FileExistsError:
            return False
        return True

    def move(self) -> None:
        """Into ``new/`` under its name, by a rename: for a name that no one
        can have written before (a new queue id's), it spares the removal of
        the name in ``tmp/``.  Raises OSError."""
        os.rename(self._temporary, self.maildir / "new" / self.name)

    def abort(self) -> None:
        """Close it if open, and remove its name in ``tmp/``."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self._temporary)


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as whole:
        done = 0
        while done < len(whole):
            done += os.write(fd, whole[done:])


def sync_new(maildir: Path) -> None:
    """Make the links into ``maildir``'s ``new/`` so far durable.  Raises OSError."""
    _sync_of(maildir / "new").sync()


# One shared fsync per new/ for the deliveries linking into it at once:
# each waits for a sync that began after its link (as the spool's queue/),
# so that concurrent copies to one mailbox share the journal commits.
_syncs: dict[Path, GroupSync] = {}
_syncs_lock = threading.Lock()
_MOST_SYNCS = 4096  # folders remembered; one dropped is only made again


def _sync_of(folder: Path) -> GroupSync:
    with _syncs_lock:
        sync = _syncs.get(folder)
        if sync is None:
            if len(_syncs) >= _MOST_SYNCS:
                _syncs.clear()  # a thread inside an old one still holds it
            sync = _syncs[folder] = GroupSync(folder)
        return sync


def lf_line_ends(message: BinaryIO) -> Iterator[bytes]:
    """The message in chunks with each CRLF as LF; a CR split from its LF waits for it."""
    held = b""
    while data := message.read(_CHUNK):
        data = held + data
        held = b""
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        yield data.replace(b"\r\n", b"\n")
    if held:
        yield held
