"""Postfix's SMTP client relaying into smtpd: the MTA most senders are."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from wire import body_of, certificate, daemon, queued, stored, write_config

pytestmark = pytest.mark.skipif(
    shutil.which("postfix") is None or shutil.which("sendmail") is None,
    reason="Debian's postfix is installed by .ci/run",
)

MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
showq     unix  n       -       n       -       -       showq
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""


@contextmanager
def postfix(relay_port: int, tls: str = "none") -> Iterator[Path]:
    """A private Postfix instance on loopback that relays everything to us."""
    # Postfix's daemons run as the postfix user: its directory must be
    # reachable by it, which pytest's private tmp_path is not.
    directory = Path(tempfile.mkdtemp(prefix="mmdf-postfix-"))
    directory.chmod(0o755)
    (directory / "queue").mkdir()
    (directory / "data").mkdir()
    shutil.chown(directory / "data", "postfix")
    main_cf = f"""\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = pf.test
myorigin = pf.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
master_service_disable = inet
relayhost = [127.0.0.1]:{relay_port}
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
smtp_dns_support_level = disabled
smtp_tls_security_level = {tls}
alias_maps =
"""
    (directory / "main.cf").write_text(main_cf)
    (directory / "master.cf").write_text(MASTER_CF)
    postfix_cmd = ["postfix", "-c", str(directory)]
    subprocess.run([*postfix_cmd, "check"], check=True, capture_output=True)
    subprocess.run([*postfix_cmd, "start"], check=True, capture_output=True)
    try:
        yield directory
    finally:
        subprocess.run([*postfix_cmd, "stop"], check=False, capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def submit(directory: Path, message: bytes) -> None:
    subprocess.run(
        ["sendmail", "-C", str(directory), "-f", "sender@pf.test", "alice@example.org"],
        input=message,
        check=True,
        timeout=60,
    )


def test_postfix_relays_into_smtpd(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with daemon(config) as d, postfix(d.port) as instance:
        submit(instance, b"Subject: via postfix\n\nrelayed by postfix\n..a dot line\n")
        [line] = d.log_lines("queued id=")
    assert "helo=pf.test from=<sender@pf.test> to=<alice@example.org>" in line
    [message] = queued(config)
    assert message["helo"] == "pf.test"
    body = body_of(stored(config, message["id"]))
    assert body.endswith(b"\r\n\r\nrelayed by postfix\r\n..a dot line\r\n")
    assert b"Subject: via postfix\r\n" in body


def test_postfix_relays_over_starttls(tmp_path: Path) -> None:
    config = write_config(tmp_path, tls=certificate(trustme.CA(), tmp_path))
    # "encrypt": Postfix must use STARTTLS (it does not verify the certificate).
    with daemon(config) as d, postfix(d.port, tls="encrypt") as instance:
        submit(instance, b"Subject: tls\n\nover starttls\n")
        d.log_lines("queued id=")
    [message] = queued(config)
    assert message["tls"].startswith("TLSv1.3 with cipher ")
    assert b"\r\n\twith ESMTPS id " in stored(config, message["id"])
