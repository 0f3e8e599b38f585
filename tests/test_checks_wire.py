"""The built-in checks through the real servers: smtpd, and smtpsrvr over pipes.

The DNS is the tests' own server on loopback (``[dns] nameservers``), the
DKIM and ARC keys are made here, and what is asserted is what a client
and the queue see: reply codes and texts, and the queued copy's
Authentication-Results field, whole.  SPF, DKIM (RSA, Ed25519), ARC,
DMARC (alignment, p, sp, pct, reject_dmarc), forged results fields, the
DNS blocklists at the greeting, a trusted channel with ``checks = false``,
sessions at once, a silent DNS server, SIGHUP, and no process left behind.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import dkim
import pytest

from authdns import AuthZone, auth_dns_server
from dkimkeys import ED_PRIVATE, ED_PUBLIC, RSA_PRIVATE, RSA_PUBLIC
from mmdf_smtp.queue.spool import Spool
from wire import Daemon, daemon, queued, smtpsrvr, stored, write_config

AUTHSERV_ID = "mx.auth.test"
CHANNELS = "trusted,local,smtp"
DNS_TIMEOUT = 1.0  # seconds for a look-up to a silent server ([dns] timeout)
DNSBL_TIMEOUT = 1.0
SENT = 30.0  # the most any reply may take here (a bound, never a wait)

# --- keys and the zone --------------------------------------------------------

V6_LOOPBACK = ".".join("1" + "0" * 31)  # ::1 reversed in nibbles (RFC 5782 2.4)


def make_zone() -> AuthZone:
    zone = AuthZone()
    # SPF: the clients are 127.0.0.1 (and ::1).
    zone.add("pass.example", "TXT", "v=spf1 ip4:127.0.0.1 ip6:::1 -all")
    zone.add("fail.example", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    zone.add("soft.example", "TXT", "v=spf1 ~all")
    zone.add("none.example", "A", "192.0.2.9")
    zone.silent.add("temp.example")
    zone.add("held.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    zone.held.add("held.example")
    # DKIM and ARC keys
    zone.add("rsa._domainkey.dk.example", "TXT", f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    zone.add("ed._domainkey.dk.example", "TXT", f"v=DKIM1; k=ed25519; p={ED_PUBLIC}")
    zone.add("rsa._domainkey.reject.example", "TXT", f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    zone.add("arc._domainkey.forwarder.example", "TXT", f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    # DMARC
    zone.add("reject.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    zone.add("_dmarc.reject.example", "TXT", "v=DMARC1; p=reject")
    zone.add("_dmarc.quarantine.example", "TXT", "v=DMARC1; p=quarantine")
    zone.add("_dmarc.monitor.example", "TXT", "v=DMARC1; p=none")
    zone.add("_dmarc.org.example", "TXT", "v=DMARC1; p=none; sp=reject")
    zone.add("_dmarc.pct0.example", "TXT", "v=DMARC1; p=reject; pct=0")
    # Blocklists: 127.0.0.2 listed; 127.0.0.3 listed and allowed; 127.0.0.4
    # listed with an answer outside the filter; 127.0.0.5 listed but
    # trusted; 127.0.0.6's query is never answered; ::1 listed.
    zone.add("2.0.0.127.bl.example", "A", "127.0.0.2")
    zone.add("3.0.0.127.bl.example", "A", "127.0.0.2")
    zone.add("3.0.0.127.allow.example", "A", "127.0.0.1")
    zone.add("4.0.0.127.filtered.example", "A", "127.0.0.20")
    zone.add("5.0.0.127.bl.example", "A", "127.0.0.2")
    zone.silent.add("6.0.0.127.slow.example")
    zone.add(f"{V6_LOOPBACK}.bl6.example", "A", "127.0.0.2")
    return zone


@pytest.fixture(scope="module")
def zone() -> AuthZone:
    return make_zone()


@pytest.fixture(scope="module")
def dns(zone: AuthZone) -> Iterator[str]:
    with auth_dns_server(zone) as address:
        yield address
    zone.release.set()


def checks_config(
    directory: Path,
    dns: str,
    *,
    auth: str = "",
    dns_timeout: float = DNS_TIMEOUT,
    zones: tuple[str, ...] = (
        "bl.example=127.0.0.[2..11]",
        "allow.example*-2",
        "filtered.example=127.0.0.[2..11]",
        "slow.example",
    ),
    scripted: bool = False,
    dns_cache_size: int | None = None,
) -> Path:
    listed = ", ".join(f'"{z}"' for z in zones)
    cache = "" if dns_cache_size is None else f"cache_size = {dns_cache_size}"
    return write_config(
        directory,
        f"""
[dns]
nameservers = ["{dns}"]
timeout = {dns_timeout}
{cache}

[auth]
authserv_id = "{AUTHSERV_ID}"
{auth}

[dnsbl]
zones = [{listed}]
threshold = 1
timeout = {DNSBL_TIMEOUT}

[channels.trusted]
hosts = ["127.0.0.5"]
checks = false
""",
        scripted=scripted,
    )


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory, dns: str) -> Iterator[Daemon]:
    """smtpd with the defaults of [auth]: reject_dmarc on, reject_spf_fail off."""
    config = checks_config(tmp_path_factory.mktemp("mx"), dns)
    with daemon(config, channels=CHANNELS) as started:
        yield started


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, dns: str) -> Iterator[Daemon]:
    """smtpd refusing SPF failures at MAIL, and marking DMARC rejections instead."""
    config = checks_config(
        tmp_path_factory.mktemp("strict"),
        dns,
        auth="reject_spf_fail = true\nreject_dmarc = false",
    )
    with daemon(config, channels=CHANNELS) as started:
        yield started


# --- a client -----------------------------------------------------------------


class Client:
    """One SMTP connection, read reply by reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def reply(self) -> str:
        """The next reply, all its lines, without the last line end."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for index, line in enumerate(lines[:-1]):
                if len(line) >= 3 and line[3:4] != b"-":
                    end = sum(len(each) + 2 for each in lines[: index + 1])
                    text, self.buffer = self.buffer[: end - 2], self.buffer[end:]
                    return text.decode()
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed after {self.buffer!r}"
            self.buffer += chunk

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def connect(d: Daemon, source: str = "127.0.0.1") -> Client:
    sock = d.connect(source)
    sock.settimeout(SENT)
    return Client(sock)


def message(
    from_: str = "Alice <alice@pass.example>",
    body: bytes = b"Hello.\r\n",
    *,
    extra: bytes = b"",
    subject: str = "test",
) -> bytes:
    return (
        extra
        + f"From: {from_}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n".encode()
        + b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\nMessage-ID: <1@pass.example>\r\n\r\n"
        + body
    )


def signed(msg: bytes, selector: str, domain: str) -> bytes:
    if selector == "ed":
        signature = dkim.sign(
            msg, b"ed", domain.encode(), ED_PRIVATE, signature_algorithm=b"ed25519-sha256"
        )
    else:
        signature = dkim.sign(msg, selector.encode(), domain.encode(), RSA_PRIVATE)
    return signature + msg


def data_of(msg: bytes) -> bytes:
    """``msg`` as DATA carries it: dot-stuffed, ended by the lone dot."""
    stuffed = re.sub(rb"(?m)^\.", b"..", msg)
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def transaction(
    client: Client, sender: str, msg: bytes, recipient: str = "alice@example.org"
) -> str:
    """MAIL, RCPT, DATA and the message: the last reply (MAIL's, when refused)."""
    mail = client.command(f"MAIL FROM:<{sender}>")
    if not mail.startswith("250"):
        return mail
    assert client.command(f"RCPT TO:<{recipient}>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(data_of(msg))
    return client.reply()


def send(
    d: Daemon, sender: str, msg: bytes, *, source: str = "127.0.0.1", helo: str = "client.test"
) -> str:
    """A whole session: the reply to the message (or to MAIL when refused)."""
    client = connect(d, source)
    try:
        assert client.reply().startswith("220 ")
        assert client.command(f"EHLO {helo}").startswith("250")
        answer = transaction(client, sender, msg)
        assert client.command("QUIT").startswith("221")
        return answer
    finally:
        client.close()


def queue_id(reply: str) -> str:
    match = re.fullmatch(r"250 2\.0\.0 Submitted & queued \((\S+)\)", reply)
    assert match, reply
    return match.group(1)


def queued_copy(d: Daemon | Path, reply: str) -> bytes:
    """The stored message, read in-process (checkque --cat shows the same, as one test proves).

    ``d``: the daemon, or the configuration, that queued it.
    """
    config = d if isinstance(d, Path) else d.config
    with Spool(config.parent / "spool").open_message(queue_id(reply)) as data:
        return data.read()


def header_fields(copy: bytes) -> list[tuple[str, str]]:
    """(name, the whole field with its folds, no final line end) of the stored header."""
    header = copy.split(b"\r\n\r\n", 1)[0].decode()
    fields: list[tuple[str, str]] = []
    for line in header.split("\r\n"):
        if line[:1] in (" ", "\t"):
            fields[-1] = (fields[-1][0], fields[-1][1] + "\r\n" + line)
        else:
            fields.append((line.partition(":")[0], line))
    return fields


def results_fields(copy: bytes) -> list[str]:
    return [text for name, text in header_fields(copy) if name.lower() == "authentication-results"]


def our_results(copy: bytes) -> str:
    """Our Authentication-Results field, checked to be right below our Received field."""
    fields = header_fields(copy)
    assert fields[0][0] == "Received" and "by mx.test" in fields[0][1], fields[0]
    name, text = fields[1]
    assert name == "Authentication-Results", fields[:3]
    assert text.startswith(f"Authentication-Results: {AUTHSERV_ID};")
    return text


def resinfos(copy: bytes) -> list[str]:
    """Our field's ``method=result ...`` parts, unfolded."""
    text = our_results(copy).replace("\r\n\t", " ")
    return [part.strip() for part in text.split(";")[1:]]


def field(*lines: str) -> str:
    return "\r\n\t".join(lines)


def nothing_queued_from(d: Daemon, sender: str) -> bool:
    spool = Spool(d.config.parent / "spool")
    return all(entry.envelope.sender != sender for entry in spool.messages())


# --- SPF ----------------------------------------------------------------------


def test_spf_pass_and_the_whole_field(mx: Daemon) -> None:
    reply = send(mx, "alice@pass.example", message(), helo="pass.example")
    copy = stored(mx.config, queue_id(reply))  # as checkque --cat shows it
    assert copy == queued_copy(mx, reply)
    [entry] = [entry for entry in queued(mx.config) if entry["id"] == queue_id(reply)]
    assert (entry["sender"], entry["helo"]) == ("alice@pass.example", "pass.example")
    assert our_results(copy) == field(
        f"Authentication-Results: {AUTHSERV_ID};",
        "spf=pass smtp.mailfrom=alice@pass.example;",
        "spf=pass smtp.helo=pass.example;",
        "dkim=none;",
        "arc=none;",
        "dmarc=none header.from=pass.example",
    )


@pytest.mark.parametrize(("cache_size", "asked"), [(None, 1), (0, 2)])
def test_a_sender_domain_seen_before_is_not_asked_again(
    tmp_path: Path, dns: str, zone: AuthZone, cache_size: int | None, asked: int
) -> None:
    """By default a worker keeps DNS answers for their time to live; cache_size = 0 keeps none."""
    domain = f"again-{cache_size}.example".lower()
    zone.add(domain, "TXT", "v=spf1 ip4:127.0.0.1 -all")
    config = checks_config(tmp_path, dns, dns_cache_size=cache_size)
    with daemon(config, "-n", "1", channels=CHANNELS) as one_worker:
        for _ in range(2):
            reply = send(one_worker, f"alice@{domain}", message(f"Alice <alice@{domain}>"))
            assert "spf=pass smtp.mailfrom=" in our_results(queued_copy(one_worker, reply))
    assert zone.queries.count((domain, "TXT")) == asked


@pytest.mark.parametrize(
    ("sender", "result"),
    [
        ("bob@fail.example", "fail"),
        ("bob@soft.example", "softfail"),
        ("bob@none.example", "none"),
        ("bob@temp.example", "temperror"),
    ],
)
def test_spf_results_are_recorded_not_refused_by_default(
    mx: Daemon, sender: str, result: str
) -> None:
    domain = sender.partition("@")[2]
    started = time.monotonic()
    reply = send(mx, sender, message(from_=sender))
    # A silent server costs at most the [dns] timeout per look-up, not the session.
    assert time.monotonic() - started < SENT
    assert our_results(queued_copy(mx, reply)) == field(
        f"Authentication-Results: {AUTHSERV_ID};",
        f"spf={result} smtp.mailfrom={sender};",
        "spf=none smtp.helo=client.test;",
        "dkim=none;",
        "arc=none;",
        f"dmarc=none header.from={domain}",
    )


def test_spf_fail_refused_at_mail_when_configured(strict: Daemon) -> None:
    client = connect(strict)
    with closing(client):
        assert client.reply().startswith("220 ")
        assert client.command("EHLO client.test").startswith("250")
        assert client.command("MAIL FROM:<bob@fail.example>") == (
            "550 5.7.23 SPF validation failed for fail.example"
        )
        # RFC 7208 8.6: a DNS failure is a temporary refusal.
        assert client.command("MAIL FROM:<bob@temp.example>") == (
            "451 4.4.3 Temporary DNS error checking SPF for temp.example"
        )
        # softfail is not fail: accepted, as is a pass.
        assert client.command("MAIL FROM:<bob@soft.example>").startswith("250 ")
        assert client.command("RSET").startswith("250 ")
        reply = transaction(client, "alice@pass.example", message())
        assert client.command("QUIT").startswith("221")
    assert "spf=pass smtp.mailfrom=alice@pass.example" in resinfos(queued_copy(strict, reply))
    assert nothing_queued_from(strict, "bob@fail.example")


def test_smtpsrvr_over_pipes_checks_spf_and_ed25519(tmp_path: Path, dns: str) -> None:
    # The session goes as one script: the pipelining rule is off for it.
    config = checks_config(tmp_path, dns, scripted=True)
    msg = signed(message(from_="Alice <alice@dk.example>", subject="pipes"), "ed", "dk.example")
    client = (
        b"EHLO pass.example\r\nMAIL FROM:<alice@pass.example>\r\nRCPT TO:<bob@example.org>\r\n"
        b"DATA\r\n" + data_of(msg) + b"QUIT\r\n"
    )
    result = smtpsrvr(config, client, remote="[127.0.0.1]", channels=CHANNELS)
    assert result.returncode == 0, result.stderr
    finals = [
        line for line in result.stdout.decode().split("\r\n") if len(line) > 3 and line[3] == " "
    ]
    assert finals[-1].startswith("221 ")
    copy = queued_copy(config, finals[-2])
    parts = resinfos(copy)
    assert parts[:2] == [
        "spf=pass smtp.mailfrom=alice@pass.example",
        "spf=pass smtp.helo=pass.example",
    ]
    assert parts[2] == (
        "dkim=pass header.d=dk.example header.s=ed header.a=ed25519-sha256 "
        f"header.b={b_property(msg)}"
    )
    assert parts[3:] == ["arc=none", "dmarc=none header.from=dk.example"]


# --- DKIM and ARC ---------------------------------------------------------------


def dkim_tags(msg: bytes) -> dict[str, str]:
    value = msg.split(b"\r\n\r\n", 1)[0].decode().split("DKIM-Signature:", 1)[1]
    value = re.split(r"\r\n(?=\S)", value, maxsplit=1)[0]
    return {
        key.strip(): val.strip()
        for key, _, val in (part.partition("=") for part in value.split(";"))
        if key.strip()
    }


def b_property(msg: bytes) -> str:
    """header.b as RFC 6008 2 makes it: the signature's first 8 characters, quoted
    when they are not a token (base64's "/" is a tspecial, RFC 2045 5.1)."""
    start = re.sub(r"\s+", "", dkim_tags(msg)["b"])[:8]
    return f'"{start}"' if "/" in start else start


def dkim_result(mx: Daemon, msg: bytes, sender: str = "bounce@none.example") -> list[str]:
    reply = send(mx, sender, msg)
    return [part for part in resinfos(queued_copy(mx, reply)) if part.startswith("dkim=")]


@pytest.mark.parametrize(
    ("selector", "algorithm"), [("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")]
)
def test_dkim_pass(mx: Daemon, selector: str, algorithm: str) -> None:
    msg = signed(message(from_="alice@dk.example"), selector, "dk.example")
    assert dkim_result(mx, msg) == [
        f"dkim=pass header.d=dk.example header.s={selector} header.a={algorithm} "
        f"header.b={b_property(msg)}"
    ]


def test_dkim_body_altered_after_signing_fails(mx: Daemon) -> None:
    msg = signed(message(from_="alice@dk.example", body=b"Pay 10 euros.\r\n"), "rsa", "dk.example")
    [result] = dkim_result(mx, msg.replace(b"10 euros", b"1000 euros"))
    assert result.startswith(
        "dkim=fail (body hash mismatch) header.d=dk.example header.s=rsa header.a=rsa-sha256"
    )


def test_dkim_missing_key_is_permerror(mx: Daemon) -> None:
    msg = signed(message(from_="alice@dk.example"), "gone", "dk.example")
    [result] = dkim_result(mx, msg)
    assert result.startswith("dkim=permerror (no key) header.d=dk.example header.s=gone")


def test_arc_chain_sealed_by_dkimpy_passes(mx: Daemon) -> None:
    msg = message(
        from_="alice@dk.example",
        extra=b"Authentication-Results: forwarder.example; spf=pass smtp.mailfrom=dk.example\r\n",
    )
    seal = dkim.arc_sign(msg, b"arc", b"forwarder.example", RSA_PRIVATE, b"forwarder.example")
    reply = send(mx, "bounce@none.example", b"".join(seal) + msg)
    copy = queued_copy(mx, reply)
    assert "arc=pass" in resinfos(copy)
    # The forwarder's own results field is its, and kept.
    assert any(
        text.startswith("Authentication-Results: forwarder.example;")
        for text in (results_fields(copy))
    )


# --- DMARC ----------------------------------------------------------------------


def test_dmarc_pass_by_spf_alignment(mx: Daemon) -> None:
    reply = send(mx, "bounce@reject.example", message(from_="alice@reject.example"))
    parts = resinfos(queued_copy(mx, reply))
    assert parts[0] == "spf=pass smtp.mailfrom=bounce@reject.example"
    assert parts[-1] == "dmarc=pass (p=reject dis=none) header.from=reject.example"


def test_dmarc_pass_by_dkim_alignment(mx: Daemon) -> None:
    msg = signed(message(from_="alice@reject.example"), "rsa", "reject.example")
    reply = send(mx, "bounce@none.example", msg)
    parts = resinfos(queued_copy(mx, reply))
    assert parts[0] == "spf=none smtp.mailfrom=bounce@none.example"
    assert parts[2].startswith("dkim=pass header.d=reject.example")
    assert parts[-1] == "dmarc=pass (p=reject dis=none) header.from=reject.example"


def test_dmarc_reject_is_refused_at_end_of_data_and_nothing_queued(mx: Daemon) -> None:
    sender = "forger@none.example"
    client = connect(mx)
    with closing(client):
        assert client.reply().startswith("220 ")
        assert client.command("EHLO client.test").startswith("250")
        assert transaction(client, sender, message(from_="ceo@reject.example")) == (
            "550 5.7.1 Email rejected per DMARC policy for reject.example"
        )
        # The session goes on: the next transaction is judged on its own.
        reply = transaction(client, "bounce@reject.example", message(from_="a@reject.example"))
        assert reply.startswith("250 ")
        assert client.command("QUIT").startswith("221")
    assert nothing_queued_from(mx, sender)


def test_dmarc_reject_marked_when_reject_dmarc_is_off(strict: Daemon) -> None:
    reply = send(strict, "forger@none.example", message(from_="ceo@reject.example"))
    copy = queued_copy(strict, reply)
    assert resinfos(copy)[-1] == "dmarc=fail (p=reject dis=reject) header.from=reject.example"
    assert header_fields(copy)[2] == (
        "X-MMDF-Quarantine",
        "X-MMDF-Quarantine: DMARC policy reject of reject.example",
    )


@pytest.mark.parametrize(
    ("from_domain", "dmarc", "quarantine"),
    [
        ("quarantine.example", "dmarc=fail (p=quarantine dis=quarantine)", "quarantine"),
        ("monitor.example", "dmarc=fail (p=none dis=none)", None),
        # sp= for a subdomain found through its organizational domain
        ("org.example", "dmarc=fail (p=none dis=none)", None),
        # pct=0: out of the sample, reject lowered to quarantine (RFC 7489 6.6.4)
        ("pct0.example", "dmarc=fail (p=reject dis=quarantine)", "reject"),
    ],
)
def test_dmarc_policies_that_queue(
    mx: Daemon, from_domain: str, dmarc: str, quarantine: str | None
) -> None:
    reply = send(mx, "bounce@none.example", message(from_=f"a@{from_domain}"))
    copy = queued_copy(mx, reply)
    assert resinfos(copy)[-1] == f"{dmarc} header.from={from_domain}"
    marks = [text for name, text in header_fields(copy) if name == "X-MMDF-Quarantine"]
    if quarantine is None:
        assert marks == []
    else:
        assert marks == [f"X-MMDF-Quarantine: DMARC policy {quarantine} of {from_domain}"]


def test_dmarc_sp_rejects_a_subdomain(mx: Daemon) -> None:
    sender = "bounce-sp@none.example"
    client = connect(mx)
    with closing(client):
        assert client.reply().startswith("220 ")
        assert client.command("EHLO client.test").startswith("250")
        assert transaction(client, sender, message(from_="a@news.org.example")) == (
            "550 5.7.1 Email rejected per DMARC policy for news.org.example"
        )
        assert client.command("QUIT").startswith("221")
    assert nothing_queued_from(mx, sender)


# --- forged Authentication-Results ----------------------------------------------


def test_forged_results_claiming_our_id_are_removed(mx: Daemon) -> None:
    forged = (
        b"Authentication-Results: MX.Auth.Test; spf=pass smtp.mailfrom=ceo@reject.example\r\n"
        b"Authentication-Results: (we checked) mx.auth.test (really) 1;\r\n"
        b"\tdkim=pass header.d=reject.example\r\n"
        b'Authentication-Results: "mx.auth.test"; dmarc=pass\r\n'
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x@other.example\r\n"
    )
    reply = send(mx, "bounce@pass.example", message(extra=forged))
    copy = queued_copy(mx, reply)
    ours = our_results(copy)
    assert results_fields(copy) == [
        ours,
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=x@other.example",
    ]
    assert copy.count(b"reject.example") == 0


# --- DNS blocklists at the greeting -----------------------------------------------


def test_listed_client_is_refused_at_the_greeting(mx: Daemon) -> None:
    client = connect(mx, "127.0.0.2")
    with closing(client):
        assert client.reply() == (
            "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.example"
        )
        assert client.command("EHLO client.test").startswith("503 ")
        assert client.command("MAIL FROM:<a@pass.example>") == (
            "503 5.5.1 Service refused; send QUIT"
        )
        assert client.command("QUIT").startswith("221 ")


@pytest.mark.parametrize(
    "source",
    [
        "127.0.0.1",  # in no list
        "127.0.0.3",  # listed, but the allow list's weight (-2) outweighs it
        "127.0.0.4",  # answered 127.0.0.20, which the zone's filter does not match
    ],
)
def test_clients_not_listed_are_greeted(mx: Daemon, source: str) -> None:
    client = connect(mx, source)
    with closing(client):
        assert client.reply() == "220 mx.test Server SMTP ready"


def test_a_zone_that_times_out_does_not_list(mx: Daemon) -> None:
    started = time.monotonic()
    client = connect(mx, "127.0.0.6")
    with closing(client):
        assert client.reply() == "220 mx.test Server SMTP ready"
        waited = time.monotonic() - started
        mx.log_lines("6.0.0.127.slow.example: no answer, counted as not listed")
    # An upper bound only: the greeting waits for the zone no longer than its timeout.
    assert waited < DNSBL_TIMEOUT + 5


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_listed_ipv6_client(tmp_path: Path, dns: str) -> None:
    if not has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    config = checks_config(tmp_path, dns, zones=("bl6.example",))
    config.write_text(
        config.read_text().replace('listen = ["127.0.0.1:0"]', 'listen = ["[::1]:0"]')
    )
    with daemon(config, channels=CHANNELS) as d:
        sock = socket.create_connection(("::1", d.port), timeout=SENT)
        client = Client(sock)
        with closing(client):
            assert client.reply() == (
                "554 5.7.1 Service unavailable; client [::1] blocked using bl6.example"
            )
            assert client.command("QUIT").startswith("221 ")


def test_a_trusted_channel_skips_blocklists_and_checks(mx: Daemon) -> None:
    client = connect(mx, "127.0.0.5")  # listed in bl.example
    with closing(client):
        assert client.reply() == "220 mx.test Server SMTP ready"
        assert client.command("EHLO client.test").startswith("250")
        # Would be a DMARC rejection anywhere else.
        reply = transaction(client, "bounce@fail.example", message(from_="a@reject.example"))
        assert client.command("QUIT").startswith("221")
    copy = queued_copy(mx, reply)
    assert [name for name, _ in header_fields(copy)][:2] == ["Received", "From"]
    assert results_fields(copy) == []


# --- sessions at once -------------------------------------------------------------


def test_sessions_at_once_each_get_their_own_results(mx: Daemon) -> None:
    senders = ["one@pass.example", "two@fail.example", "three@soft.example", "four@none.example"]
    expected = ["pass", "fail", "softfail", "none"]
    messages = [
        signed(message(from_=f"x{i}@dk.example", subject=f"s{i}"), "rsa", "dk.example")
        if i % 2
        else message(from_=f"x{i}@dk.example", subject=f"s{i}")
        for i in range(len(senders))
    ]
    clients = [connect(mx) for _ in senders]
    try:
        # Each step is taken by every session before the next: their checks overlap.
        for client in clients:
            assert client.reply().startswith("220 ")
        for client in clients:
            client.send(b"EHLO client.test\r\n")
        for client in clients:
            assert client.reply().startswith("250")
        for client, sender in zip(clients, senders, strict=True):
            client.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<alice@example.org>\r\n".encode())
        for client in clients:
            assert client.reply().startswith("250 ")
            assert client.reply().startswith("250 ")
            assert client.command("DATA").startswith("354")
        for client, msg in zip(clients, messages, strict=True):
            client.send(data_of(msg))
        replies = [client.reply() for client in clients]
    finally:
        for client in clients:
            client.close()
    for i, (reply, sender, result) in enumerate(zip(replies, senders, expected, strict=True)):
        parts = resinfos(queued_copy(mx, reply))
        assert parts[0] == f"spf={result} smtp.mailfrom={sender}"
        assert parts[2].startswith("dkim=pass header.d=dk.example" if i % 2 else "dkim=none")
        assert parts[-1] == "dmarc=none header.from=dk.example"


def served_by(d: Daemon, queue_id: str) -> int:
    """The pid of the smtpd worker that logged queueing ``queue_id``."""
    [line] = d.log_lines(f"queued id={queue_id} ")
    match = re.search(r"\((\d+)\)", line)
    assert match, line
    return int(match.group(1))


def test_a_silent_dns_server_holds_only_the_sessions_that_wait_for_it(
    tmp_path: Path, dns: str, zone: AuthZone
) -> None:
    # Look-ups may wait for long: only the release ends the wait.
    config = checks_config(tmp_path, dns, dns_timeout=60)
    with daemon(config, channels=CHANNELS) as d:
        held: list[Client] = []
        workers: set[int] = set()
        try:
            # Until every worker holds a session waiting for DNS; each
            # worker's share of maxconnects bounds how many that takes.
            while len(workers) < d.workers:
                assert len(held) < 8, "more sessions than maxconnects"
                client = connect(d)
                held.append(client)
                assert client.reply().startswith("220 ")
                assert client.command("EHLO client.test").startswith("250")
                reply = transaction(client, "first@pass.example", message())
                workers.add(served_by(d, queue_id(reply)))
                client.send(f"MAIL FROM:<held{len(held)}@held.example>\r\n".encode())
            for _ in held:
                assert zone.arrivals.get(timeout=SENT) == "held.example"
            # Meanwhile, a session on one of those workers goes all the way.
            reply = send(d, "other@pass.example", message(subject="meanwhile"))
            assert served_by(d, queue_id(reply)) in workers
            for client in held:
                client.sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    client.sock.recv(1)  # no answer yet to the MAIL held by DNS
                client.sock.settimeout(SENT)
            zone.release.set()
            for index, client in enumerate(held, 1):
                assert client.reply().startswith("250 ")
                assert client.command("RCPT TO:<bob@example.org>").startswith("250")
                assert client.command("DATA").startswith("354")
                client.send(data_of(message()))
                parts = resinfos(queued_copy(d, client.reply()))
                assert parts[0] == f"spf=pass smtp.mailfrom=held{index}@held.example"
                assert client.command("QUIT").startswith("221")
        finally:
            zone.release.set()
            for client in held:
                client.close()


# --- the verification processes in the daemon -------------------------------------


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            found |= {child, *descendants(child)}
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_dkim_after_sighup_and_no_process_left_behind(tmp_path: Path, dns: str) -> None:
    config = checks_config(tmp_path, dns)
    msg = signed(message(from_="alice@dk.example"), "rsa", "dk.example")
    with daemon(config, channels=CHANNELS) as d:
        for _ in range(2 * d.workers):
            assert dkim_result(d, msg)[0].startswith("dkim=pass")
        d.process.send_signal(signal.SIGHUP)
        d.log_lines("configuration reloaded")  # the supervisor, which forks new workers
        for _ in range(2 * d.workers):
            assert dkim_result(d, msg)[0].startswith("dkim=pass")
        started = descendants(d.process.pid)
        assert len(started) > d.workers  # the verification processes are among them
    # Daemon.stop has seen smtpd's stderr closed: nothing holds it.
    left = [pid for pid in started if alive(pid)]
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def ended_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` (not ours) ends within ``seconds``: its pidfd turns readable."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], seconds)[0])
    finally:
        os.close(pidfd)


def test_verifiers_end_with_a_worker_killed(tmp_path: Path, dns: str) -> None:
    config = checks_config(tmp_path, dns)
    with daemon(config, "-n", "2", channels=CHANNELS) as d:
        workers = [int(line.rsplit(" ", 1)[1]) for line in d.log_lines(" started, pid ", 2)]
        d.log_lines("DKIM verification processes started", 2)
        verifiers = {worker: descendants(worker) for worker in workers}
        assert all(len(pids) >= 2 for pids in verifiers.values())
        os.kill(workers[0], signal.SIGKILL)
        d.log_lines(f"(pid {workers[0]}) died with status -9")
        assert all(ended_within(pid, SENT) for pid in verifiers[workers[0]])
        # The other worker's are there, and verify.
        assert all(alive(pid) for pid in verifiers[workers[1]])
        msg = signed(message(from_="alice@dk.example"), "rsa", "dk.example")
        assert dkim_result(d, msg)[0].startswith("dkim=pass")
