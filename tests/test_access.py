"""[access]: the clients, senders and recipients tables, over the wire.

One smtpd without filters (the session's direct path) and one with a DNS
blocklist (the filtered path, where a client's OK outweighs a listing);
the client is smtplib or a raw socket from a loopback source address.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from authdns import AuthZone, auth_dns_server
from test_logs import fail2ban_matches
from wire import PYTHON, Daemon, daemon, env, queued, reply_lines, smtpsrvr, write_config

SENDERS = """\
# the senders table
spammer.example          REJECT
friend@spammer.example   OK
.parent.example          REJECT Go away, $parent
baduser@                 REJECT
<>                       DEFER
deferred.example         DEFER
explicit.example         554 5.7.1 Explicit refusal
code-only.example        553 Not from you
held.example             HOLD Held for review
dropped.example          DISCARD
"""

RECIPIENTS = """\
bob@example.org          REJECT
held-rcpt.example        HOLD Recipient held
dropped-rcpt.example     DISCARD
"""

CLIENTS = """\
127.0.0.2                REJECT
127.0.0.8/29             DEFER
127.0.0.9                OK
127.0.0.16/28            554 5.7.1 Go away, network
127.0.0.33               HOLD Client held
127.0.0.34               DISCARD
"""


def tables(directory: Path, clients: str = CLIENTS) -> str:
    for name, text in (("clients", clients), ("senders", SENDERS), ("recipients", RECIPIENTS)):
        (directory / name).write_text(text)
    return f"""
[access]
clients = "{directory / "clients"}"
senders = "{directory / "senders"}"
recipients = "{directory / "recipients"}"
"""


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("access")
    with daemon(write_config(directory, tables(directory))) as started:
        yield started


@pytest.fixture(scope="module")
def zone() -> AuthZone:
    zone = AuthZone()
    for last in (3, 4):  # both listed; the clients table says OK to 127.0.0.3
        zone.add(f"{last}.0.0.127.bl.example", "A", "127.0.0.2")
    return zone


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory, zone: AuthZone) -> Iterator[Daemon]:
    """smtpd with a blocklist: every session goes the filters' way."""
    directory = tmp_path_factory.mktemp("filtered")
    with auth_dns_server(zone) as dns:
        extra = (
            tables(directory, CLIENTS + "127.0.0.3 OK\n")
            + f"""
[dns]
nameservers = ["{dns}"]
timeout = 2

[dnsbl]
zones = ["bl.example=127.0.0.2"]
threshold = 1
timeout = 2

[channels.trusted]
hosts = ["127.0.0.40"]
checks = false
"""
        )
        config = write_config(directory, extra)
        with daemon(config, channels="trusted,local,smtp") as started:
            yield started


@pytest.fixture(params=["direct", "filtered"])
def both(request: pytest.FixtureRequest) -> Daemon:
    daemon: Daemon = request.getfixturevalue("mx" if request.param == "direct" else request.param)
    return daemon


def smtp(d: Daemon, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP(d.host, d.port, timeout=30, source_address=(source, 0))
    client.ehlo("client.test")
    return client


def greeting(d: Daemon, source: str) -> bytes:
    with closing(d.connect(source)) as sock:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(1000)
            assert chunk, data
            data += chunk
        return data


def from_sender(d: Daemon, sender: str, state: str = "queued") -> list[dict[str, Any]]:
    return [m for m in queued(d.config, state) if m["sender"] == sender]


MESSAGE = b"Subject: access\r\n\r\nbody\r\n"


# --- senders -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "reply"),
    [
        ("a@spammer.example", (550, b"5.7.1 Sender address rejected: Access denied")),
        ("A@SpamMer.Example", (550, b"5.7.1 Sender address rejected: Access denied")),
        ("x@mail.parent.example", (550, b"5.7.1 Go away, $parent")),
        ("x@deep.mail.parent.example", (550, b"5.7.1 Go away, $parent")),
        ("baduser@anywhere.example", (550, b"5.7.1 Sender address rejected: Access denied")),
        ("baduser+tag@anywhere.example", (550, b"5.7.1 Sender address rejected: Access denied")),
        ("", (450, b"4.7.1 Sender address deferred: Try again later")),
        ("x@deferred.example", (450, b"4.7.1 Sender address deferred: Try again later")),
        ("x@explicit.example", (554, b"5.7.1 Explicit refusal")),
        ("x@code-only.example", (553, b"5.7.1 Not from you")),
        # Not matched: the domain itself for a .domain entry, a sub-domain for a domain.
        ("x@parent.example", (250, b"2.1.0 Sender OK")),
        ("x@sub.spammer.example", (250, b"2.1.0 Sender OK")),
        ("gooduser@anywhere.example", (250, b"2.1.0 Sender OK")),
        # The address entry outweighs its domain's.
        ("friend@spammer.example", (250, b"2.1.0 Sender OK")),
        ("friend+list@spammer.example", (250, b"2.1.0 Sender OK")),
    ],
)
def test_senders_table(both: Daemon, sender: str, reply: tuple[int, bytes]) -> None:
    with closing(smtp(both)) as client:
        assert client.mail(sender) == reply
        if reply[0] == 250:
            client.rset()
        # A refused MAIL leaves no transaction; the session goes on.
        assert client.mail("ok@example.net") == (250, b"2.1.0 Sender OK")


def test_refusals_are_logged_and_fail2ban_bans_the_permanent_ones(
    mx: Daemon, tmp_path: Path
) -> None:
    with closing(smtp(mx, "127.0.0.3")) as client:
        assert client.mail("logged@spammer.example")[0] == 550
        assert client.mail("logged@deferred.example")[0] == 450
    [refused] = mx.log_lines("from=<logged@spammer.example>")
    [deferred] = mx.log_lines("from=<logged@deferred.example>")
    assert " refused client=unknown[127.0.0.3] helo=client.test " in refused
    assert refused.endswith(
        'reply="550 5.7.1 Sender address rejected: Access denied" reason=access '
        "stage=mail from=<logged@spammer.example>\n"
    )
    greeting(mx, "127.0.0.2")
    [client] = mx.log_lines("reason=access stage=connect")
    assert " refused client=unknown[127.0.0.2] helo= " in client
    log = tmp_path / "smtpd.log"
    log.write_text(refused + deferred + client)
    # The deferral is not the client's fault for good: not banned.
    assert fail2ban_matches(log) == ["127.0.0.3", "127.0.0.2"]


# --- recipients ----------------------------------------------------------------------


def test_a_refused_recipient_leaves_the_others(both: Daemon) -> None:
    sender = f"rcpt-{id(both)}@example.net"
    with closing(smtp(both)) as client:
        client.mail(sender)
        assert client.rcpt("alice@example.org") == (250, b"2.1.5 Recipient OK")
        assert client.rcpt("bob@example.org") == (
            550,
            b"5.7.1 Recipient address rejected: Access denied",
        )
        assert client.rcpt("bob+tag@example.org")[0] == 550  # bob's extension: bob's entry
        assert client.rcpt("carol@elsewhere.example") == (250, b"2.1.5 Recipient OK")
        code, _ = client.data(MESSAGE)
        assert code == 250
    [message] = from_sender(both, sender)
    assert message["recipients"] == ["alice@example.org", "carol@elsewhere.example"]


def test_relay_rules_come_before_the_recipients_table(mx: Daemon) -> None:
    # 127.0.0.4 is in no relaying channel: refused for relaying, whatever the table says.
    with closing(smtp(mx, "127.0.0.4")) as client:
        client.mail("x@example.net")
        assert client.rcpt("x@held-rcpt.example")[0] == 550
        assert client.rcpt("nobody@example.org") == (550, b"5.1.1 No such user here")


# --- HOLD and DISCARD -------------------------------------------------------------------


def send(d: Daemon, sender: str, recipient: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    with closing(smtp(d, source)) as client:
        assert client.mail(sender)[0] == 250
        assert client.rcpt(recipient)[0] == 250
        reply: tuple[int, bytes] = client.data(MESSAGE)
        return reply


def test_hold_by_sender_queues_the_message_held(both: Daemon) -> None:
    sender = f"held-{id(both)}@held.example"
    assert send(both, sender, "alice@example.org")[0] == 250
    assert from_sender(both, sender) == []
    [message] = from_sender(both, sender, "held")
    assert message["quarantine"] == "Held for review"


def test_hold_by_recipient_and_by_client(both: Daemon) -> None:
    sender = f"hr-{id(both)}@example.net"
    assert send(both, sender, "x@held-rcpt.example")[0] == 250
    [message] = from_sender(both, sender, "held")
    assert message["quarantine"] == "Recipient held"
    sender = f"hc-{id(both)}@example.net"
    assert send(both, sender, "alice@example.org", source="127.0.0.33")[0] == 250
    [message] = from_sender(both, sender, "held")
    assert message["quarantine"] == "Client held"


@pytest.mark.parametrize(
    ("sender", "recipient", "source"),
    [
        ("d-{}@dropped.example", "alice@example.org", "127.0.0.1"),
        ("dr-{}@example.net", "x@dropped-rcpt.example", "127.0.0.1"),
        ("dc-{}@example.net", "alice@example.org", "127.0.0.34"),
    ],
)
def test_discard_answers_250_and_queues_nothing(
    both: Daemon, sender: str, recipient: str, source: str
) -> None:
    sender = sender.format(id(both))
    code, text = send(both, sender, recipient, source)
    assert code == 250 and text.startswith(b"2.0.0 Submitted & queued (")
    [line] = both.log_lines(f"from=<{sender}>")
    assert " discarded id=" in line
    assert from_sender(both, sender) == [] and from_sender(both, sender, "held") == []


# --- clients -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "reply"),
    [
        ("127.0.0.2", b"554 5.7.1 Client host rejected: Access denied\r\n"),
        ("127.0.0.10", b"421 4.7.1 Client host deferred: Try again later\r\n"),
        ("127.0.0.17", b"554 5.7.1 Go away, network\r\n"),
        ("127.0.0.9", b"220 mx.test Server SMTP ready\r\n"),  # its address outweighs the /29
        ("127.0.0.7", b"220 mx.test Server SMTP ready\r\n"),
    ],
)
def test_clients_table(both: Daemon, source: str, reply: bytes) -> None:
    assert greeting(both, source) == reply


def test_a_refused_client_may_only_quit(mx: Daemon) -> None:
    with closing(smtp_raw(mx, "127.0.0.2")) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        assert sock.recv(1000).startswith(b"503 ")


def smtp_raw(d: Daemon, source: str) -> socket.socket:
    sock = d.connect(source)
    assert sock.recv(1000).startswith(b"554 ")
    return sock


def test_a_channel_without_checks_still_gets_the_tables(filtered: Daemon) -> None:
    with closing(smtp(filtered, "127.0.0.40")) as client:
        assert client.mail("x@spammer.example")[0] == 550
        assert client.mail("x@example.net")[0] == 250
        assert client.rcpt("bob@example.org")[0] == 550


def test_ok_outweighs_a_blocklist(filtered: Daemon) -> None:
    assert greeting(filtered, "127.0.0.3") == b"220 mx.test Server SMTP ready\r\n"
    assert greeting(filtered, "127.0.0.4") == (
        b"554 5.7.1 Service unavailable; client [127.0.0.4] blocked using bl.example\r\n"
    )


# --- the tables' files ---------------------------------------------------------------------


def smtpd_start(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.smtpd", "-c", str(config), "smtpsrvr", "local,smtp"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("table", "line", "problem"),
    [
        ("senders", "x@example.com FROB", "'FROB': unknown action"),
        ("senders", "x@example.com", "no action after the key"),
        ("senders", "x@exa mple.com OK", "'mple.com': unknown action"),
        ("senders", "x@example.com OK fine", "OK takes no text"),
        ("recipients", "<> REJECT", "<> is the null sender"),
        ("clients", "300.1.2.3 REJECT", "not an address, network, host name or .domain"),
        ("clients", "10.0.0.0/8 450 5.7.1 x", "enhanced code's class differs"),
    ],
)
def test_a_bad_line_stops_smtpd_naming_file_and_line(
    tmp_path: Path, table: str, line: str, problem: str
) -> None:
    path = tmp_path / table
    path.write_text(f"# first\n\nfine.example OK\n{line}\n")
    config = write_config(tmp_path, f'[access]\n{table} = "{path}"\n')
    result = smtpd_start(config)
    assert result.returncode == 78
    assert f"{path}:4: " in result.stderr and problem in result.stderr, result.stderr


def test_a_missing_table_stops_smtpd(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[access]\nsenders = "{tmp_path / "absent"}"\n')
    result = smtpd_start(config)
    assert result.returncode == 78
    assert f"{tmp_path / 'absent'}: cannot read access table" in result.stderr


def test_sighup_reads_a_changed_table_and_keeps_the_old_on_a_bad_one(tmp_path: Path) -> None:
    senders = tmp_path / "senders"
    senders.write_text("first.example REJECT\n")
    config = write_config(tmp_path, f'[access]\nsenders = "{senders}"\n')
    with daemon(config) as d:
        assert codes(d, "x@first.example", "x@second.example") == [550, 250]
        senders.write_text("second.example REJECT\n")
        d.process.send_signal(signal.SIGHUP)
        d.log_lines("configuration reloaded")
        d.log_lines(" started, pid ", d.workers)
        assert codes(d, "x@first.example", "x@second.example") == [250, 550]
        senders.write_text("second.example REJECT\nthird.example FROB\n")
        d.process.send_signal(signal.SIGHUP)
        [line] = d.log_lines(f"{senders}:2: ")
        assert "reload failed, keeping the running configuration" in line
        assert "unknown action" in line
        assert codes(d, "x@second.example", "x@third.example") == [550, 250]


def codes(d: Daemon, *senders: str) -> list[int]:
    """MAIL's reply code for each sender, in one session."""
    found = []
    with closing(smtp(d)) as client:
        for sender in senders:
            found.append(client.mail(sender)[0])
            client.rset()
    return found


def test_an_unknown_key_in_access_stops_smtpd(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[access]\nsender = "senders"\n')
    result = smtpd_start(config)
    assert result.returncode == 78
    assert f"{config}:" in result.stderr and "access.sender: unknown key" in result.stderr


def test_smtpsrvr_over_pipes(tmp_path: Path) -> None:
    """The blocking shell's way: a refusal, a discard, and the message after them."""
    config = write_config(tmp_path, tables(tmp_path), scripted=True)
    script = (
        b"EHLO client.test\r\nMAIL FROM:<x@spammer.example>\r\n"
        b"MAIL FROM:<pipe@dropped.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        + MESSAGE
        + b".\r\nMAIL FROM:<pipe@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"
    )
    result = smtpsrvr(config, script)
    replies = reply_lines(result.stdout)
    assert replies[2:] == [
        "550 5.7.1 Sender address rejected: Access denied",
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "354 Start mail input; end with <CRLF>.<CRLF>",
        replies[6],
        "250 2.1.0 Sender OK",
        "550 5.7.1 Recipient address rejected: Access denied",
        "250 2.1.5 Recipient OK",
        "354 Start mail input; end with <CRLF>.<CRLF>",
        replies[11],
        "221 2.0.0 mx.test closing connection",
    ], replies
    assert replies[6].startswith("250 2.0.0 Submitted & queued (")
    assert replies[11].startswith("250 2.0.0 Submitted & queued (")
    [message] = queued(config)
    assert message["sender"] == "pipe@example.net"
    assert message["recipients"] == ["alice@example.org"]
    assert queued(config, "held") == []


def test_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    extra = tables(tmp_path) + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    with daemon(write_config(tmp_path, extra)) as d:
        [line] = d.log_lines("metrics at http://")
        url = line.split("metrics at ", 1)[1].split()[0]
        assert greeting(d, "127.0.0.2").startswith(b"554 ")
        assert codes(d, "x@spammer.example", "x@deferred.example", "x@example.net") == [
            550,
            450,
            250,
        ]
        d.log_lines("session ", 2)  # both sessions are over, and counted
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
    assert 'mmdf_refusals_total{reason="access"} 3.0' in text.splitlines()
