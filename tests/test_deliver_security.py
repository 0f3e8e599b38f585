"""The next hop's TLS policy and AUTH, against real peers: aiosmtpd with
STARTTLS or TLS from the start, certificates from a trustme CA, AUTH checked."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdf_smtp.cli import checkque
from mmdf_smtp.cli.deliver import Service
from mmdf_smtp.config import ConfigError, NextHop, load, parse
from mmdf_smtp.delivery import nexthop
from mmdf_smtp.delivery.nexthop import security_of
from mmdf_smtp.delivery.runner import Runner
from peer import Handler, Received, peer
from test_deliver import MESSAGE, Setup, stored_message
from wire import PYTHON, env, write_config

USER, PASSWORD = "relay-user", "s3cret pass"
RECIPIENT = "far@remote.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA, name: str = "relay.test") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


class Accounts:
    """The peer's AUTH: one user, one password; the mechanisms asked for, in order."""

    def __init__(self, refusal: str | None = None) -> None:
        self.mechanisms: list[str] = []
        self.refusal = refusal  # the reply to wrong credentials; None: aiosmtpd's 535

    def __call__(
        self, server: object, session: object, envelope: object, mechanism: str, data: Any
    ) -> AuthResult:
        self.mechanisms.append(mechanism)
        right = isinstance(data, LoginPassword) and data == (USER.encode(), PASSWORD.encode())
        return AuthResult(success=right, handled=False, message=self.refusal, auth_data=data)


class Offering(Handler):
    """A peer whose EHLO offers ``auth`` for AUTH (None: no AUTH; aiosmtpd
    offers PLAIN and LOGIN over TLS unasked), and STARTTLS when
    ``starttls`` even without a context (it then answers 454)."""

    def __init__(self, auth: str | None, *, starttls: bool = False) -> None:
        super().__init__()
        self.auth = auth
        self.starttls = starttls

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook names
        self, server: object, session: Any, envelope: object, name: str, lines: list[str]
    ) -> list[str]:
        session.host_name = name
        kept = [line for line in lines[:-1] if not line.startswith("250-AUTH")]
        if self.auth is not None:
            kept.append(f"250-AUTH {self.auth}")
        if self.starttls:
            kept.append("250-STARTTLS")
        return [*kept, lines[-1]]


def setup(tmp_path: Path, port: int, extra: str = "", *, protocol: str = "smtp") -> Setup:
    return Setup(tmp_path, f'[deliver]\nnext_hop = "{protocol}:127.0.0.1:{port}"\n{extra}')


def auth_keys(tmp_path: Path, password: str = PASSWORD) -> str:
    path = tmp_path / "relay.password"
    path.write_text(password + "\n")
    return f'auth_user = "{USER}"\nauth_password_file = "{path}"\n'


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="mmdf_smtp.deliver")
    yield caplog


def sent(s: Setup, handler: Handler, log: pytest.LogCaptureFixture, *, tls: bool) -> Received:
    """The one message the peer got, as queued; nothing left in the queue."""
    [received] = handler.messages
    assert received.recipients == [RECIPIENT]
    assert received.content == MESSAGE
    assert received.tls is tls
    assert list(s.spool.messages()) == []
    assert f"to=<{RECIPIENT}> relay=" in log.text
    assert "attempts=1 status=delivered (250 2.0.0 OK)" in log.text
    return received


def deferred(
    s: Setup, queue_id: str, handler: Handler, log: pytest.LogCaptureFixture, reply: str
) -> None:
    """The recipient deferred with ``reply``, logged so; the peer got nothing
    and no notice was queued (a bounce would be a second message)."""
    assert handler.messages == []
    state = s.spool.read_state(queue_id)
    assert state is not None
    [entry] = state.recipients
    assert (entry.status, entry.last_reply, entry.attempts) == ("deferred", reply, 1)
    assert f"id={queue_id} to=<{RECIPIENT}> " in log.text
    assert f" attempts=1 status=deferred ({reply}) next_try=" in log.text
    assert [m.id for m in s.spool.messages()] == [queue_id]


def run(s: Setup) -> str:
    queue_id = s.queue(RECIPIENT)
    assert stored_message(s, queue_id) == MESSAGE
    s.runner.run()
    return queue_id


# -- [deliver] tls -------------------------------------------------------------------


def test_may_sends_in_plaintext_to_a_peer_without_starttls(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    with peer(Handler()) as (handler, port):
        s = setup(tmp_path, port)
        assert s.config.deliver.tls == "may"
        run(s)
    sent(s, handler, log, tls=False)


def test_none_never_says_starttls(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    with peer(Handler(), tls=server_context(ca)) as (handler, port):
        s = setup(tmp_path, port, 'tls = "none"\n')
        run(s)
    sent(s, handler, log, tls=False)


def test_encrypt_defers_when_starttls_is_not_offered(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    with peer(Handler()) as (handler, port):
        s = setup(tmp_path, port, 'tls = "encrypt"\n')
        queue_id = run(s)
    reply = (
        '451 4.7.4 TLS is required by [deliver] tls = "encrypt" and'
        f" smtp:[127.0.0.1]:{port} does not offer STARTTLS"
    )
    deferred(s, queue_id, handler, log, reply)


def test_checkque_shows_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with peer(Handler()) as (_, port):
        s = setup(tmp_path, port, 'tls = "encrypt"\n')
        queue_id = run(s)
    capsys.readouterr()
    assert checkque.main(["-c", str(s.config_path), "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    shown = json.loads(line)
    assert shown["id"] == queue_id
    [recipient] = shown["states"]
    assert (recipient["address"], recipient["status"]) == (RECIPIENT, "deferred")
    assert recipient["last_reply"] == (
        '451 4.7.4 TLS is required by [deliver] tls = "encrypt" and'
        f" smtp:[127.0.0.1]:{port} does not offer STARTTLS"
    )


def test_encrypt_sends_over_tls_with_a_certificate_nobody_checks(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    unknown = trustme.CA()  # trusted by no one
    with peer(Handler(), tls=server_context(unknown, "elsewhere.test")) as (handler, port):
        s = setup(tmp_path, port, 'tls = "encrypt"\n')
        run(s)
    sent(s, handler, log, tls=True)


def test_encrypt_never_falls_back_to_plaintext_after_a_failed_handshake(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    # A server context without a certificate: STARTTLS offered, every handshake fails.
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with peer(Handler(), tls=broken) as (handler, port):
        s = setup(tmp_path, port, 'tls = "encrypt"\n')
        queue_id = run(s)
    state = s.spool.read_state(queue_id)
    assert state is not None
    prefix = (
        '451 4.7.5 TLS is required by [deliver] tls = "encrypt" and the TLS handshake'
        f" with smtp:[127.0.0.1]:{port} failed: "
    )
    assert state.recipients[0].last_reply.startswith(prefix)
    deferred(s, queue_id, handler, log, state.recipients[0].last_reply)
    assert "sending in plaintext" not in log.text


@pytest.mark.parametrize(
    ("certified", "name"),
    [("relay.test", 'tls_name = "relay.test"\n'), ("127.0.0.1", "")],
    ids=["tls_name", "the next hop's host"],
)
def test_verify_sends_to_a_trusted_certificate_of_the_right_name(
    tmp_path: Path,
    ca: trustme.CA,
    ca_file: Path,
    log: pytest.LogCaptureFixture,
    *,
    certified: str,
    name: str,
) -> None:
    with peer(Handler(), tls=server_context(ca, certified)) as (handler, port):
        s = setup(tmp_path, port, f'tls = "verify"\ntls_ca_file = "{ca_file}"\n{name}')
        run(s)
    sent(s, handler, log, tls=True)


def test_verify_defers_a_certificate_of_another_name(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, log: pytest.LogCaptureFixture
) -> None:
    with peer(Handler(), tls=server_context(ca, "relay.test")) as (handler, port):
        keys = f'tls = "verify"\ntls_ca_file = "{ca_file}"\ntls_name = "other.test"\n'
        s = setup(tmp_path, port, keys)
        queue_id = run(s)
    reply = (
        '451 4.7.5 TLS is required by [deliver] tls = "verify" and the certificate of'
        " other.test did not verify: Hostname mismatch, certificate is not valid for"
        " 'other.test'."
    )
    deferred(s, queue_id, handler, log, reply)


def test_verify_defers_a_certificate_from_an_unknown_ca(
    tmp_path: Path, ca_file: Path, log: pytest.LogCaptureFixture
) -> None:
    unknown = trustme.CA()
    with peer(Handler(), tls=server_context(unknown, "127.0.0.1")) as (handler, port):
        s = setup(tmp_path, port, f'tls = "verify"\ntls_ca_file = "{ca_file}"\n')
        queue_id = run(s)
    reply = (
        '451 4.7.5 TLS is required by [deliver] tls = "verify" and the certificate of'
        " 127.0.0.1 did not verify: unable to get local issuer certificate"
    )
    deferred(s, queue_id, handler, log, reply)


def test_a_connection_kept_under_one_policy_is_not_used_under_another(
    ca: trustme.CA, ca_file: Path
) -> None:
    connections = nexthop.Connections(idle=60, reuse=100)
    verify = nexthop.Security(
        level="verify", ca_file=ca_file, verifying=ssl.create_default_context(cafile=ca_file)
    )
    try:
        # Certified for another name: "may" takes it, "verify" does not.
        with peer(Handler(), tls=server_context(ca, "relay.test")) as (handler, port):
            hop = NextHop(protocol="smtp", host="127.0.0.1", port=port)

            def send(security: nexthop.Security) -> nexthop.Outcome:
                [outcome] = connections.send(
                    hop,
                    hostname="mx.test",
                    sender="a@example.org",
                    recipients=[RECIPIENT],
                    message=BytesIO(MESSAGE),
                    security=security,
                )
                return outcome

            assert send(nexthop.OPPORTUNISTIC).code == 250
            assert (connections.opened, connections.idle()) == (1, 1)
            refused = send(verify)
            assert refused.code == 451 and "did not verify" in refused.text
            # Not the kept one, which would have taken it; and no session had.
            assert (connections.opened, connections.idle()) == (1, 1)
            assert send(nexthop.OPPORTUNISTIC).code == 250
            assert connections.opened == 1
    finally:
        connections.close()
    assert len(handler.messages) == 2


# -- AUTH ------------------------------------------------------------------------------


def test_auth_with_the_right_password_sends_and_the_peer_sees_the_user(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, log: pytest.LogCaptureFixture
) -> None:
    accounts = Accounts()
    context = server_context(ca, "127.0.0.1")
    with peer(Handler(), tls=context, authenticator=accounts) as (handler, port):
        s = setup(
            tmp_path, port, f'tls = "verify"\ntls_ca_file = "{ca_file}"\n' + auth_keys(tmp_path)
        )
        run(s)
    received = sent(s, handler, log, tls=True)
    assert received.login == USER.encode()
    assert accounts.mechanisms == ["PLAIN"]


def test_auth_with_a_wrong_password_defers_and_never_bounces(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    accounts = Accounts()
    with peer(Handler(), tls=server_context(ca), authenticator=accounts) as (handler, port):
        s = setup(tmp_path, port, auth_keys(tmp_path, "wrong"))
        queue_id = run(s)
    reply = (
        f"451 4.7.8 smtp:[127.0.0.1]:{port} refused AUTH PLAIN as {USER} ([deliver] auth_user):"
        " 535 5.7.8 Authentication credentials invalid"
    )
    deferred(s, queue_id, handler, log, reply)
    assert accounts.mechanisms == ["PLAIN"]


def test_a_refused_password_leaves_the_hop_alone_for_the_next_messages(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    # Every message would meet the same refusal; a smarthost that counts
    # failed logins locks the account. One try, then retry_min's pause.
    accounts = Accounts()
    with peer(Handler(), tls=server_context(ca), authenticator=accounts) as (handler, port):
        s = setup(
            tmp_path, port, auth_keys(tmp_path, "wrong") + "destination_concurrency_limit = 1\n"
        )
        first, second = s.queue(RECIPIENT), s.queue(RECIPIENT)
        s.runner.run()
    assert accounts.mechanisms == ["PLAIN"]
    assert handler.messages == []
    refused = (
        f"451 4.7.8 smtp:[127.0.0.1]:{port} refused AUTH PLAIN as {USER} ([deliver] auth_user):"
        " 535 5.7.8 Authentication credentials invalid"
    )
    replies = []
    for queue_id in (first, second):
        state = s.spool.read_state(queue_id)
        assert state is not None
        [entry] = state.recipients
        assert entry.status == "deferred"
        replies.append(entry.last_reply)
    suspended = f"451 4.4.1 delivery temporarily suspended: {refused.split(' ', 2)[2]}"
    assert sorted(replies) == sorted([refused, suspended])
    assert f"{refused}; delivery to it suspended for " in log.text


def test_a_503_to_auth_is_no_success(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    # smtplib's auth() returns a 503 as it does a 235: MAIL would follow unauthenticated.
    accounts = Accounts("503 5.5.1 Not now")
    with peer(Handler(), tls=server_context(ca), authenticator=accounts) as (handler, port):
        s = setup(tmp_path, port, auth_keys(tmp_path, "wrong"))
        queue_id = run(s)
    reply = (
        f"451 4.7.0 smtp:[127.0.0.1]:{port} refused AUTH PLAIN as {USER} ([deliver] auth_user):"
        " 503 5.5.1 Not now"
    )
    deferred(s, queue_id, handler, log, reply)


def test_auth_defers_when_the_peer_offers_no_auth(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    with peer(Offering(None), tls=server_context(ca)) as (handler, port):
        s = setup(tmp_path, port, auth_keys(tmp_path))
        queue_id = run(s)
    reply = (
        f"451 4.7.4 [deliver] auth_user is set and smtp:[127.0.0.1]:{port} offers no AUTH"
        " (deliver speaks PLAIN and LOGIN)"
    )
    deferred(s, queue_id, handler, log, reply)


def test_auth_login_where_the_peer_offers_no_plain(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    accounts = Accounts()
    handler = Offering("CRAM-MD5 LOGIN")
    with peer(handler, tls=server_context(ca), authenticator=accounts) as (_, port):
        s = setup(tmp_path, port, auth_keys(tmp_path))
        run(s)
    assert sent(s, handler, log, tls=True).login == USER.encode()
    assert accounts.mechanisms == ["LOGIN"]


def test_auth_defers_when_the_peer_offers_only_mechanisms_deliver_does_not_speak(
    tmp_path: Path, ca: trustme.CA, log: pytest.LogCaptureFixture
) -> None:
    with peer(Offering("CRAM-MD5 XOAUTH2"), tls=server_context(ca)) as (handler, port):
        s = setup(tmp_path, port, auth_keys(tmp_path))
        queue_id = run(s)
    reply = (
        f"451 4.7.4 [deliver] auth_user is set and smtp:[127.0.0.1]:{port} offers"
        " AUTH CRAM-MD5 XOAUTH2 (deliver speaks PLAIN and LOGIN)"
    )
    deferred(s, queue_id, handler, log, reply)


def test_a_refused_starttls_goes_on_in_plaintext_under_may_only(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    with peer(Offering(None, starttls=True)) as (handler, port):
        s = setup(tmp_path, port)
        run(s)
        sent(s, handler, log, tls=False)
        assert f"smtp:[127.0.0.1]:{port} refused STARTTLS: 454 TLS not available" in log.text
        handler.messages.clear()
        (tmp_path / "encrypt").mkdir()
        s = setup(tmp_path / "encrypt", port, 'tls = "encrypt"\n')
        queue_id = run(s)
    reply = (
        '451 4.7.4 TLS is required by [deliver] tls = "encrypt" and'
        f" smtp:[127.0.0.1]:{port} refused STARTTLS: 454 TLS not available"
    )
    deferred(s, queue_id, handler, log, reply)


def test_no_password_goes_in_plaintext_even_under_a_policy_made_without_tls() -> None:
    # The configuration cannot make this policy: one made in code is still refused.
    accounts = Accounts()
    careless = nexthop.Security(level="may", user=USER, password=PASSWORD)
    with peer(Handler(), authenticator=accounts) as (handler, port):
        [outcome] = nexthop.send(
            NextHop(protocol="smtp", host="127.0.0.1", port=port),
            hostname="mx.test",
            sender="a@example.org",
            recipients=[RECIPIENT],
            message=BytesIO(MESSAGE),
            security=careless,
        )
    assert outcome == nexthop.Outcome(
        451,
        f"4.7.4 [deliver] auth_user is set and smtp:[127.0.0.1]:{port} is not spoken to over TLS",
        unreachable=True,
    )
    assert (accounts.mechanisms, handler.messages) == ([], [])


def test_auth_never_sends_credentials_in_plaintext(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    # The peer offers AUTH without STARTTLS: with tls = "may", auth_user still requires TLS.
    accounts = Accounts()
    with peer(Handler(), authenticator=accounts) as (handler, port):
        s = setup(tmp_path, port, 'tls = "may"\n' + auth_keys(tmp_path))
        assert s.config.deliver.tls_level == "encrypt"
        queue_id = run(s)
    reply = (
        "451 4.7.4 TLS is required by [deliver] auth_user and"
        f" smtp:[127.0.0.1]:{port} does not offer STARTTLS"
    )
    deferred(s, queue_id, handler, log, reply)
    assert accounts.mechanisms == []


# -- smtps: TLS from the first octet ----------------------------------------------------


def test_smtps_verifies_and_authenticates(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, log: pytest.LogCaptureFixture
) -> None:
    accounts = Accounts()
    context = server_context(ca, "relay.test")
    with peer(Handler(), implicit_tls=context, authenticator=accounts) as (handler, port):
        keys = f'tls = "verify"\ntls_ca_file = "{ca_file}"\ntls_name = "relay.test"\n'
        s = setup(tmp_path, port, keys + auth_keys(tmp_path), protocol="smtps")
        run(s)
    received = sent(s, handler, log, tls=True)
    assert received.login == USER.encode()


def test_smtps_with_an_unknown_ca_defers(
    tmp_path: Path, ca_file: Path, log: pytest.LogCaptureFixture
) -> None:
    context = server_context(trustme.CA(), "127.0.0.1")
    with peer(Handler(), implicit_tls=context) as (handler, port):
        s = setup(tmp_path, port, f'tls = "verify"\ntls_ca_file = "{ca_file}"\n', protocol="smtps")
        queue_id = run(s)
    reply = (
        '451 4.7.5 TLS is required by [deliver] tls = "verify" and the certificate of'
        " 127.0.0.1 did not verify: unable to get local issuer certificate"
    )
    deferred(s, queue_id, handler, log, reply)


def test_smtps_to_a_plaintext_peer_defers(tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    with peer(Handler()) as (handler, port):
        s = setup(tmp_path, port, protocol="smtps")
        assert s.config.deliver.tls_level == "encrypt"
        queue_id = run(s)
    state = s.spool.read_state(queue_id)
    assert state is not None
    reply = state.recipients[0].last_reply
    assert reply.startswith(
        "451 4.7.5 TLS is required by the smtps: next hop and the TLS handshake with"
        f" smtps:[127.0.0.1]:{port} failed: "
    )
    deferred(s, queue_id, handler, log, reply)


# -- the password file and the CAs, read by deliver ------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read: No such file or directory"),
        ("", "must hold the password alone, on one line"),
        ("one\ntwo\n", "must hold the password alone, on one line"),
    ],
)
def test_a_password_file_that_cannot_be_used(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    password = tmp_path / "relay.password"
    if content is not None:
        password.write_text(content)
    s = Setup(tmp_path)
    path = s.config_path
    text = path.read_text()
    path.write_text(
        text + f'[deliver]\nnext_hop = "smtp:127.0.0.1:9"\nauth_user = "{USER}"\n'
        f'auth_password_file = "{password}"\n'
    )
    line = len(text.splitlines()) + 4
    with pytest.raises(ConfigError) as caught:
        Runner(load(str(path)), s.spool)
    assert str(caught.value) == (
        f"{path}:{line}: deliver.auth_password_file: {password}: {problem}"
    )


def test_deliver_exits_78_on_a_ca_file_it_cannot_load(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    path = write_config(
        tmp_path,
        f'[deliver]\nnext_hop = "smtp:127.0.0.1:9"\ntls = "verify"\ntls_ca_file = "{garbage}"\n',
    )
    result = subprocess.run(
        [PYTHON, "-m", "mmdf_smtp.cli.deliver", "-c", str(path), "--once"],
        capture_output=True,
        env=env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert f"{path}:".encode() in result.stderr
    assert f": deliver.tls_ca_file: {garbage}: cannot load the CAs:".encode() in result.stderr


def test_a_reload_reads_the_password_file_again_and_keeps_the_old_one_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = setup(tmp_path, 9, auth_keys(tmp_path, "first"))
    wakeups = s.spool.start_delivering()
    try:
        service = Service(str(s.config_path), s.config, s.spool, wakeups, security_of(s.config))
        assert service.runner.security.password == "first"
        password = tmp_path / "relay.password"
        password.write_text("second\n")
        service.reload()
        assert service.runner.security.password == "second"
        password.unlink()
        service.reload()
        assert service.runner.security.password == "second"
        service.runner.close()
    finally:
        wakeups.close()
    assert f"reload failed, keeping the running configuration: {s.config_path}:" in caplog.text
    assert f"deliver.auth_password_file: {password}: cannot read:" in caplog.text


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    password=st.text(
        st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), min_size=1
    ),
    end=st.sampled_from(["", "\n", "\r\n"]),
)
def test_the_password_is_the_files_one_line_as_written(
    tmp_path: Path, password: str, end: str
) -> None:
    path = tmp_path / "relay.password"
    path.write_bytes((password + end).encode())
    config = parse(
        f'[deliver]\nnext_hop = "smtp:relay.test:587"\nauth_user = "{USER}"\n'
        f'auth_password_file = "{path}"\n',
        "f.toml",
        base=tmp_path,
    )
    assert security_of(config).password == password
