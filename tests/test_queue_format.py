"""Queue records a rolled-back version reads safely: a field a reader does
not know is ignored, unless the record's ``must_understand`` names it;
then the record is a newer version's, left in the queue for it (never
delivered by this one, never set aside).  The parsers, then deliver and
checkque as programs on both backends."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.config import load
from mmdf_smtp.queue import (
    ENVELOPE_FIELDS,
    MUST_UNDERSTAND,
    DeliveryState,
    Envelope,
    NewerFormat,
    QueueBackend,
    RecipientState,
    open_backend,
)
from mmdf_smtp.queue.maildrop import MAGIC, request_from_json, request_to_json
from mmdf_smtp.queue.spool import COMMITTING, Spool, envelope_to_json, read_envelope
from mmdf_smtp.submission import Request
from queue_contract import (
    Edit,
    edit_pg_envelope,
    edit_spool_envelope,
    pg_envelope,
    spool_envelope,
    with_field,
    without_field,
)
from test_deliver_wire import BODY, configure, maildir_messages, run_deliver
from wire import checkque

pytest_plugins = ["pgcluster"]

ENVELOPE = Envelope(
    sender="sender@example.net",
    recipients=("alice@example.org",),
    channel="local",
    remote_host="client.test",
    remote_addr="127.0.0.1",
    helo="client.test",
    received=datetime(2026, 12, 7, 1, 0, 0, tzinfo=UTC),
)


def data_of(envelope: Envelope = ENVELOPE, **extra: Any) -> dict[str, Any]:
    """The envelope as a JSON object gives it, with ``extra`` fields."""
    data: dict[str, Any] = json.loads(json.dumps(envelope.to_data()))
    data.update(extra)
    return data


# -- the envelope's parser -----------------------------------------------------------


def test_a_field_it_does_not_know_is_ignored() -> None:
    assert Envelope.from_data(data_of(line_hint=True)) == ENVELOPE


def test_a_field_it_does_not_know_named_in_must_understand_is_a_newer_format() -> None:
    with pytest.raises(NewerFormat) as caught:
        Envelope.from_data(data_of(hold_for="legal", hint=1, must_understand=["hold_for"]))
    assert caught.value.needed == ("hold_for",)
    assert str(caught.value) == "written by a newer version: it needs hold_for"
    # What this version reads of it, for the administrator's listing.
    assert caught.value.envelope == ENVELOPE


def test_a_known_field_named_in_must_understand_is_read() -> None:
    held = replace(ENVELOPE, quarantine="spam", notify=("NEVER",))
    data = data_of(held, must_understand=["quarantine", "notify", "must_understand"])
    assert Envelope.from_data(data) == held


@pytest.mark.parametrize("listing", ["quarantine", [1], {"a": 1}, None])
def test_a_must_understand_that_is_not_a_list_of_names_is_not_an_envelope(
    listing: object,
) -> None:
    with pytest.raises(ValueError, match="not a list of field names") as caught:
        Envelope.from_data(data_of(must_understand=listing))
    assert not isinstance(caught.value, NewerFormat)


def test_what_is_not_an_envelope_is_still_not_one() -> None:
    for data in ([], data_of(recipients=None), {"sender": "a"}):
        with pytest.raises(ValueError, match="not an envelope") as caught:
            Envelope.from_data(data)
        assert not isinstance(caught.value, NewerFormat)


def test_writers_list_the_fields_ignoring_which_would_change_the_mails_fate() -> None:
    assert MUST_UNDERSTAND not in ENVELOPE.to_data()
    # Hints and what only describes the message are safe to ignore.
    harmless = replace(ENVELOPE, crlf=True, submitter="alice", submitter_uid=1000, tls="TLSv1.3")
    assert MUST_UNDERSTAND not in harmless.to_data()
    critical = replace(
        ENVELOPE,
        quarantine="spam",
        ret="HDRS",
        envid="x1",
        notify=("NEVER",),
        orcpt=("rfc822;a@example.org",),
    )
    assert critical.to_data()[MUST_UNDERSTAND] == ["quarantine", "ret", "envid", "notify", "orcpt"]
    assert Envelope.from_data(critical.to_data()) == critical


def test_the_envelope_line_of_most_mail_is_as_before() -> None:
    """No field set that must be understood: no ``must_understand``, and
    the line byte for byte what the version before wrote."""
    assert envelope_to_json(ENVELOPE) == (
        b'{"file_size":' + b" " * 20 + b',"sender":"sender@example.net",'
        b'"recipients":["alice@example.org"],"channel":"local","remote_host":"client.test",'
        b'"remote_addr":"127.0.0.1","helo":"client.test","received":"2026-12-07T01:00:00+00:00",'
        b'"tls":null,"smtputf8":false,"body":null,"submitter":null,"submitter_uid":null,'
        b'"quarantine":null,"ret":null,"envid":null,"notify":[],"orcpt":[],"crlf":false}\n'
    )
    held = envelope_to_json(replace(ENVELOPE, quarantine="spam"))
    assert held.endswith(b',"crlf":false,"must_understand":["quarantine"]}\n')


# Field names this version does not know, and JSON values for them.
unknown_names = st.text(min_size=1, max_size=12).filter(
    lambda name: name not in ENVELOPE_FIELDS and name not in (MUST_UNDERSTAND, "file_size")
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
envelopes = st.builds(
    Envelope,
    sender=st.text(max_size=12),
    recipients=st.lists(st.text(max_size=12), min_size=1, max_size=3).map(tuple),
    channel=st.sampled_from(["smtp", "local"]),
    remote_host=st.text(max_size=12),
    remote_addr=st.text(max_size=12),
    helo=st.text(max_size=12),
    received=st.just(ENVELOPE.received),
    quarantine=st.none() | st.text(max_size=8),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    crlf=st.booleans(),
)


@given(envelopes, st.dictionaries(unknown_names, json_values, min_size=1, max_size=4), st.data())
def test_extra_fields_round_trip_unless_listed(
    envelope: Envelope, extra: dict[str, Any], draw: st.DataObject
) -> None:
    written = json.loads(json.dumps(envelope.to_data()))
    with_extra = {**written, **extra}
    assert Envelope.from_data(json.loads(json.dumps(with_extra))) == envelope
    needed = draw.draw(st.lists(st.sampled_from(sorted(extra)), min_size=1, unique=True))
    listed = {**with_extra, MUST_UNDERSTAND: [*written.get(MUST_UNDERSTAND, []), *needed]}
    with pytest.raises(NewerFormat) as caught:
        Envelope.from_data(json.loads(json.dumps(listed)))
    assert caught.value.needed == tuple(sorted(needed))
    assert caught.value.envelope == envelope


# -- recipients' states and maildrop requests -------------------------------------


def test_a_recipients_state_keeps_the_rule() -> None:
    entry = RecipientState(recipient="a@example.org", address="a@example.org", attempts=2)
    data = entry.to_json()
    assert MUST_UNDERSTAND not in data
    assert RecipientState.from_json({**data, "hop_hint": "mx2"}) == entry
    assert RecipientState.from_json({**data, MUST_UNDERSTAND: ["attempts"]}) == entry
    with pytest.raises(NewerFormat, match="it needs relay_via"):
        RecipientState.from_json({**data, "relay_via": "mx2", MUST_UNDERSTAND: ["relay_via"]})
    whole = {"recipients": [data], "journal": [1]}
    assert DeliveryState.from_bytes(json.dumps(whole).encode()) == DeliveryState([entry])
    with pytest.raises(NewerFormat, match="it needs journal"):
        DeliveryState.from_bytes(json.dumps({**whole, MUST_UNDERSTAND: ["journal"]}).encode())


@given(
    st.dictionaries(
        unknown_names.filter(lambda n: n not in RecipientState.__dataclass_fields__),
        json_values,
        min_size=1,
        max_size=3,
    )
)
def test_a_state_with_extra_fields_round_trips(extra: dict[str, Any]) -> None:
    entry = RecipientState(recipient="a@example.org", address="b@example.org", status="deferred")
    assert RecipientState.from_json({**entry.to_json(), **extra}) == entry
    with pytest.raises(NewerFormat):
        RecipientState.from_json({**entry.to_json(), **extra, MUST_UNDERSTAND: sorted(extra)})


def test_a_maildrop_request_keeps_the_rule() -> None:
    request = Request(recipients=("bob",), ret="HDRS")
    line = MAGIC + request_to_json(request) + b"\n"
    assert json.loads(line[len(MAGIC) :])[MUST_UNDERSTAND] == ["ret"]
    assert request_from_json(line) == request
    plain = MAGIC + request_to_json(Request(recipients=("bob",))) + b"\n"
    assert MUST_UNDERSTAND.encode() not in plain
    newer = json.loads(plain[len(MAGIC) :])
    assert request_from_json(MAGIC + json.dumps({**newer, "hint": 1}).encode() + b"\n") == Request(
        recipients=("bob",)
    )
    newer.update(priority="bulk", must_understand=["priority"])
    with pytest.raises(NewerFormat, match="it needs priority"):
        request_from_json(MAGIC + json.dumps(newer).encode() + b"\n")


# -- the spool's files -----------------------------------------------------------------


def put(spool: Spool, envelope: Envelope = ENVELOPE) -> str:
    writer = spool.open(envelope)
    writer.write(BODY)
    writer.commit()
    return writer.id


def test_a_torn_file_of_a_newer_version_is_torn(tmp_path: Path) -> None:
    """The size is checked first: a file that lost its end is set aside,
    whoever wrote it."""
    spool = Spool(tmp_path / "spool")
    queue_id = put(spool)
    edit_spool_envelope(spool, queue_id, with_field("hold_for", "legal", critical=True))
    path = spool.queue / queue_id
    with open(path, "rb") as file, pytest.raises(NewerFormat):
        read_envelope(file)
    os.truncate(path, path.stat().st_size - 1)
    with open(path, "rb") as file, pytest.raises(ValueError, match="incomplete") as caught:
        read_envelope(file)
    assert not isinstance(caught.value, NewerFormat)


def test_recovery_finishes_a_newer_versions_commit_and_sets_nothing_aside(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    queue_id = put(spool)
    edit_spool_envelope(spool, queue_id, with_field("hold_for", "legal", critical=True))
    os.chmod(spool.queue / queue_id, COMMITTING)  # a crash between its rename and its mode
    Spool(tmp_path / "spool").recover()
    assert (spool.queue / queue_id).stat().st_mode & 0o777 == 0o600
    assert spool.set_aside() == []
    [listed] = spool.messages()
    assert listed.needs == ("hold_for",)


# -- deliver and checkque as programs, on both backends ------------------------------


class Site:
    """A configuration on one backend, its queue, and its records' editor."""

    def __init__(self, directory: Path, backend: str, dsn: str | None) -> None:
        queue = f'\n[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n' if dsn else ""
        self.directory = directory
        self.config = configure(directory, queue)
        self.queue: QueueBackend = open_backend(load(str(self.config)))
        self.dsn = dsn

    def put(self, envelope: Envelope) -> str:
        writer = self.queue.open(envelope)
        writer.write(BODY)
        writer.commit()
        return writer.id

    def edit(self, queue_id: str, edit: Edit) -> None:
        if self.dsn is None:
            assert isinstance(self.queue, Spool)
            edit_spool_envelope(self.queue, queue_id, edit)
        else:
            edit_pg_envelope(self.dsn, queue_id, edit)

    def stored(self, queue_id: str) -> dict[str, Any]:
        if self.dsn is None:
            assert isinstance(self.queue, Spool)
            return spool_envelope(self.queue, queue_id)
        return pg_envelope(self.dsn, queue_id)

    def deliver_once(self) -> str:
        result = run_deliver(self.config, "--once")
        assert result.returncode == 0, result.stderr
        return result.stderr.decode()

    def checkque(self, *args: str) -> str:
        result = checkque(self.config, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.decode()


@pytest.fixture(params=["spool", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    return Site(tmp_path, request.param, dsn)


def delivered(site: Site) -> list[bytes]:
    """What alice's Maildir holds (none: no Maildir yet)."""
    if not (site.directory / "mail" / "alice" / "Maildir").exists():
        return []
    return sorted(maildir_messages(site.directory, "alice").values())


AS_DELIVERED = (
    b"Return-Path: <sender@example.net>\nDelivered-To: alice@example.org\n"
    + BODY.replace(b"\r\n", b"\n")
)


def test_a_record_with_a_field_to_ignore_is_delivered(site: Site) -> None:
    queue_id = site.put(replace(ENVELOPE, received=datetime.now(UTC)))
    site.edit(queue_id, with_field("line_hint", "crlf-checked", critical=False))
    log = site.deliver_once()
    assert "newer version" not in log
    assert delivered(site) == [AS_DELIVERED]
    assert site.checkque("--json") == ""


def test_a_record_with_a_field_to_understand_waits_for_the_newer_version(site: Site) -> None:
    queue_id = site.put(replace(ENVELOPE, received=datetime.now(UTC)))
    site.edit(queue_id, with_field("hold_for", "legal", critical=True))
    log = site.deliver_once()
    warning = f"id={queue_id}: written by a newer version: it needs hold_for; left in the queue"
    assert log.count(warning) == 1, log
    assert "set aside" not in log and "moved to" not in log
    assert delivered(site) == []
    if site.dsn is None:
        corrupt = site.directory / "spool" / "corrupt"
        assert not corrupt.exists() or list(corrupt.iterdir()) == []
    [line] = site.checkque("--json").splitlines()  # no file set aside beside it
    shown = json.loads(line)
    assert (shown["id"], shown["state"], shown["needs"]) == (queue_id, "queued", ["hold_for"])
    table = site.checkque()
    assert f"\n    {warning.split(': ', 1)[1]}\n    pending    alice@example.org\n" in table
    assert re.search(rf"^{queue_id} +{len(BODY)} ", table, re.M)
    assert site.checkque("--cat", queue_id).encode() == BODY
    # Rolled forward: what the newer version needed is done with.
    site.edit(queue_id, without_field("hold_for"))
    site.deliver_once()
    assert delivered(site) == [AS_DELIVERED]
    assert site.checkque("--json") == ""


def test_a_quarantined_records_must_understand_names_quarantine(site: Site) -> None:
    queue_id = site.put(replace(ENVELOPE, quarantine="spam score 12"))
    assert site.stored(queue_id)[MUST_UNDERSTAND] == ["quarantine"]
    plain = site.put(ENVELOPE)
    assert MUST_UNDERSTAND not in site.stored(plain)
    lines = site.checkque("--json").splitlines()
    shown = {json.loads(line)["id"]: json.loads(line) for line in lines}
    assert shown[queue_id]["state"] == "held" and shown[queue_id]["needs"] == []


def test_a_newer_versions_message_is_not_moved_out_of_a_spool(tmp_path: Path) -> None:
    """Moved, it would be written anew by this version, what it needs lost."""
    from mmdf_smtp.queue.move import move

    source = Spool(tmp_path / "old")
    queue_id = put(source)
    edit_spool_envelope(source, queue_id, with_field("hold_for", "legal", critical=True))
    target = Spool(tmp_path / "new")
    moved = move(source, target)
    assert moved.failed == [(queue_id, "written by a newer version: it needs hold_for")]
    assert [m.id for m in source.messages()] == [queue_id]
    assert list(target.messages()) == []
