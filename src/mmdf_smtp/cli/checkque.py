"""checkque: what is in the queue.

    checkque [-c config] [--json] [--cat ID]

Without options, a table with a line per message and one under it per
recipient with its delivery state (pending, deferred, delivered, bounced),
and the reason a filter gave, for a message held in quarantine;
``--json`` one object a line per message, ``states`` holding the same and
``state`` saying ``queued``.  Files set aside in ``corrupt/`` (a queue file
that cannot be read whole, a submission pickup refused) follow, in a table
of their own, or in ``--json`` as objects whose ``state`` is ``corrupt``,
with ``id``, ``size``, ``reason`` and ``path``.  ``--cat ID`` writes the
stored message to stdout (exit 69, EX_UNAVAILABLE, when no such message is
queued); for a file set aside, its octets as they are, envelope line and
all, since it may not have one.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import UTC, datetime

from ..queue.spool import DEFERRED, DeliveryState, QueuedMessage, RecipientState, Spool
from .common import EX_OK, EX_UNAVAILABLE, ArgumentParser, load_config


def _utc(moment: datetime | None, layout: str = "%Y-%m-%dT%H:%M:%SZ") -> str | None:
    return moment.astimezone(UTC).strftime(layout) if moment is not None else None


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


def as_json(message: QueuedMessage, state: DeliveryState) -> str:
    envelope = message.envelope
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
            "quarantine": envelope.quarantine,
            "states": [state_as_json(entry) for entry in state.recipients],
            "state": "queued",
        },
        ensure_ascii=False,
    )


def as_row(message: QueuedMessage) -> str:
    envelope = message.envelope
    received = envelope.received.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    recipients = envelope.recipients[0] if envelope.recipients else ""
    if len(envelope.recipients) > 1:
        recipients += f" (+{len(envelope.recipients) - 1})"
    sender = f"<{envelope.sender}>"
    held = "" if envelope.quarantine is None else f"\n    quarantined: {envelope.quarantine}"
    return (
        f"{message.id}  {message.size:>9}  {received}  {envelope.channel:<8}  "
        f"{sender}  {recipients}{held}"
    )


def corrupt_as_json(spool: Spool, name: str, size: int, reason: str) -> str:
    return json.dumps(
        {
            "id": name,
            "state": "corrupt",
            "size": size,
            "reason": reason,
            "path": str(spool.corrupt / name),
        },
        ensure_ascii=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="checkque", description="Show the queue.")
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON object a line")
    shown.add_argument("--cat", metavar="ID", help="write the stored message to stdout")
    args = parser.parse_args(argv)
    config = load_config("checkque", args.config)
    spool = Spool(config.spool)
    if args.cat:
        try:
            stored = spool.open_message(args.cat)
        except KeyError:
            try:
                stored = spool.open_set_aside(args.cat)
            except KeyError:
                print(f"checkque: {args.cat}: no such message in the queue", file=sys.stderr)
                return EX_UNAVAILABLE
        with stored:
            shutil.copyfileobj(stored, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return EX_OK
    count = total = 0
    for message in spool.messages():
        try:
            state = spool.read_state(message.id) or DeliveryState.untouched(message.envelope)
        except ValueError as exc:
            print(f"checkque: {exc}", file=sys.stderr)
            state = DeliveryState()
        if args.json:
            print(as_json(message, state))
        else:
            if count == 0:
                print(f"{'id':<26}  {'size':>9}  {'received (UTC)':<19}  {'channel':<8}  from  to")
            print(as_row(message))
            for entry in state.recipients:
                print(state_as_row(entry))
        count += 1
        total += message.size
    if not args.json:
        print(f"{count} messages, {total} bytes" if count else "queue is empty")
    set_aside = spool.set_aside_files()
    for name, size, reason in set_aside:
        if args.json:
            print(corrupt_as_json(spool, name, size, reason))
    if set_aside and not args.json:
        print(f"\nset aside in {spool.corrupt} (never delivered; see checkque --cat ID):")
        for name, size, reason in set_aside:
            print(f"{name:<26}  {size:>9}  {reason}")
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
