"""The real milters of tests/milters.py through mmdf-smtp's own daemon.

The same Debian milters that test_real_milters.py proves through Postfix,
each named in a ``[[milters]]`` table of an smtpd started on loopback
(tests/wire.py), fed by a client that reads every reply as sent: what the
milter changed must be in the queued copy (``checkque --cat``), what it
refused must reach the client as the milter worded it, with nothing queued.
The milters' own reply texts are the ones the Postfix proof asserts.
"""

from __future__ import annotations

import base64
import contextlib
import queue
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dkim
import nacl.signing
import pytest
from milter_servers import Milter, MilterUnavailable, OpenDKIM, Rspamd, make_rsa_key

from milters import AUTHSERV_ID, SIGNER_DOMAIN, DmarcMilter, LoopbackDns, txt_rdata, unavailable
from milters import _run as run_milter
from test_real_milters import GTUBE, dkim_results, headers, message
from wire import Daemon, daemon, queued, reachable_by_anyone, stored, write_config

RECIPIENT = "bob@elsewhere.test"
REPLY_TIMEOUT = 30.0
QUEUED = re.compile(rb"250 2\.0\.0 Submitted & queued \((\w+)\)\r\n")


def milters_table(*milters: Milter) -> str:
    """``[[milters]]`` tables in this order; a milter down is a 4xx, never a pass."""
    return "".join(
        f'\n[[milters]]\nsocket = "{m.socket}"\ndefault_action = "tempfail"\n' for m in milters
    )


def auth_table(dns: LoopbackDns) -> str:
    return f'\n[auth]\n\n[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n'


@contextmanager
def mx(directory: Path, extra: str) -> Iterator[Daemon]:
    directory.mkdir(parents=True, exist_ok=True)
    with daemon(write_config(directory, extra)) as running:
        yield running


class Conversation:
    """A client that reads each reply whole, as the server sent it."""

    def __init__(self, mx: Daemon) -> None:
        self.sock = mx.connect()
        self.sock.settimeout(REPLY_TIMEOUT)
        self.pending = b""

    def reply(self) -> bytes:
        """Every line of the next reply, CRLFs included."""
        lines = b""
        while True:
            while b"\r\n" not in self.pending:
                chunk = self.sock.recv(65536)
                assert chunk, f"connection closed after {lines!r}"
                self.pending += chunk
            line, self.pending = self.pending.split(b"\r\n", 1)
            lines += line + b"\r\n"
            if line[3:4] != b"-":
                return lines

    def command(self, line: bytes, expected: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        answer = self.reply()
        assert answer.startswith(expected), (line, answer)
        return answer

    def close(self) -> None:
        self.sock.close()


def send(mx: Daemon, content: bytes, sender: str, recipient: str = RECIPIENT) -> bytes:
    """One transaction; the reply to its end of data, as sent (all its lines)."""
    # Sent as it stands: no line may need a dot stuffed in.
    assert not content.startswith(b".") and b"\n." not in content
    client = Conversation(mx)
    try:
        assert client.reply().startswith(b"220 ")
        client.command(b"EHLO client.test", b"250")
        client.command(f"MAIL FROM:<{sender}>".encode(), b"250 ")
        client.command(f"RCPT TO:<{recipient}>".encode(), b"250 ")
        client.command(b"DATA", b"354 ")
        client.sock.sendall(content + b".\r\n")
        end = client.reply()
        client.command(b"QUIT", b"221 ")
        return end
    except (OSError, AssertionError) as exc:
        raise AssertionError(f"{exc}\nsmtpd's log so far:\n{logged(mx)}") from exc
    finally:
        client.close()


def logged(mx: Daemon) -> str:
    """What smtpd has logged and no one has read yet (a session's traceback, say)."""
    lines = []
    with contextlib.suppress(queue.Empty):
        while (line := mx.lines.get_nowait()) is not None:
            lines.append(line)
    return "".join(lines)


def queued_copy(mx: Daemon, reply: bytes) -> bytes:
    """The stored message the end-of-data reply names."""
    found = QUEUED.fullmatch(reply)
    assert found, reply
    return stored(mx.config, found.group(1).decode())


def algorithms(content: bytes) -> list[str]:
    return sorted(
        tag.strip().split("=", 1)[1]
        for signature in headers(content, "DKIM-Signature")
        for tag in signature.split(";")
        if tag.strip().startswith("a=")
    )


@pytest.fixture(scope="module")
def unix_signer(
    tmp_path_factory: pytest.TempPathFactory, milter_dns: LoopbackDns
) -> Iterator[OpenDKIM]:
    """OpenDKIM signing with RSA on a Unix socket (as Debian runs it), for SIGNER_DOMAIN."""
    directory = tmp_path_factory.mktemp("opendkim-unix")
    # The sessions (user nobody) connect to the socket in this directory.
    reachable_by_anyone(directory)
    try:
        key = make_rsa_key(directory / "keys", SIGNER_DOMAIN, "unix")
    except MilterUnavailable as exc:
        unavailable(str(exc))
    milter_dns.publish(key)
    yield from run_milter(OpenDKIM(directory, mode="s", keys=[key], unix=True))


def test_opendkim_signers_sign_what_mmdf_smtp_queues(
    opendkim_signer: OpenDKIM,
    opendkim_ed25519_signer: OpenDKIM,
    milter_dns: LoopbackDns,
    tmp_path: Path,
) -> None:
    with mx(tmp_path, milters_table(opendkim_signer, opendkim_ed25519_signer)) as server:
        sender = f"alice@{SIGNER_DOMAIN}"
        signed = queued_copy(server, send(server, message(sender, "signed"), sender))
        # Only the signing domain's mail is signed.
        unsigned = queued_copy(
            server, send(server, message("carol@other.test", "unsigned"), "carol@other.test")
        )
    assert headers(unsigned, "DKIM-Signature") == []
    assert algorithms(signed) == ["ed25519-sha256", "rsa-sha256"]
    verifier = dkim.DKIM(signed)
    for index in range(2):
        assert verifier.verify(idx=index, dnsfunc=milter_dns.txt), index
    # The check can fail: the signatures do not cover a changed body.
    tampered = signed.replace(b"Hello.", b"Hullo.")
    for index in range(2):
        with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
            dkim.DKIM(tampered).verify(idx=index, dnsfunc=milter_dns.txt)


def test_opendkim_verifier_results_in_the_queued_copy(
    opendkim_verifier: OpenDKIM, milter_dns: LoopbackDns, tmp_path: Path
) -> None:
    domain = "verify.mmdf.test"
    rsa = make_rsa_key(tmp_path / "keys", domain, "m-rsa")
    milter_dns.publish(rsa)
    ed25519 = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(ed25519.verify_key)).decode()
    milter_dns.zone.add(
        f"m-ed._domainkey.{domain}", "TXT", txt_rdata(f"v=DKIM1; k=ed25519; p={public}")
    )
    plain = message(f"dave@{domain}", "verify me")
    signed = dkim.sign(plain, b"m-rsa", domain.encode(), rsa.private_key.read_bytes())
    signed += dkim.sign(
        plain,
        b"m-ed",
        domain.encode(),
        base64.b64encode(bytes(ed25519)),
        signature_algorithm=b"ed25519-sha256",
    )
    with mx(tmp_path / "mx", milters_table(opendkim_verifier)) as server:
        good = queued_copy(server, send(server, signed + plain, f"dave@{domain}"))
        tampered = signed + plain.replace(b"Hello.", b"Hullo.")
        bad = queued_copy(server, send(server, tampered, f"dave@{domain}"))
    [passed] = headers(good, "Authentication-Results")
    [failed] = headers(bad, "Authentication-Results")
    assert passed.startswith(f"{AUTHSERV_ID};"), passed
    assert dkim_results(passed) == {"m-rsa": "pass", "m-ed": "pass"}, passed
    assert f"header.d={domain} header.i=@{domain} header.a=rsa-sha256 header.s=m-rsa" in passed
    assert dkim_results(failed) == {"m-rsa": "fail", "m-ed": "fail"}, failed


def test_opendmarc_refusal_reaches_the_client_and_nothing_is_queued(
    opendmarc: DmarcMilter, tmp_path: Path
) -> None:
    """A failure of alignment, as in the Postfix proof: on loopback SPF always passes."""
    strict, bounces = "reject.mmdf.test", "bounces.mmdf.test"
    opendmarc.zone.add(f"_dmarc.{strict}", "TXT", txt_rdata("v=DMARC1; p=reject"))
    for domain in (strict, bounces):
        opendmarc.zone.add(domain, "TXT", txt_rdata("v=spf1 ip4:127.0.0.0/8 -all"))
    with mx(tmp_path, milters_table(opendmarc)) as server:
        refused = send(server, message(f"erin@{strict}", "unaligned"), f"list@{bounces}")
        assert queued(server.config) == []
        aligned = queued_copy(
            server, send(server, message(f"erin@{strict}", "aligned"), f"erin@{strict}")
        )
    assert refused == f"550 5.7.1 rejected by DMARC policy for {strict}\r\n".encode()
    results = headers(aligned, "Authentication-Results")
    assert f"{AUTHSERV_ID}; dmarc=pass (p=reject dis=none) header.from={strict}" in results


def test_rspamd_refuses_gtube_with_its_reply_and_marks_clean_mail(
    rspamd_milter: Rspamd, tmp_path: Path
) -> None:
    with mx(tmp_path, milters_table(rspamd_milter)) as server:
        refused = send(
            server, message("frank@clean.test", "gtube", GTUBE + b"\r\n"), "frank@clean.test"
        )
        assert queued(server.config) == []
        clean = queued_copy(
            server, send(server, message("frank@clean.test", "clean"), "frank@clean.test")
        )
    code, text = Rspamd.GTUBE_REPLY
    assert refused == f"{code} {text}\r\n".encode()
    [result] = headers(clean, "X-Spamd-Result")
    assert result.startswith("default: False ["), result
    assert headers(clean, "X-Rspamd-Server")
    assert headers(clean, "X-Rspamd-Queue-Id")
    # Added to the message, under our trace field: the body is as sent.
    assert clean.startswith(b"Received: from client.test ")
    assert clean.endswith(b"\r\n\r\nHello.\r\n")


def test_auth_verifies_what_opendkim_signed_through_mmdf_smtp(
    unix_signer: OpenDKIM,
    opendkim_ed25519_signer: OpenDKIM,
    milter_dns: LoopbackDns,
    tmp_path: Path,
) -> None:
    """Signed on one mmdf-smtp (RSA over a Unix socket, Ed25519 over TCP), verified on another.

    Both run [auth] with the same authserv_id: the first's results say the
    message came unsigned (the checks see it as it arrived, before the
    milters sign it); the second removes that field, which claims its own
    authserv_id (RFC 8601 5), and adds its own, in which both signatures pass.
    """
    sender = f"grace@{SIGNER_DOMAIN}"
    signing = auth_table(milter_dns) + milters_table(unix_signer, opendkim_ed25519_signer)
    with mx(tmp_path / "signer", signing) as server:
        signed = queued_copy(server, send(server, message(sender, "relayed"), sender))
    assert algorithms(signed) == ["ed25519-sha256", "rsa-sha256"]
    [first] = headers(signed, "Authentication-Results")
    assert first.startswith("mx.test;") and "dkim=none" in first, first
    with mx(tmp_path / "verifier", auth_table(milter_dns)) as server:
        verified = queued_copy(server, send(server, signed, sender))
    [second] = headers(verified, "Authentication-Results")
    assert second.startswith("mx.test;"), second
    assert dkim_results(second) == {"unix": "pass", "ed25519": "pass"}, second
    assert f"dkim=pass header.d={SIGNER_DOMAIN} header.s=unix header.a=rsa-sha256" in second
    assert f"dkim=pass header.d={SIGNER_DOMAIN} header.s=ed25519 header.a=ed25519-sha256" in second
