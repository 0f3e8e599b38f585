"""Who the mail system runs as: never root.

A program started as root (smtpd to bind port 25, smtpsrvr or smtpd under
an inetd that runs it as root, deliver, root's submit) reads its
configuration, tables and keys, binds, and then becomes the configured
``user`` before it reads a byte from a client or writes the spool.
Started as anyone else it stays who it is.

smtpd's supervisor is the one exception, as Postfix's master is: it stays
root, reads no byte from a client, and on SIGHUP re-reads configuration,
tables and keys (a certificate's key is often root's alone) for the
worker processes it forks, each of which becomes ``user`` before serving.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("mmdf_smtp")

# Modules the standard library and dnspython import on first use, long after
# start-up.  They are imported while still root, because the interpreter may
# live where ``user`` cannot read (a Python under /root, mode 0700).
_LAZY_MODULES = (
    "concurrent.futures.thread",  # asyncio's default executor
    "multiprocessing.sharedctypes",
    "multiprocessing.popen_fork",
    "multiprocessing.synchronize",
    "encodings.idna",
    "encodings.punycode",
    "dns.rdtypes.ANY",
    "dns.rdtypes.IN",
    "dns.rdtypes.CH",
    "uvloop",
)


def _import_lazy_modules() -> None:
    for name in _LAZY_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # optional (uvloop): the code that wants it copes without
        # dnspython's rdata classes are found by module name per record type.
        for submodule in getattr(module, "__all__", ()) if name.startswith("dns.") else ():
            importlib.import_module(f"{name}.{submodule}")


@dataclass(frozen=True, slots=True)
class Account:
    """The configured ``user``, looked up."""

    name: str
    uid: int
    gid: int


def account(user: str | None) -> Account:
    """``user`` looked up; ConfigError when it is unset, unknown or root itself."""
    if not user:
        raise ConfigError("user: not set; the mail system never runs as root")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"user: {user!r} is root; the mail system never runs as root")
    return Account(user, entry.pw_uid, entry.pw_gid)


def drop_privileges(user: str | None, spool: Path) -> None:
    """When root, become ``user``, and give it the spool.

    Raises ConfigError when ``user`` is unset, unknown or root itself:
    sessions face the Internet, and nothing of the mail system needs root
    once its sockets are bound.
    """
    if os.geteuid() != 0:
        return
    who = prepare_account(user, spool, check=False)
    assert who is not None
    become(who)
    if not os.access(spool, os.R_OK | os.W_OK | os.X_OK):
        raise _unreachable(spool, who)


def prepare_account(user: str | None, spool: Path, *, check: bool = True) -> Account | None:
    """When root: look ``user`` up and give it the spool, staying root.

    For a process that stays root to read what only root may (smtpd's
    supervisor re-reads keys on SIGHUP) and forks the processes that
    :func:`become` the user.  None when not root: there is nobody to become.
    ``check``: raise ConfigError now if the user cannot reach the spool.
    """
    if os.geteuid() != 0:
        return None
    who = account(user)
    _import_lazy_modules()
    os.setgroups([])  # root's own groups must not lend the user access (see below)
    spool.mkdir(parents=True, exist_ok=True)
    # The spool's folders are the user's, always (a few stats); the files in
    # them only need it when the spool is taken over (first start, or one
    # root made), which is once, not per session: smtpsrvr runs per session.
    adopting = spool.stat().st_uid != who.uid
    folders = [spool, *(path for path in spool.iterdir() if path.is_dir())]
    submitted = (spool / "maildrop", spool / "pickup")
    for path in _every_path_under(spool) if adopting else folders:
        # The owner of a submitted file is who submitted it (queue/maildrop.py).
        if path.parent not in submitted and path.stat().st_uid != who.uid:
            os.chown(path, who.uid, who.gid)
    os.chown(spool, who.uid, who.gid)
    if check:
        with acting_as(who):
            reachable = os.access(spool, os.R_OK | os.W_OK | os.X_OK, effective_ids=True)
        if not reachable:
            raise _unreachable(spool, who)
    return who


def _every_path_under(top: Path) -> Iterator[Path]:
    """Each file and folder under ``top``, one at a time.

    Not ``rglob`` or ``os.walk``: they list a folder whole before its first
    entry, and a spool taken over with a long queue would cost memory in
    proportion to it.
    """
    folders = [top]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                yield Path(entry.path)


def become(who: Account) -> None:
    """Stop being root for good: ``who``'s uid and gid, no other groups."""
    os.setgroups([])
    os.setgid(who.gid)
    os.setuid(who.uid)


@contextlib.contextmanager
def acting_as(who: Account | None) -> Iterator[None]:
    """Act as ``who`` for a while (effective ids), then be root again.

    What is made meanwhile is the user's, and what it cannot reach fails as
    it would for the user.  Nothing here is for a process that serves
    clients: their processes :func:`become` the user.
    """
    if who is None:
        yield
        return
    os.setegid(who.gid)
    os.seteuid(who.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _unreachable(spool: Path, who: Account) -> ConfigError:
    # A folder on the way (a checkout under /root, say) shuts the user out:
    # say so now, not as a 451 to every client.
    return ConfigError(f"spool: {spool} cannot be reached by user {who.name!r}")
