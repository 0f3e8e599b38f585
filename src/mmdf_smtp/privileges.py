"""Who the mail system runs as: never root.

A program started as root (smtpd to bind port 25, smtpsrvr or smtpd under
an inetd that runs it as root, deliver, root's submit) reads its
configuration, tables and keys, binds, and then becomes the configured
``user`` before it reads a byte from a client or writes the spool.
Started as anyone else it stays who it is.
"""

from __future__ import annotations

import importlib
import logging
import os
import pwd
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


def drop_privileges(user: str | None, spool: Path) -> None:
    """When root, become ``user``, and give it the spool.

    Raises ConfigError when ``user`` is unset, unknown or root itself:
    sessions face the Internet, and nothing of the mail system needs root
    once its sockets are bound.
    """
    if os.geteuid() != 0:
        return
    if not user:
        raise ConfigError("user: not set; the mail system never runs as root")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"user: {user!r} is root; the mail system never runs as root")
    _import_lazy_modules()
    spool.mkdir(parents=True, exist_ok=True)
    # The spool's folders are the user's, always (a few stats); the files in
    # them only need it when the spool is taken over (first start, or one
    # root made), which is once, not per session: smtpsrvr runs per session.
    adopting = spool.stat().st_uid != entry.pw_uid
    folders = [spool, *(path for path in spool.iterdir() if path.is_dir())]
    submitted = (spool / "maildrop", spool / "pickup")
    for path in spool.rglob("*") if adopting else folders:
        # The owner of a submitted file is who submitted it (queue/maildrop.py).
        if path.parent not in submitted and path.stat().st_uid != entry.pw_uid:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chown(spool, entry.pw_uid, entry.pw_gid)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if not os.access(spool, os.R_OK | os.W_OK | os.X_OK):
        # A folder on the way (a checkout under /root, say) shuts the user out:
        # say so now, not as a 451 to every client.
        raise ConfigError(f"spool: {spool} cannot be reached by user {user!r}")
