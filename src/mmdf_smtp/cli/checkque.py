"""checkque: what is in the queue, and the administrator's commands on it.

    checkque [-c config] [--json] [--cat ID] [filters]
    checkque [-c config] [--wait SECONDS] --hold|--release|--delete|--flush ID...|ALL [filters]
    checkque [-c config] --move-from SPOOL

Without options, a table with a line per message (queued in ``queue/`` or
held in ``hold/``) and one under it per recipient with its delivery state
(pending, deferred, delivered, bounced); a held message has its
quarantine reason, if a filter gave one, on a line of its own.
``--json`` writes one object a line per message, ``states`` holding the
same and ``state`` saying ``queued`` or ``held`` (``quarantine``: the
reason, or null; ``needs``: the fields a newer version wrote that this
one must understand but does not, which deliver leaves in the queue,
shown in the table on a line of their own).  Files set aside in ``corrupt/`` (a queue file that
cannot be read whole, a submission pickup refused) follow, in a table of
their own, or in ``--json`` as objects whose ``state`` is ``corrupt``,
with ``id``, ``size``, ``reason`` and ``path``.  ``--cat ID`` writes the
stored message to stdout (exit 69, EX_UNAVAILABLE, when there is no such
message); for a file set aside, its octets as they are, envelope line and
all, since it may not have one.

The commands, as Postfix's postsuper and postqueue: ``--hold`` moves
messages into ``hold/``, where deliver never looks; ``--release`` moves
them back; ``--delete`` removes them (a file set aside too); ``--flush``
asks the running deliver to try their deferred recipients now.  ``ALL``
stands for every message, or, with filters, for those the filters select.
A message deliver is working is not touched: checkque waits for it up to
``--wait`` seconds, then says it is busy.  Exit status: 0 when every
message was acted on, 1 when some were not (no such message, busy, no
deliver listening), 64 for bad arguments.

``--move-from SPOOL`` moves every queued and held message of the spool
directory SPOOL, with its id and recorded delivery state, into the
configured queue (a database, when a site leaves its spool behind), and
lists the files set aside there, which stay (see :mod:`..queue.move`).
The spool's deliver must be stopped (exit 75 while it runs); a move cut
short is finished by running it again, and copies nothing twice.  Exit
1 when some message could not be moved.

Every id may be given as the 250 reply names it, ``msg.<id>``.  A size is
the stored message's as queued, trace header included (the log's
``size=`` is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from ..queue import (
    DEFERRED,
    DeliveryState,
    MessageBusy,
    NewerFormat,
    QueueAdmin,
    QueueBackend,
    QueuedMessage,
    RecipientState,
    SetAside,
    queue_id_of,
)
from ..queue.move import DeliverRunning, move
from ..queue.spool import Spool
from .common import (
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    ArgumentParser,
    load_config,
    open_queue,
    setup_logging,
)

EX_NOT_ALL = 1  # some of the messages named were not acted on
ALL = "ALL"
QUEUED = "queued"
HELD = "held"
CORRUPT = "corrupt"
STATES = (QUEUED, DEFERRED, HELD, CORRUPT)
DEFAULT_WAIT = 10.0  # seconds a command waits for deliver to finish a message
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
LONGEST = 100 * 365 * 86400  # seconds: an age beyond any queue's
_DURATION = re.compile(r"([0-9]+)([smhdw]?)")


def duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` or ``1w``; ValueError for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (seconds, or a number and s, m, h, d or w)")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > LONGEST:
        raise ValueError(f"{text!r} is longer than a century")
    return timedelta(seconds=seconds)


def _utc(moment: datetime | None, layout: str = "%Y-%m-%dT%H:%M:%SZ") -> str | None:
    return moment.astimezone(UTC).strftime(layout) if moment is not None else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(slots=True)
class Listed:
    """A message as checkque shows it: where it lies and its delivery state."""

    message: QueuedMessage
    state: DeliveryState
    # Fields of its envelope or state a newer version wrote that this one
    # must understand but does not: deliver leaves it in the queue.
    needs: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return HELD if self.message.held else QUEUED

    @property
    def deferred(self) -> bool:
        return any(entry.status == DEFERRED for entry in self.state.recipients)


def _address_matches(wanted: str, address: str) -> bool:
    """An exact address (case aside), or with ``@domain`` every address of that domain.

    Not a substring: ``--delete ALL --sender example.net`` must not remove
    more than the administrator meant.
    """
    if wanted.startswith("@") and len(wanted) > 1:
        return address.lower().endswith(wanted.lower())
    return address.lower() == wanted.lower()


def _sender_matches(wanted: str, sender: str) -> bool:
    if wanted in ("", "<>"):
        return sender == ""  # the null reverse path: bounces
    return _address_matches(wanted, sender)


@dataclass(slots=True)
class Selection:
    """The listing's filters; all given must hold.  No filter: everything."""

    sender: str | None = None  # "" or "<>": the null sender
    recipient: str | None = None
    older_than: timedelta | None = None
    states: set[str] = field(default_factory=set)

    @property
    def given(self) -> bool:
        return bool(
            self.sender is not None or self.recipient is not None or self.older_than or self.states
        )

    def takes(self, listed: Listed, now: datetime) -> bool:
        envelope = listed.message.envelope
        if self.states:
            wanted = listed.where in self.states or (
                DEFERRED in self.states and listed.where == QUEUED and listed.deferred
            )
            if not wanted:
                return False
        if self.sender is not None and not _sender_matches(self.sender, envelope.sender):
            return False
        if self.recipient is not None and not any(
            _address_matches(self.recipient, r) for r in envelope.recipients
        ):
            return False
        return self.older_than is None or envelope.received <= now - self.older_than

    def takes_set_aside(self, file: SetAside, now: datetime) -> bool:
        """A file set aside has no envelope to match: only state and age
        (from its id, which starts with the time it was named) select it."""
        if self.sender is not None or self.recipient is not None:
            return False
        if self.states and CORRUPT not in self.states:
            return False
        if self.older_than is None:
            return True
        named = _named_at(file.name)
        return named is not None and named <= now - self.older_than


def _named_at(name: str) -> datetime | None:
    """When a queue id was made: its first 14 hex digits are microseconds
    since the epoch; None for a name that is not one."""
    try:
        return datetime.fromtimestamp(int(name[:14], 16) / 1e6, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def state_as_json(entry: RecipientState) -> dict[str, object]:
    return {
        "recipient": entry.recipient,
        "address": entry.address,
        "status": entry.status,
        "attempts": entry.attempts,
        "last_reply": entry.last_reply,
        "last_try": _utc(entry.last_try),
        "next_try": _utc(entry.next_try),
    }


def state_as_row(entry: RecipientState) -> str:
    row = f"    {entry.status:<9}  {entry.address}"
    if entry.address.lower() != entry.recipient.lower():
        row += f" (for {entry.recipient})"
    if entry.status == DEFERRED:
        row += f"; try {entry.attempts + 1} at {_utc(entry.next_try, '%Y-%m-%d %H:%M:%S')}"
    if entry.last_reply:
        row += f"; {entry.last_reply}"
    return row


def as_json(listed: Listed) -> str:
    message, envelope = listed.message, listed.message.envelope
    return json.dumps(
        {
            "id": message.id,
            "sender": envelope.sender,
            "recipients": list(envelope.recipients),
            "channel": envelope.channel,
            "remote_host": envelope.remote_host,
            "remote_addr": envelope.remote_addr,
            "helo": envelope.helo,
            "size": message.size,
            "received": envelope.received.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tls": envelope.tls,
            "smtputf8": envelope.smtputf8,
            "body": envelope.body,
            "submitter": envelope.submitter,
            "submitter_uid": envelope.submitter_uid,
            "states": [state_as_json(entry) for entry in listed.state.recipients],
            "state": listed.where,
            "quarantine": envelope.quarantine,
            "needs": list(listed.needs),
        },
        ensure_ascii=False,
    )


_HEADINGS = ("id", "size", "received (UTC)", "channel", "state", "from", "to")


def table(listed: list[Listed]) -> list[str]:
    """The messages as lines, their columns as wide as the widest entry in them."""
    rows: list[tuple[str, ...]] = []
    for entry in listed:
        envelope = entry.message.envelope
        recipients = envelope.recipients[0] if envelope.recipients else ""
        if len(envelope.recipients) > 1:
            recipients += f" (+{len(envelope.recipients) - 1})"
        rows.append(
            (
                entry.message.id,
                str(entry.message.size),
                envelope.received.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                envelope.channel,
                entry.where,
                f"<{envelope.sender}>",
                recipients,
            )
        )
    widths = [max(len(row[i]) for row in (_HEADINGS, *rows)) for i in range(len(_HEADINGS))]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if i == 1 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        cells[-1] = row[-1]  # the last column needs no padding
        return "  ".join(cells)

    lines = [line(_HEADINGS)]
    for entry, row in zip(listed, rows, strict=True):
        lines.append(line(row))
        if entry.message.envelope.quarantine is not None:
            lines.append(f"    quarantined: {entry.message.envelope.quarantine}")
        if entry.needs:
            lines.append(f"    {_newer_reason(entry.needs)}")
        lines.extend(state_as_row(state) for state in entry.state.recipients)
    return lines


def _newer_reason(needs: tuple[str, ...]) -> str:
    return f"written by a newer version: it needs {', '.join(needs)}; left in the queue"


def summary(listed: list[Listed], queue: QueueAdmin, *, selected: bool) -> str:
    if not listed:
        if selected:
            return f"no message in queue {queue.name} matches"
        return f"queue {queue.name} is empty"
    held = sum(1 for entry in listed if entry.message.held)
    total = sum(entry.message.size for entry in listed)
    count = _plural(len(listed), "message")
    if held:
        count += f" ({held} held)"
    return f"{count}, {_plural(total, 'byte')}"


def corrupt_as_json(queue: QueueAdmin, file: SetAside) -> str:
    return json.dumps(
        {
            "id": file.name,
            "state": CORRUPT,
            "size": file.size,
            "reason": file.reason,
            "path": os.path.join(queue.set_aside_place, file.name),
        },
        ensure_ascii=False,
    )


def corrupt_table(queue: QueueAdmin, files: list[SetAside]) -> list[str]:
    return [
        "",
        f"set aside in {queue.set_aside_place} (never delivered; see checkque --cat ID):",
        *(f"{file.name}  {file.size:>9}  {file.reason}" for file in files),
    ]


def listing(
    queue: QueueAdmin, selection: Selection, now: datetime
) -> tuple[list[Listed], list[SetAside]]:
    """The messages and files set aside that ``selection`` takes, in arrival order."""
    listed: list[Listed] = []
    wanted = selection.states
    if not wanted or wanted & {QUEUED, DEFERRED, HELD}:
        for held in (False, True):
            for message in queue.messages(held=held):
                needs = message.needs
                try:
                    state = queue.read_state(message.id) or DeliveryState.untouched(
                        message.envelope
                    )
                except KeyError:
                    continue  # delivered or deleted since it was listed
                except NewerFormat as exc:
                    state = DeliveryState()
                    needs = tuple(sorted({*needs, *exc.needed}))
                except ValueError as exc:
                    print(f"checkque: {exc}", file=sys.stderr)
                    state = DeliveryState()
                entry = Listed(message, state, needs)
                if selection.takes(entry, now):
                    listed.append(entry)
    listed.sort(key=lambda entry: entry.message.id)
    files = queue.set_aside()
    return listed, [file for file in files if selection.takes_set_aside(file, now)]


def show(queue: QueueAdmin, selection: Selection, *, as_lines: bool) -> int:
    listed, files = listing(queue, selection, datetime.now(UTC))
    if as_lines:
        for entry in listed:
            print(as_json(entry))
        for file in files:
            print(corrupt_as_json(queue, file))
        return EX_OK
    lines = table(listed) if listed else []
    lines.append(summary(listed, queue, selected=selection.given))
    if files:
        lines.extend(corrupt_table(queue, files))
    print("\n".join(lines))
    return EX_OK


def cat(queue: QueueAdmin, name: str) -> int:
    queue_id = queue_id_of(name)
    opened: BinaryIO
    try:
        opened = queue.open_message(queue_id)
    except KeyError:
        try:
            opened = queue.open_set_aside(queue_id)
        except KeyError:
            print(f"checkque: {name}: no such message in the queue", file=sys.stderr)
            return EX_UNAVAILABLE
    with opened:
        shutil.copyfileobj(opened, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return EX_OK


# -- the commands ----------------------------------------------------------------------


class _Administrator:
    """Acts on messages one at a time and keeps count.  The queue does each
    under the message's lock: never while a deliverer holds it."""

    def __init__(self, queue: QueueAdmin, wait: float) -> None:
        self.queue = queue
        self.wait = wait
        self.failed = 0
        self._held: set[str] | None = None

    def fail(self, name: str, why: str) -> None:
        print(f"checkque: {name}: {why}", file=sys.stderr)
        self.failed += 1

    def hold(self, name: str) -> None:
        def act(queue_id: str) -> str:
            return "held" if self.queue.hold(queue_id, wait=self.wait) else "already held"

        self._acting(name, act)

    def release(self, name: str) -> None:
        def act(queue_id: str) -> str:
            return "released" if self.queue.release(queue_id, wait=self.wait) else "not held"

        self._acting(name, act)

    def delete(self, name: str) -> None:
        try:
            if self.queue.delete_set_aside(queue_id_of(name)):
                print(f"{queue_id_of(name)}: deleted (set aside)")
                return
        except OSError as exc:
            self.fail(name, f"cannot delete it: {exc.strerror or exc}")
            return

        def act(queue_id: str) -> str:
            self.queue.delete(queue_id, wait=self.wait)
            return "deleted"

        self._acting(name, act)

    def flush(self, name: str) -> None:
        queue_id = queue_id_of(name)
        try:
            self.queue.read_state(queue_id)
        except KeyError:
            self.fail(name, "no such message in the queue")
            return
        except ValueError:
            pass  # there, with a state deliver will report
        if queue_id in self.held():
            self.fail(name, "held: release it first")
            return
        if not self.queue.flush(queue_id):
            self.fail(name, f"no deliver listens on {self.queue.doorbell}")
            return
        print(f"{queue_id}: flush requested")

    def held(self) -> set[str]:
        """The held messages' ids, looked up once a command."""
        if self._held is None:
            self._held = {message.id for message in self.queue.messages(held=True)}
        return self._held

    def _acting(self, name: str, act: Callable[[str], str]) -> None:
        queue_id = queue_id_of(name)
        try:
            done = act(queue_id)
        except KeyError:
            self.fail(name, "no such message in the queue")
            return
        except MessageBusy:
            self.fail(name, f"busy: being delivered (waited {self.wait:g} s)")
            return
        except OSError as exc:
            self.fail(name, f"cannot: {exc.strerror or exc}")
            return
        print(f"{queue_id}: {done}")


def _targets(queue: QueueAdmin, command: str, selection: Selection) -> list[str]:
    """What ``ALL`` stands for: the messages the command can act on that the filters select."""
    listed, files = listing(queue, selection, datetime.now(UTC))
    if command == "hold":
        return [entry.message.id for entry in listed if not entry.message.held]
    if command == "release":
        return [entry.message.id for entry in listed if entry.message.held]
    if command == "flush":
        return [entry.message.id for entry in listed if not entry.message.held]
    return [entry.message.id for entry in listed] + [file.name for file in files]


def administer(
    queue: QueueAdmin, command: str, names: list[str], selection: Selection, wait: float
) -> int:
    if names == [ALL]:
        if command == "flush" and not selection.given:
            # Everything deferred, in one word to the deliverers: deliver's own --flush.
            if not queue.flush():
                print(f"checkque: no deliver listens on {queue.doorbell}", file=sys.stderr)
                return EX_NOT_ALL
            print("flush requested")
            return EX_OK
        names = _targets(queue, command, selection)
    admin = _Administrator(queue, wait)
    act: dict[str, Callable[[str], None]] = {
        "hold": admin.hold,
        "release": admin.release,
        "delete": admin.delete,
        "flush": admin.flush,
    }
    for name in names:
        act[command](name)
    return EX_NOT_ALL if admin.failed else EX_OK


def move_from(queue: QueueBackend, directory: str) -> int:
    """Move the spool at ``directory`` into ``queue``, saying what became of each message."""
    source = Spool(Path(directory))
    if not source.queue.is_dir():
        print(f"checkque: {directory}: not a spool (it has no queue/)", file=sys.stderr)
        return EX_USAGE
    if isinstance(queue, Spool) and queue.directory.resolve() == source.directory.resolve():
        print(f"checkque: {directory} is the configured queue itself", file=sys.stderr)
        return EX_USAGE

    def report(queue_id: str, outcome: str) -> None:
        print(f"{queue_id}: {outcome}", flush=True)

    try:
        moved = move(source, queue, report=report)
    except DeliverRunning as exc:
        print(f"checkque: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as exc:
        print(f"checkque: {directory}: {exc.strerror or exc}", file=sys.stderr)
        return EX_NOT_ALL
    lines = [
        f"{_plural(len(moved.copied), 'message')} moved into {queue.name},"
        f" {len(moved.present)} there already, {len(moved.failed)} left in {directory}"
    ]
    if moved.set_aside:
        lines.append(f"left alone in {source.set_aside_place} (set aside, never moved):")
        lines.extend(f"{file.name}  {file.size:>9}  {file.reason}" for file in moved.set_aside)
    print("\n".join(lines))
    return EX_NOT_ALL if moved.failed else EX_OK


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="checkque",
        description="Show the queue, or hold, release, delete or flush messages in it.",
        epilog="An ID may be given as the 250 reply names it (msg.ID); ALL: every message "
        "the filters select.",
    )
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON object a line")
    shown.add_argument("--cat", metavar="ID", help="write the stored message to stdout")
    for command, text in (
        ("hold", "hold messages: not delivered until released"),
        ("release", "release held messages"),
        ("delete", "remove messages from the queue"),
        ("flush", "ask deliver to try the messages' deferred recipients now"),
    ):
        shown.add_argument(f"--{command}", nargs="+", metavar="ID", help=text)
    shown.add_argument(
        "--move-from",
        metavar="SPOOL",
        help="move the messages of the spool directory SPOOL into the configured queue",
    )
    chosen = parser.add_argument_group("filters (for the listing, and with ALL)")
    chosen.add_argument("--sender", metavar="ADDR", help="from ADDR (@domain: any of it; <>: null)")
    chosen.add_argument("--recipient", metavar="ADDR", help="to ADDR (@domain: any of it)")
    chosen.add_argument(
        "--older-than", metavar="AGE", help="received AGE ago or earlier (seconds, or 90m, 2h, 3d)"
    )
    chosen.add_argument(
        "--state", action="append", choices=STATES, help="in this state (may be repeated)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"wait this long for deliver to finish a message (default {DEFAULT_WAIT:g})",
    )
    return parser


def _selection(parser: ArgumentParser, args: argparse.Namespace) -> Selection:
    older_than = None
    if args.older_than is not None:
        try:
            older_than = duration(args.older_than)
        except ValueError as exc:
            parser.error(f"--older-than: {exc}")
    return Selection(
        sender=args.sender,
        recipient=args.recipient,
        older_than=older_than,
        states=set(args.state or ()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    selection = _selection(parser, args)
    command = next((c for c in ("hold", "release", "delete", "flush") if getattr(args, c)), None)
    if args.cat and selection.given:
        parser.error("--cat takes no filters")
    if command is not None:
        names: list[str] = getattr(args, command)
        if ALL in names and len(names) > 1:
            parser.error(f"--{command}: ALL stands alone")
        if selection.given and names != [ALL]:
            parser.error("filters select messages only with ALL")
    if args.wait < 0:
        parser.error("--wait: must not be negative")
    if args.move_from is not None and selection.given:
        parser.error("--move-from takes no filters")
    config = load_config("checkque", args.config)
    queue = open_queue("checkque", config)
    if args.move_from is not None:
        if config.log.startswith("syslog"):
            setup_logging("checkque", debug=False, target=config.log, log_format=config.log_format)
        return move_from(queue, args.move_from)
    if args.cat:
        return cat(queue, args.cat)
    if command is not None:
        if config.log.startswith("syslog"):
            # What the administrator did goes to the mail log, as postsuper's does.
            setup_logging("checkque", debug=False, target=config.log, log_format=config.log_format)
        return administer(queue, command, names, selection, args.wait)
    return show(queue, selection, as_lines=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
