"""Moving a spool's messages into another queue (``checkque --move-from``).

Each queued and held message goes with its queue id, its envelope, its
octets (streamed) and its recorded delivery state, through
:meth:`.Queue.adopt`; the spool's copy is removed only after the
target's commit.  A move cut short (a crash, a lost connection) is
finished by running it again: a message the target has already is not
copied twice (``adopt`` says so by its id), only removed from the spool.
The target remembers the id of a message delivered from it for an hour
at least (the database's rows of messages gone), so the second run
must come within that hour of the first.

The spool's deliver must not run meanwhile, lest a message be delivered
from both sides: the move holds the spool's ``deliver.lock``, as deliver
does for its life, and refuses to start without it.  Files set aside in
``corrupt/`` stay where they are, listed for the administrator.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import MessageBusy, Queue, QueuedMessage, QueueError, SetAside
from .spool import DELIVER_LOCK, Spool

log = logging.getLogger("mmdf_smtp.queue")

# The file deliver holds locked for its life (cli/deliver.py's LOCK).
_WAIT = 10.0  # seconds to wait for a checkque at work on a message of the spool


class DeliverRunning(Exception):
    """The source spool's deliver holds its lock."""


@dataclass(slots=True)
class Moved:
    """What a move did: ids copied, ids the target had already (removed
    from the spool only), ids that failed (left in the spool), and the
    files set aside that were left alone."""

    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    set_aside: list[SetAside] = field(default_factory=list)


@contextlib.contextmanager
def deliver_locked(spool: Spool) -> Iterator[None]:
    """The spool's deliver lock, held; DeliverRunning when deliver holds it."""
    fd = os.open(spool.directory / DELIVER_LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.geteuid() == 0:
            # Made by root here, it must stay the spool owner's, whose deliver opens it.
            owner = os.stat(spool.directory)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeliverRunning(
                f"deliver is running on {spool.directory} (it holds {DELIVER_LOCK}): stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


def move(
    source: Spool, target: Queue, *, report: Callable[[str, str], None] | None = None
) -> Moved:
    """Move every queued and held message of ``source`` into ``target``.

    ``report(id, outcome)`` hears of each message as it is done.  Raises
    DeliverRunning, and OSError when the spool cannot be read.
    """
    moved = Moved()
    with deliver_locked(source):
        for held in (False, True):
            for message in source.messages(held=held):
                outcome = _move_one(source, target, message, moved)
                if report is not None:
                    report(message.id, outcome)
        moved.set_aside = source.set_aside()
    return moved


def _move_one(source: Spool, target: Queue, message: QueuedMessage, moved: Moved) -> str:
    queue_id = message.id
    if message.needs:
        # Written anew by this version, it would lose what the newer one needs.
        why = f"written by a newer version: it needs {', '.join(message.needs)}"
        moved.failed.append((queue_id, why))
        log.error("id=%s: not moved: %s", queue_id, why)
        return f"not moved: {why}"
    try:
        state = source.read_state(queue_id)
        with source.open_message(queue_id) as body:
            copied = target.adopt(message, body, state)
    except KeyError:
        return "gone meanwhile"  # a checkque deleted it
    except (QueueError, ValueError, OSError) as exc:
        moved.failed.append((queue_id, str(exc)))
        log.error("id=%s: not moved: %s", queue_id, exc)
        return f"not moved: {exc}"
    # After the target's commit, and not before: a crash between the two
    # leaves the message in both, which the next run settles.
    try:
        source.delete(queue_id, wait=_WAIT)
    except (KeyError, MessageBusy, OSError) as exc:
        moved.failed.append((queue_id, f"copied, but not removed from the spool: {exc}"))
        return f"copied, but not removed from the spool: {exc}"
    (moved.copied if copied else moved.present).append(queue_id)
    return "moved" if copied else "already in the target: removed from the spool"
