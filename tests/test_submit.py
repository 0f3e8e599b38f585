"""submit, the maildrop and pickup: exit codes, envelopes and stored octets.

The suite runs as root, so submit is trusted here and queues directly.
The maildrop path is tested by handing pickup files owned by another uid
(as an untrusted user's submit leaves them), and, when an interpreter is
reachable by that user, by running submit as them under setpriv.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from email.utils import formataddr, parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from mmdf_smtp.config import load
from mmdf_smtp.queue import maildrop
from mmdf_smtp.queue.maildrop import MAGIC, drop, pickup, prepare
from mmdf_smtp.queue.spool import Spool
from mmdf_smtp.submission import PIECE, Request, read_headers, read_lines, split_addresses
from wire import PYTHON, SRC, checkque, env, queued, stored, write_config

TRACE = re.compile(
    rb"Received: \(from (?P<login>[^@]+)@localhost\)\r\n"
    rb"\tby mx\.test \(mmdf-smtp\) id (?P<id>[0-9a-f]{26}); (?P<date>[^\r]+)\r\n"
)
DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}")
ROOT_FROM = formataddr((pwd.getpwuid(0).pw_gecos.split(",")[0], "root@example.org"))


def submit(config: Path, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.submit", "-c", str(config), *args],
        input=data,
        capture_output=True,
        env=env(),
        timeout=60,
        check=False,
    )


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def only_message(config: Path) -> tuple[dict[str, Any], bytes]:
    [message] = queued(config)
    return message, stored(config, message["id"])


def after_trace(data: bytes, queue_id: str, login: str = "root") -> bytes:
    """The stored message after our Received header, which is checked here."""
    trace = TRACE.match(data)
    assert trace is not None, data[:200]
    assert trace["login"] == login.encode()
    assert trace["id"] == queue_id.encode()
    assert DATE.fullmatch(trace["date"].decode())
    return data[trace.end() :]


def added(queue_id: str, data: bytes, author: str = ROOT_FROM) -> bytes:
    """The From, Date and Message-ID submit adds, with the date it gave."""
    date = TRACE.match(data)
    assert date is not None
    return (
        f"From: {author}\r\nDate: {date['date'].decode()}\r\nMessage-ID: <{queue_id}@mx.test>\r\n"
    ).encode()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def test_a_message_is_queued_with_the_headers_it_lacks(config: Path) -> None:
    result = submit(config, "alice", data=b"Subject: hello\n\nbody line\n")
    assert (result.returncode, result.stderr) == (0, b"")
    message, data = only_message(config)
    assert message["sender"] == "root@example.org"
    assert message["recipients"] == ["alice@example.org"]
    assert message["channel"] == "local"
    assert message["remote_host"] == "localhost"
    assert (message["submitter"], message["submitter_uid"]) == ("root", 0)
    assert message["body"] is None
    assert message["size"] == len(data)
    rest = after_trace(data, message["id"])
    assert rest == b"Subject: hello\r\n" + added(message["id"], data) + b"\r\nbody line\r\n"
    date = TRACE.match(data)
    assert date is not None
    assert parsedate_to_datetime(date["date"].decode()).utcoffset() is not None


def test_headers_present_are_kept_as_they_are(config: Path) -> None:
    text = (
        b"From: Someone <someone@example.net>\r\n"
        b"Date: Mon, 23 Nov 2026 12:00:00 +0100\r\n"
        b"Message-ID: <given@example.net>\r\n"
        b"Subject: kept\r\n"
        b"\r\n"
        b"text\r\n"
    )
    assert submit(config, "bob@example.org", data=text).returncode == 0
    message, data = only_message(config)
    assert after_trace(data, message["id"]) == text


def test_line_ends_become_crlf_and_long_lines_are_stored_whole(config: Path) -> None:
    long_line = b"x" * 3000
    # A CRLF split across two reads: the CR ends the first one.
    split_crlf = b"y" * (PIECE - 1)
    giant = b"z" * (3 * PIECE + 17)
    text = b"Subject: ends\n\nlf\ncrlf\r\nbare\rcr\n" + long_line + b"\n"
    text += split_crlf + b"\r\n" + giant + b"\nno final newline"
    assert submit(config, "alice", data=text).returncode == 0
    message, data = only_message(config)
    body = after_trace(data, message["id"]).split(b"\r\n\r\n", 1)[1]
    assert body == (
        b"lf\r\ncrlf\r\nbare\rcr\r\n"
        + long_line
        + b"\r\n"
        + split_crlf
        + b"\r\n"
        + giant
        + b"\r\nno final newline\r\n"
    )
    # Its envelope says so, and deliver sends it on without looking at them.
    [queued_message] = Spool(load(str(config)).spool).messages()
    assert queued_message.envelope.crlf


def test_a_single_dot_ends_the_message_unless_i(config: Path) -> None:
    text = b"Subject: dots\n\n..two\n.\nafter the dot\n"
    assert submit(config, "alice", data=text).returncode == 0
    for option in ("-i", "-oi"):
        assert submit(config, option, "alice", data=text).returncode == 0
    first, *rest = queued(config)
    assert stored(config, first["id"]).endswith(b"\r\n\r\n..two\r\n")
    for message in rest:
        data = stored(config, message["id"])
        assert data.endswith(b"\r\n\r\n..two\r\n.\r\nafter the dot\r\n")


def test_t_takes_to_cc_and_bcc_and_removes_bcc(config: Path) -> None:
    text = (
        b"To: alice, Bob Builder <bob@example.org>\n"
        b'Cc: "Post, Master" <postmaster@example.org> (the boss)\n'
        b"Bcc: hidden@example.net,\n"
        b"  alice@example.org\n"
        b"Subject: extract\n"
        b"\n"
        b"body\n"
    )
    result = submit(config, "-t", "extra@example.net", data=text)
    assert (result.returncode, result.stderr) == (0, b"")
    message, data = only_message(config)
    assert message["recipients"] == [
        "extra@example.net",
        "alice@example.org",
        "bob@example.org",
        "postmaster@example.org",
        "hidden@example.net",
    ]
    assert after_trace(data, message["id"]) == (
        b"To: alice, Bob Builder <bob@example.org>\r\n"
        b'Cc: "Post, Master" <postmaster@example.org> (the boss)\r\n'
        b"Subject: extract\r\n" + added(message["id"], data) + b"\r\nbody\r\n"
    )


def test_bcc_is_removed_without_t_and_its_addresses_are_not_added(config: Path) -> None:
    text = b"Bcc: bob@example.org\nSubject: s\n\nb\n"
    assert submit(config, "alice", data=text).returncode == 0
    message, data = only_message(config)
    assert message["recipients"] == ["alice@example.org"]
    assert b"Bcc" not in data


def test_no_recipients_is_a_usage_error(config: Path) -> None:
    result = submit(config, data=b"Subject: x\n\n")
    assert result.returncode == 64
    assert result.stderr.decode().splitlines()[-1] == "submit: no recipients"
    result = submit(config, "-t", data=b"Subject: x\nTo: undisclosed-recipients:;\n\nb\n")
    assert result.returncode == 64
    assert result.stderr == b"submit: no recipients (none on the command line, To, Cc or Bcc)\n"
    assert queued(config) == []


def test_an_unknown_local_user_is_67_and_nothing_is_queued(config: Path) -> None:
    result = submit(config, "alice", "nosuch", data=b"Subject: x\n\nb\n")
    assert result.returncode == 67
    assert result.stderr == b"submit: <nosuch@example.org>: 550 5.1.1 No such user here\n"
    result = submit(config, "-t", data=b"To: alice, ghost@localhost\n\nb\n")
    assert result.returncode == 67
    assert result.stderr == b"submit: <ghost@localhost>: 550 5.1.1 No such user here\n"
    assert queued(config) == []
    assert entries(load(str(config)).spool / "tmp") == []


def test_the_channel_decides_relaying(config: Path) -> None:
    result = submit(config, "--channel", "other", "someone@example.net", data=b"\n")
    assert result.returncode == 77
    assert (
        result.stderr
        == b"submit: <someone@example.net>: 550 5.7.1 Relaying denied for example.net\n"
    )
    assert submit(config, "--channel", "other", "bob", data=b"b\n").returncode == 0
    [message] = queued(config)
    assert (message["channel"], message["recipients"]) == ("other", ["bob@example.org"])
    result = submit(config, "--channel", "nonesuch", "bob", data=b"b\n")
    assert result.returncode == 64
    assert b"unknown channel 'nonesuch'" in result.stderr


def test_bad_addresses(config: Path) -> None:
    result = submit(config, "alice bob", data=b"b\n")
    assert (result.returncode, result.stderr) == (64, b"submit: bad address syntax: 'alice bob'\n")
    result = submit(config, "-f", "a@", "alice", data=b"b\n")
    assert (result.returncode, result.stderr) == (64, b"submit: bad address syntax (-f): 'a@'\n")
    result = submit(config, "-t", data=b"To: alice, x@y@z\n\nb\n")
    assert result.returncode == 65
    assert result.stderr == b"submit: bad address syntax in To, Cc or Bcc: 'x@y@z'\n"
    assert queued(config) == []


def test_a_bad_configuration_is_78(tmp_path: Path) -> None:
    bad = write_config(tmp_path, "\n[limits]\nmessage_size = -1\n")
    result = submit(bad, "alice", data=b"b\n")
    assert result.returncode == 78
    assert result.stderr.decode().startswith(f"submit: {bad}:")
    assert "limits.message_size: must be at least 0" in result.stderr.decode()


def test_options_and_usage(config: Path) -> None:
    for args in (["-x", "alice"], ["-bs"], ["-B", "9BIT", "alice"]):
        result = submit(config, *args, data=b"b\n")
        assert result.returncode == 64, args
        lines = result.stderr.decode().splitlines()
        assert lines[0].startswith("usage: submit [-c config] [-f sender]")
    assert submit(config, "-x", "alice").stderr.endswith(b"submit: option -x not recognized\n")
    assert queued(config) == []


@pytest.mark.parametrize(
    ("caller", "args"),
    [
        ("cron (Debian)", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "alice"]),
        ("cronie", ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"]),
        ("mailx/mutt", ["-oem", "-oi", "-N", "failure,delay", "-R", "hdrs", "--", "alice"]),
        ("git send-email", ["-i", "-f", "root@example.org", "alice@example.org"]),
        ("PHP mail()", ["-t", "-i"]),
        ("logwatch", ["-t"]),
        ("others", ["-bm", "-v", "-em", "-odb", "-oQ/var/spool/mqueue", "-V", "id", "alice"]),
    ],
)
def test_what_sendmail_callers_pass(config: Path, caller: str, args: list[str]) -> None:
    result = submit(config, *args, data=b"To: alice\nSubject: from " + caller.encode() + b"\n\nb\n")
    assert result.returncode == 0, result.stderr
    message, data = only_message(config)
    assert message["recipients"] == ["alice@example.org"]
    assert message["sender"] == "root@example.org"
    if "-FCronDaemon" in args:
        assert b"\r\nFrom: CronDaemon <root@example.org>\r\n" in data
    if "-B8BITMIME" in args:
        assert message["body"] == "8BITMIME"
    if "-v" in args:
        assert result.stderr == f"submit: queued as {message['id']}\n".encode()


def test_root_sets_any_sender(config: Path) -> None:
    assert submit(config, "-f", "list-bounces@example.net", "alice", data=b"b\n").returncode == 0
    assert submit(config, "-r", "<>", "alice", data=b"b\n").returncode == 0
    first, second = queued(config)
    assert first["sender"] == "list-bounces@example.net"
    data = stored(config, first["id"])
    assert b"X-Authentication-Warning" not in data
    assert b"\r\nFrom: list-bounces@example.net\r\n" in data  # not root's name on it
    assert second["sender"] == ""
    assert f"\r\nFrom: {ROOT_FROM}\r\n".encode() in stored(config, second["id"])


def test_the_size_limit_applies_and_leaves_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, "\n[limits]\nmessage_size = 100\n")
    result = submit(config, "alice", data=b"Subject: big\n\n" + b"x" * 100 + b"\n")
    assert result.returncode == 65
    assert result.stderr == b"submit: message too big: over 100 octets (limits.message_size)\n"
    assert queued(config) == []
    assert entries(tmp_path / "spool" / "tmp") == []
    assert submit(config, "alice", data=b"Subject: small\n\nfits\n").returncode == 0


def test_a_mail_loop_is_refused(config: Path) -> None:
    hops = b"Received: from a by b; Tue, 24 Nov 2026 09:00:00 +0000\n"
    assert submit(config, "alice", data=hops * 100 + b"\nb\n").returncode == 0
    result = submit(config, "alice", data=hops * 101 + b"\nb\n")
    assert result.returncode == 65
    assert result.stderr == (
        b"submit: 101 Received headers: Too many Received headers: mail loop suspected\n"
    )
    assert len(queued(config)) == 1


def test_mbox_from_line_and_headerless_messages(config: Path) -> None:
    text = b"From root Tue Nov 24 09:00:00 2026\nSubject: mbox\n\nb\n"
    assert submit(config, "alice", data=text).returncode == 0
    assert submit(config, "alice", data=b"just a body line\nand another\n").returncode == 0
    first, second = queued(config)
    data = stored(config, first["id"])
    assert after_trace(data, first["id"]).startswith(b"Subject: mbox\r\nFrom: ")
    data = stored(config, second["id"])
    rest = after_trace(data, second["id"])
    assert rest == added(second["id"], data) + b"\r\njust a body line\r\nand another\r\n"


def test_an_interrupted_submit_queues_nothing(config: Path) -> None:
    process = subprocess.Popen(
        [PYTHON, "-m", "mmdf_smtp.cli.submit", "-c", str(config), "alice"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    assert process.stdin is not None and process.stderr is not None
    process.stdin.write(b"Subject: half\n\nthe first half\n")
    process.stdin.flush()
    tmp = Path(load(str(config)).spool) / "tmp"
    # The queue file appears once the headers are read: submit is in the body.
    deadline = time.monotonic() + 30
    while not (tmp.exists() and os.listdir(tmp)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(tmp), "submit never opened its queue file"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 75
    assert process.stderr.read() == b"submit: SIGTERM: message not queued\n"
    process.stdin.close()
    process.stderr.close()
    assert os.listdir(tmp) == []
    assert queued(config) == []


def test_split_addresses() -> None:
    assert split_addresses("a, B <b@x> (c), g: d@x, <e@x>;, f") == ["a", "b@x", "d@x", "e@x", "f"]
    assert split_addresses('"q, r" <q@x>, "s@t"@x, u@[IPv6:::1]') == [
        "q@x",
        '"s@t"@x',
        "u@[IPv6:::1]",
    ]
    assert split_addresses("a b") == ["a b"]
    assert split_addresses("undisclosed-recipients:;") == []
    assert split_addresses("<>") == [""]


def test_reading_pieces() -> None:
    def read(data: bytes, *, dot_ends: bool = True) -> bytes:
        return b"".join(read_lines(io.BytesIO(data), dot_ends=dot_ends, limit=0))

    assert read(b"a\nb\r\nc\r") == b"a\r\nb\r\nc\r\n"
    assert read(b"a\n.\nb\n") == b"a\r\n"
    assert read(b"a\n.\r\nb\n") == b"a\r\n"
    assert read(b"a\n.\nb\n", dot_ends=False) == b"a\r\n.\r\nb\r\n"
    assert read(b"a\n. \n.\n") == b"a\r\n. \r\n"
    long = b"d" * (PIECE - 1) + b".\n.\n"  # the dot after a long line's part is no end
    assert read(long) == b"d" * (PIECE - 1) + b".\r\n"
    message = read_headers(
        read_lines(io.BytesIO(b"A: 1\n  2\nB:3\n\nbody\n"), dot_ends=True, limit=0)
    )
    assert message.headers == [b"A: 1\r\n  2\r\n", b"B:3\r\n"]
    assert list(message.field_values("a")) == ["1  2"]
    assert b"".join(message.octets()) == b"A: 1\r\n  2\r\nB:3\r\n\r\nbody\r\n"


# The maildrop and pickup.


def other_user() -> pwd.struct_passwd:
    """A user who is neither root nor the configured ``user`` (nobody, once set)."""
    try:
        return pwd.getpwnam("daemon")
    except KeyError:
        pytest.skip("no 'daemon' user in the password file to submit as")


def dropped(config: Path, text: bytes, request: Request, uid: int, gid: int) -> Path:
    """A maildrop file as an untrusted submit leaves it, owned by ``uid``."""
    spool = Spool(load(str(config)).spool)
    prepare(spool)
    pieces = read_lines(io.BytesIO(text), dot_ends=False, limit=0)
    name = drop(spool, request, read_headers(pieces).octets())
    path = spool.directory / "maildrop" / name
    os.chown(path, uid, gid)
    return path


def run_pickup(config: Path) -> list[str]:
    loaded = load(str(config))
    return pickup(Spool(loaded.spool), loaded)


def spool_listing(config: Path) -> dict[str, list[str]]:
    root = load(str(config)).spool
    return {name: entries(root / name) for name in ("maildrop", "pickup", "tmp")}


def test_maildrop_directories(config: Path) -> None:
    spool = Spool(load(str(config)).spool)
    prepare(spool)
    assert (spool.directory.stat().st_mode & 0o7777) == 0o711
    assert ((spool.directory / "maildrop").stat().st_mode & 0o7777) == 0o1733
    for name in ("pickup", "corrupt"):
        assert ((spool.directory / name).stat().st_mode & 0o777) == 0o700, name


def test_pickup_queues_as_the_files_owner(config: Path) -> None:
    user = other_user()
    request = Request(recipients=("alice",), sender="boss@example.net", full_name="Not Me")
    path = dropped(config, b"Subject: dropped\n\nbody\n", request, user.pw_uid, user.pw_gid)
    assert path.read_bytes().startswith(MAGIC)
    [queue_id] = run_pickup(config)
    message, data = only_message(config)
    assert message["id"] == queue_id
    assert message["sender"] == f"{user.pw_name}@example.org"  # not boss@example.net
    assert (message["submitter"], message["submitter_uid"]) == (user.pw_name, user.pw_uid)
    assert message["channel"] == "local"
    rest = after_trace(data, queue_id, login=user.pw_name)
    warning = (
        f"X-Authentication-Warning: mx.test: {user.pw_name}"
        " set sender to boss@example.net using -f\r\n"
    )
    author = formataddr(("Not Me", f"{user.pw_name}@example.org"))
    assert rest == (
        warning.encode()
        + b"Subject: dropped\r\n"
        + added(queue_id, data, author=author)
        + b"\r\nbody\r\n"
    )
    assert spool_listing(config) == {"maildrop": [], "pickup": [], "tmp": []}
    assert run_pickup(config) == []
    assert len(queued(config)) == 1


def test_an_untrusted_user_may_use_their_own_address(config: Path) -> None:
    user = other_user()
    own = f"{user.pw_name}@localhost"
    dropped(config, b"b\n", Request(recipients=("bob",), sender=own), user.pw_uid, user.pw_gid)
    run_pickup(config)
    message, data = only_message(config)
    assert message["sender"] == own
    assert b"X-Authentication-Warning" not in data


def test_pickup_sets_aside_what_it_cannot_queue(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    user = other_user()
    root = load(str(config)).spool
    dropped(config, b"b\n", Request(recipients=("ghost",)), user.pw_uid, user.pw_gid)
    forged = root / "maildrop" / "forged"
    forged.write_bytes(b'{"sender":"ceo@example.org","recipients":["alice@example.org"]}\nx\n')
    os.chown(forged, user.pw_uid, user.pw_gid)
    by_root = root / "maildrop" / "by-root"
    by_root.write_bytes(MAGIC + b'{"recipients":["alice"],"extract":false}\nb\n')
    target = root.parent / "secret"
    target.write_bytes(b"secret\n")
    link = root / "maildrop" / "link"
    link.symlink_to(target)
    os.lchown(link, user.pw_uid, user.pw_gid)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "maildrop" / "socket"))
    listener.close()
    os.lchown(root / "maildrop" / "socket", user.pw_uid, user.pw_gid)
    twice = dropped(config, b"b\n", Request(recipients=("alice",)), user.pw_uid, user.pw_gid)
    os.link(twice, root / "maildrop" / "twice")
    good = Request(recipients=("bob",))
    dropped(config, b"Subject: among bad ones\n\nb\n", good, user.pw_uid, user.pw_gid)
    caplog.set_level(logging.WARNING, logger="mmdf_smtp.maildrop")
    [queue_id] = run_pickup(config)
    [message] = queued(config)
    assert (message["id"], message["recipients"]) == (queue_id, ["bob@example.org"])
    assert spool_listing(config) == {"maildrop": [], "pickup": [], "tmp": []}
    assert len(os.listdir(root / "corrupt")) == 7
    assert target.read_bytes() == b"secret\n"
    # checkque lists each, follows no link and waits on no socket: the secret stays unread.
    aside = queued(config, "corrupt")
    assert sorted(line["id"] for line in aside) == sorted(os.listdir(root / "corrupt"))
    reasons_shown = sorted(line["reason"] for line in aside)
    assert reasons_shown.count("a submission refused by pickup (see the log)") == 4
    assert "cannot be read: No such device or address" in reasons_shown  # the socket
    assert "cannot be read: Too many levels of symbolic links" in reasons_shown
    assert all(b"secret" not in checkque(config, "--cat", line["id"]).stdout for line in aside)
    reasons = "\n".join(r.getMessage() for r in caplog.records)
    assert "not a maildrop file" in reasons
    assert "owned by uid 0, who does not use the maildrop" in reasons
    assert "cannot be opened: a symbolic link" in reasons
    assert "cannot be opened: No such device or address" in reasons  # the socket
    assert "2 links" in reasons
    assert f"uid {user.pw_uid}: <ghost@example.org>: 550 5.1.1 No such user here" in reasons


def _request_edited(path: Path, edit: Any) -> None:
    """Rewrite a maildrop file's request in place (its owner and inode kept)."""
    line, rest = path.read_bytes().split(b"\n", 1)
    data = json.loads(line[len(MAGIC) :])
    edit(data)
    path.write_bytes(MAGIC + json.dumps(data).encode() + b"\n" + rest)


def test_pickup_leaves_a_newer_submits_request_claimed(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request naming in must_understand a field this version does not
    know waits in pickup/ for the newer version's pickup: not set aside."""
    user = other_user()
    root = load(str(config)).spool
    path = dropped(config, b"b\n", Request(recipients=("bob",)), user.pw_uid, user.pw_gid)
    _request_edited(path, lambda data: data.update(priority="bulk", must_understand=["priority"]))
    caplog.set_level(logging.WARNING, logger="mmdf_smtp.queue")
    assert run_pickup(config) == []
    assert run_pickup(config) == []  # claimed anew: one warning still
    listing = spool_listing(config)
    assert (listing["maildrop"], len(listing["pickup"]), listing["tmp"]) == ([], 1, [])
    assert os.listdir(root / "corrupt") == []
    warned = [r.getMessage() for r in caplog.records if "newer version" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith(": it needs priority; left in pickup/")
    [claimed] = (root / "pickup").iterdir()
    _request_edited(claimed, lambda data: [data.pop(k) for k in ("priority", "must_understand")])
    [queue_id] = run_pickup(config)
    [message] = queued(config)
    assert (message["id"], message["recipients"]) == (queue_id, ["bob@example.org"])


def test_pickup_checks_size_and_login(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, "\n[limits]\nmessage_size = 50\n")
    user = other_user()
    dropped(config, b"x" * 60 + b"\n", Request(recipients=("alice",)), user.pw_uid, user.pw_gid)
    uid = next(n for n in range(54321, 60000) if not _has_user(n))
    dropped(config, b"b\n", Request(recipients=("alice",)), uid, uid)
    caplog.set_level(logging.WARNING, logger="mmdf_smtp.maildrop")
    assert run_pickup(config) == []
    reasons = "\n".join(r.getMessage() for r in caplog.records)
    assert "message too big: over 50 octets" in reasons
    assert f"no login name for uid {uid}" in reasons
    assert len(os.listdir(tmp_path / "spool" / "corrupt")) == 2


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_stale_partial_files_are_removed(config: Path) -> None:
    root = load(str(config)).spool
    prepare(Spool(root))
    stale, fresh = root / "maildrop" / ".stale", root / "maildrop" / ".fresh"
    stale.write_bytes(b"abandoned")
    fresh.write_bytes(b"being written")
    old = time.time() - maildrop.STALE - 60
    os.utime(stale, (old, old))
    assert run_pickup(config) == []
    assert os.listdir(root / "maildrop") == [".fresh"]


class Crash(BaseException):
    """Stands for the power going out: nothing after it runs."""


@pytest.mark.parametrize("call", ["rename", "fsync"])
def test_pickup_crashing_at_any_step_queues_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    user = other_user()
    real = getattr(os, call)
    step = 0
    while True:
        case = tmp_path / f"{call}{step}"
        case.mkdir()
        config = write_config(case)
        request = Request(recipients=("alice",))
        dropped(config, b"Subject: once\n\nb\n", request, user.pw_uid, user.pw_gid)
        calls = 0

        def crash_at(*args: Any, _step: int = step, _real: Any = real) -> Any:
            nonlocal calls
            calls += 1
            if calls > _step:
                raise Crash
            return _real(*args)

        monkeypatch.setattr(os, call, crash_at)
        try:
            run_pickup(config)
            finished = True
        except Crash:
            finished = False
        monkeypatch.setattr(os, call, real)
        if not finished:
            run_pickup(config)
        spool = Spool(load(str(config)).spool)
        [message] = spool.messages()
        with spool.open_message(message.id) as file:
            data = file.read()
        assert message.envelope.sender == f"{user.pw_name}@example.org"
        author = formataddr((user.pw_gecos.split(",")[0], message.envelope.sender))
        rest = after_trace(data, message.id, login=user.pw_name)
        assert rest == b"Subject: once\r\n" + added(message.id, data, author) + b"\r\nb\r\n"
        listing = spool_listing(config)
        assert (listing["maildrop"], listing["pickup"]) == ([], [])
        if finished:
            break
        step += 1
    assert step >= 3


PICKUP = """
import logging, sys
from mmdf_smtp.config import load
from mmdf_smtp.queue.maildrop import pickup
from mmdf_smtp.queue.spool import Spool

class Say(logging.Handler):
    def emit(self, record):
        sys.stdout.write(record.getMessage() + "\\n")
        sys.stdout.flush()

log = logging.getLogger("mmdf_smtp.maildrop")
log.addHandler(Say())
log.setLevel(logging.INFO)
config = load(sys.argv[1])
pickup(Spool(config.spool), config)
"""


def test_pickup_killed_at_random_points_queues_each_submission_once(config: Path) -> None:
    user = other_user()
    count = 24
    for n in range(count):
        text = f"Subject: number {n}\n\n".encode() + b"x" * 2000 + b"\n"
        dropped(config, text, Request(recipients=("alice",)), user.pw_uid, user.pw_gid)
    rng = random.Random(4321)
    for _ in range(8):
        process = subprocess.Popen(
            [PYTHON, "-c", PICKUP, str(config)], stdout=subprocess.PIPE, env=env()
        )
        assert process.stdout is not None
        for _ in range(rng.randint(0, 4)):
            process.stdout.readline()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    run_pickup(config)
    spool = Spool(load(str(config)).spool)
    spool.recover()
    subjects = []
    for message in spool.messages():
        with spool.open_message(message.id) as file:
            data = file.read()
        subject = re.search(rb"\r\nSubject: number (\d+)\r\n", data)
        assert subject is not None and data.endswith(b"x" * 2000 + b"\r\n")
        subjects.append(int(subject[1]))
    assert sorted(subjects) == list(range(count))
    assert spool_listing(config) == {"maildrop": [], "pickup": [], "tmp": []}
    assert entries(spool.directory / "corrupt") == []


def test_smtpd_start_leaves_submitted_files_to_their_owners(config: Path) -> None:
    user = other_user()
    path = dropped(config, b"b\n", Request(recipients=("alice",)), user.pw_uid, user.pw_gid)
    assert submit(config, "alice", data=b"b\n").returncode == 0
    spool = load(str(config)).spool
    code = (
        "import sys; from pathlib import Path; from mmdf_smtp.privileges import drop_privileges; "
        "drop_privileges('nobody', Path(sys.argv[1]))"
    )
    subprocess.run([PYTHON, "-c", code, str(spool)], env=env(), check=True, timeout=60)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert path.stat().st_uid == user.pw_uid
    [queued_file] = os.listdir(spool / "queue")
    assert (spool / "queue" / queued_file).stat().st_uid == nobody
    assert (spool / "maildrop").stat().st_uid == nobody


def with_user(config: Path, name: str) -> None:
    """Set the top-level ``user`` of a write_config() configuration."""
    text = config.read_text()
    line = f'user = "{name}"\n'
    text = re.sub(r"(?m)^user = .*\n", line, text) if "\nuser = " in text else line + text
    config.write_text(text)
    _reachable(config.parent)


def test_root_with_a_user_writes_the_spool_as_that_user(config: Path) -> None:
    user = other_user()
    with_user(config, user.pw_name)
    assert submit(config, "alice", data=b"b\n").returncode == 0
    message, _ = only_message(config)
    assert message["submitter"] == "root"
    spool = load(str(config)).spool
    for path in (spool, spool / "queue", spool / "queue" / message["id"], spool / "maildrop"):
        assert path.stat().st_uid == user.pw_uid, path


def test_pickup_as_root_gives_the_queue_to_the_user(config: Path) -> None:
    user = other_user()
    with_user(config, user.pw_name)
    nobody = pwd.getpwnam("nobody")
    dropped(config, b"b\n", Request(recipients=("alice",)), nobody.pw_uid, nobody.pw_gid)
    [queue_id] = run_pickup(config)
    spool = load(str(config)).spool
    for name in ("", "tmp", "queue", f"queue/{queue_id}", "maildrop", "pickup", "corrupt"):
        assert (spool / name).stat().st_uid == user.pw_uid, name
    [message] = queued(config)
    assert (message["sender"], message["submitter"]) == ("nobody@example.org", "nobody")


# submit run for real by an unprivileged user.


def _python_for(user: pwd.struct_passwd) -> tuple[list[str], dict[str, str]] | str:
    """An interpreter ``user`` can run with this package importable, or why not."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "setpriv (util-linux) is not installed"
    drop_to = [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_paths()["purelib"]
    tried = []
    for python in (PYTHON, shutil.which(f"python{version}") or "", "/usr/bin/python3"):
        if not python or python in tried:
            continue
        tried.append(python)
        environment = env()
        environment["PYTHONPATH"] = os.pathsep.join([str(SRC), site])
        probe = subprocess.run(
            [
                *drop_to,
                python,
                "-c",
                f"import sys; assert sys.version.startswith('{version}.')"
                "; import mmdf_smtp.cli.submit",
            ],
            capture_output=True,
            env=environment,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return [*drop_to, python], environment
    return f"no Python {version} with this checkout reachable by {user.pw_name}: tried {tried}"


def _reachable(path: Path) -> None:
    """Let other users search the way to ``path`` (pytest makes its base 0700)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode & 0o7777
        if mode & 0o011 != 0o011:
            directory.chmod(mode | 0o011)


def test_an_unprivileged_user_submits_through_the_maildrop(config: Path) -> None:
    user = other_user()
    _reachable(config.parent)
    found = _python_for(user)
    if isinstance(found, str):
        pytest.skip(found)
    command, environment = found
    spool = Spool(load(str(config)).spool)
    prepare(spool)

    def run(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*command, "-m", "mmdf_smtp.cli.submit", "-c", str(config), *args],
            input=data,
            capture_output=True,
            env=environment,
            timeout=60,
            check=False,
        )

    result = run("-v", "-f", "ceo@example.org", "-t", data=b"To: alice\nSubject: mine\n\nb\n.\n")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rb"submit: in the maildrop as [0-9a-f]{32}, for pickup\n", result.stderr)
    [name] = os.listdir(spool.directory / "maildrop")
    assert (spool.directory / "maildrop" / name).stat().st_uid == user.pw_uid
    assert queued(config) == []
    assert run("ghost", data=b"b\n").returncode == 67
    denied = run("--channel", "other", "alice", data=b"b\n")
    assert denied.returncode == 77
    assert denied.stderr == b"submit: only trusted users may choose the source channel (other)\n"
    assert len(os.listdir(spool.directory / "maildrop")) == 1
    [queue_id] = run_pickup(config)
    message, data = only_message(config)
    assert message["sender"] == f"{user.pw_name}@example.org"
    assert message["recipients"] == ["alice@example.org"]
    rest = after_trace(data, queue_id, login=user.pw_name)
    assert rest.startswith(
        f"X-Authentication-Warning: mx.test: {user.pw_name} set sender to ceo@example.org"
        " using -f\r\nTo: alice\r\nSubject: mine\r\n".encode()
    )
    assert rest.endswith(b"\r\n\r\nb\r\n")


def test_no_maildrop_is_69_for_an_unprivileged_user(config: Path) -> None:
    user = other_user()
    _reachable(config.parent)
    found = _python_for(user)
    if isinstance(found, str):
        pytest.skip(found)
    command, environment = found
    Spool(load(str(config)).spool).directory.mkdir(mode=0o700)
    result = subprocess.run(
        [*command, "-m", "mmdf_smtp.cli.submit", "-c", str(config), "alice"],
        input=b"b\n",
        capture_output=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert result.returncode == 69
    assert b"the maildrop is made by pickup" in result.stderr


def test_utf8_sender_and_full_name(config: Path) -> None:
    args = ["-f", "jörg@exämple.org", "-F", "Jörg Müller", "alice"]
    assert submit(config, *args, data=b"Subject: utf8\n\nb\n").returncode == 0
    message, data = only_message(config)
    assert (message["sender"], message["smtputf8"]) == ("jörg@exämple.org", True)
    author = "=?utf-8?b?SsO2cmcgTcO8bGxlcg==?= <jörg@exämple.org>"  # RFC 2047
    assert f"\r\nFrom: {author}\r\n".encode() in data


def test_linked_as_sendmail(config: Path, tmp_path: Path) -> None:
    installed = Path(PYTHON).parent / "submit"
    if not installed.exists():
        pytest.skip(f"the console script is not installed beside {PYTHON}")
    sendmail = tmp_path / "sendmail"
    sendmail.symlink_to(installed)

    def run(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        command = [str(sendmail), "-c", str(config), *args]
        return subprocess.run(
            command, input=data, capture_output=True, env=env(), timeout=60, check=False
        )

    result = run("-oi", "-t", data=b"To: bob\n\n.\n")
    assert (result.returncode, result.stderr) == (0, b"")
    assert stored(config, queued(config)[0]["id"]).endswith(b"\r\n\r\n.\r\n")
    result = run("-q", data=b"")
    assert result.returncode == 64
    assert result.stderr.endswith(b"sendmail: option -q not recognized\n")


def test_git_send_email_through_submit(config: Path, tmp_path: Path) -> None:
    installed = Path(PYTHON).parent / "submit"
    git = shutil.which("git")
    if not installed.exists() or git is None:
        pytest.skip("needs git and the submit console script")
    probe = subprocess.run([git, "send-email", "--help"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("git send-email is not installed (Debian: git-email)")
    repository = tmp_path / "repository"
    commit = [git, "-C", str(repository), "-c", "user.name=T", "-c", "user.email=t@example.org"]
    subprocess.run([git, "init", "-q", str(repository)], check=True)
    (repository / "file").write_text("a line\n")
    subprocess.run([*commit, "add", "file"], check=True)
    subprocess.run([*commit, "commit", "-q", "-m", "Add a file"], check=True)
    patches = tmp_path / "patches"
    subprocess.run([*commit, "format-patch", "-q", "-1", "-o", str(patches)], check=True)
    [patch] = patches.iterdir()
    send = [
        git,
        "send-email",
        f"--smtp-server={installed}",
        "--smtp-server-option=-c",
        f"--smtp-server-option={config}",
        "--envelope-sender=root@example.org",
        "--from=Root <root@example.org>",
        "--to=alice@example.org",
        "--cc=bob",
        "--confirm=never",
        "--suppress-cc=all",
        str(patch),
    ]
    result = subprocess.run(send, capture_output=True, env=env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    message, data = only_message(config)
    assert message["sender"] == "root@example.org"
    assert message["recipients"] == ["alice@example.org", "bob@example.org"]
    rest = after_trace(data, message["id"])
    # git's own From, Date and Message-Id are kept; none is added.
    assert rest.startswith(b"From: Root <root@example.org>\r\nTo: alice@example.org\r\n")
    assert b"\r\nSubject: [PATCH] Add a file\r\n" in rest
    assert rest.count(b"\r\nDate: ") == 1
    assert len(re.findall(rb"(?i)\r\nMessage-ID: ", rest)) == 1
    assert b"\r\n+a line\r\n" in rest


def test_one_pickup_at_a_time(config: Path) -> None:
    user = other_user()
    dropped(config, b"b\n", Request(recipients=("alice",)), user.pw_uid, user.pw_gid)
    claims = load(str(config)).spool / "pickup"
    holder = os.open(claims, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert run_pickup(config) == []  # another pickup is at work
    finally:
        os.close(holder)
    assert len(run_pickup(config)) == 1


def test_an_empty_message_gets_its_headers(config: Path) -> None:
    assert submit(config, "alice", data=b"").returncode == 0
    message, data = only_message(config)
    assert after_trace(data, message["id"]) == added(message["id"], data)
