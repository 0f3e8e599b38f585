"""The real-milter fixtures (tests/milters.py), proved with a real MTA: Postfix.

A private Postfix instance (bench/servers.py) takes mail from smtplib with
one milter as its smtpd_milters (milter_default_action = tempfail: a milter
that did not answer shows as a 4xx, never as a pass) and relays what it
queued to an aiosmtpd sink, where the test reads the bytes the milter's
changes ended in.  What holds here for Postfix must hold for mmdf-smtp's
milter client against the same fixtures.
"""

from __future__ import annotations

import base64
import email
import email.policy
import queue
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import nacl.signing
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from milter_servers import Milter, OpenDKIM, Rspamd
from servers import Postfix

from milters import (
    AUTHSERV_ID,
    SIGNER_DOMAIN,
    DmarcMilter,
    LoopbackDns,
    make_rsa_key,
    txt_rdata,
)
from peer import Handler, peer

pytestmark = pytest.mark.skipif(
    shutil.which("postfix") is None, reason="Debian's postfix is installed by .ci/run"
)

DELIVERY_TIMEOUT = 30.0
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@dataclass
class _Collect(Handler):
    """The next hop: each message it took, in order, for a bounded wait."""

    arrivals: queue.Queue[bytes] = field(default_factory=queue.Queue)

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        assert isinstance(envelope.original_content, bytes)
        self.arrivals.put(envelope.original_content)
        return reply


@dataclass
class Mta:
    postfix: Postfix
    sink: _Collect

    def send(self, message: bytes, sender: str, recipient: str = "bob@elsewhere.test") -> None:
        """Hand ``message`` to Postfix's smtpd; SMTPDataError etc. as smtplib raises them."""
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=DELIVERY_TIMEOUT) as client:
            client.sendmail(sender, [recipient], message)

    def delivered(self) -> bytes:
        """The next message Postfix relayed, as it was queued (milters' changes applied)."""
        return self.sink.arrivals.get(timeout=DELIVERY_TIMEOUT)


@contextmanager
def postfix_with(*milters: Milter) -> Iterator[Mta]:
    # Postfix's daemons run as the postfix user: its directory must be reachable.
    directory = Path(tempfile.mkdtemp(prefix="mmdf-milter-postfix-"))
    directory.chmod(0o755)
    with peer(_Collect()) as (collect, port):
        postfix = Postfix(
            directory, maxproc=10, milters=[m.socket for m in milters], relay_port=port
        )
        try:
            postfix.start()
            assert isinstance(collect, _Collect)
            yield Mta(postfix, collect)
        finally:
            postfix.stop()
            shutil.rmtree(directory, ignore_errors=True)


def message(sender: str, subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@elsewhere.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n"
        "Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n\r\n"
    ).encode() + body


def headers(content: bytes, name: str) -> list[str]:
    parsed = email.message_from_bytes(content, policy=email.policy.compat32)
    return [" ".join(value.split()) for value in parsed.get_all(name, [])]


def test_opendkim_signers_sign_what_postfix_queues(
    opendkim_signer: OpenDKIM, opendkim_ed25519_signer: OpenDKIM, milter_dns: LoopbackDns
) -> None:
    with postfix_with(opendkim_signer, opendkim_ed25519_signer) as mta:
        mta.send(message(f"alice@{SIGNER_DOMAIN}", "signed"), f"alice@{SIGNER_DOMAIN}")
        queued = mta.delivered()
        # Only the signing domain's mail is signed.
        mta.send(message("carol@other.test", "unsigned"), "carol@other.test")
        assert headers(mta.delivered(), "DKIM-Signature") == []
    signatures = headers(queued, "DKIM-Signature")
    algorithms = sorted(
        tag.strip().split("=", 1)[1]
        for signature in signatures
        for tag in signature.split(";")
        if tag.strip().startswith("a=")
    )
    assert algorithms == ["ed25519-sha256", "rsa-sha256"]
    verifier = dkim.DKIM(queued)
    for index in range(len(signatures)):
        assert verifier.verify(idx=index, dnsfunc=milter_dns.txt), (index, signatures[index])
    # The check can fail: the same signatures do not cover a changed body.
    tampered = queued.replace(b"Hello.", b"Hullo.")
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        dkim.DKIM(tampered).verify(idx=0, dnsfunc=milter_dns.txt)


def test_opendkim_verifier_adds_authentication_results(
    opendkim_verifier: OpenDKIM, milter_dns: LoopbackDns, tmp_path: Path
) -> None:
    domain = "verified.test"
    rsa = make_rsa_key(tmp_path, domain, "v-rsa")
    milter_dns.publish(rsa)
    ed25519 = nacl.signing.SigningKey.generate()
    # RFC 8463 4: p= is the raw public key; dkimpy takes the private key as
    # base64 of its 32-octet seed.
    public = base64.b64encode(bytes(ed25519.verify_key)).decode()
    milter_dns.zone.add(
        f"v-ed._domainkey.{domain}", "TXT", txt_rdata(f"v=DKIM1; k=ed25519; p={public}")
    )
    plain = message(f"dave@{domain}", "verify me")
    signed = dkim.sign(plain, b"v-rsa", domain.encode(), rsa.private_key.read_bytes())
    signed += dkim.sign(
        plain,
        b"v-ed",
        domain.encode(),
        base64.b64encode(bytes(ed25519)),
        signature_algorithm=b"ed25519-sha256",
    )
    with postfix_with(opendkim_verifier) as mta:
        mta.send(signed + plain, f"dave@{domain}")
        [passed] = headers(mta.delivered(), "Authentication-Results")
        tampered = signed + plain.replace(b"Hello.", b"Hullo.")
        mta.send(tampered, f"dave@{domain}")
        [failed] = headers(mta.delivered(), "Authentication-Results")
    assert passed.startswith(f"{AUTHSERV_ID};"), passed
    assert dkim_results(passed) == {"v-rsa": "pass", "v-ed": "pass"}, passed
    assert f"header.d={domain} header.i=@{domain} header.a=rsa-sha256 header.s=v-rsa" in passed
    assert dkim_results(failed) == {"v-rsa": "fail", "v-ed": "fail"}, failed


def dkim_results(field: str) -> dict[str, str]:
    """Selector to result, from the dkim= entries of an Authentication-Results field."""
    found = {}
    # Comments, such as "(2048-bit key; unprotected)", may hold semicolons.
    for entry in re.sub(r"\([^)]*\)", "", field).split(";")[1:]:
        words = entry.split()
        if words and words[0].startswith("dkim="):
            selector = next(w for w in words if w.startswith("header.s="))
            found[selector.removeprefix("header.s=")] = words[0].removeprefix("dkim=")
    return found


def test_opendmarc_refuses_a_p_reject_failure_and_passes_an_aligned_sender(
    opendmarc: DmarcMilter,
) -> None:
    """The failure is one of alignment: on loopback, SPF always passes.

    libspf2, which OpenDMARC's SPFSelfValidate uses, passes every client on
    127.0.0.0/8 whatever the record says (its "localhost" reason), and the
    tests' clients are all on loopback.  A message whose envelope sender's
    domain is not the From: domain, with no DKIM signature, fails DMARC all
    the same (RFC 7489 3.1: neither identifier aligned).
    """
    strict, relaxed = "strict.test", "relaxed.test"
    opendmarc.zone.add(f"_dmarc.{strict}", "TXT", txt_rdata("v=DMARC1; p=reject"))
    opendmarc.zone.add(f"_dmarc.{relaxed}", "TXT", txt_rdata("v=DMARC1; p=none"))
    for domain in (strict, relaxed, "bounces.test"):
        opendmarc.zone.add(domain, "TXT", txt_rdata("v=spf1 ip4:127.0.0.0/8 -all"))
    with postfix_with(opendmarc) as mta:
        mta.send(message(f"erin@{strict}", "aligned"), f"erin@{strict}")
        aligned = headers(mta.delivered(), "Authentication-Results")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            mta.send(message(f"erin@{strict}", "unaligned"), "list@bounces.test")
        # The same failure under p=none is only reported.
        mta.send(message(f"erin@{relaxed}", "unaligned"), "list@bounces.test")
        reported = headers(mta.delivered(), "Authentication-Results")
        assert mta.sink.arrivals.empty()
    assert f"{AUTHSERV_ID}; dmarc=pass (p=reject dis=none) header.from={strict}" in aligned
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        550,
        f"5.7.1 rejected by DMARC policy for {strict}".encode(),
    )
    assert f"{AUTHSERV_ID}; dmarc=fail (p=none dis=none) header.from={relaxed}" in reported
    assert (f"_dmarc.{strict}", "TXT") in opendmarc.zone.queries


def test_rspamd_refuses_gtube_and_marks_clean_mail(rspamd_milter: Rspamd) -> None:
    with postfix_with(rspamd_milter) as mta:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            mta.send(message("frank@clean.test", "gtube", GTUBE + b"\r\n"), "frank@clean.test")
        mta.send(message("frank@clean.test", "clean"), "frank@clean.test")
        clean = mta.delivered()
        assert mta.sink.arrivals.empty()
    code, text = Rspamd.GTUBE_REPLY
    assert (refused.value.smtp_code, refused.value.smtp_error) == (code, text.encode())
    [result] = headers(clean, "X-Spamd-Result")
    assert result.startswith("default: False ["), result
    assert headers(clean, "X-Rspamd-Server")
    assert headers(clean, "X-Rspamd-Queue-Id")
