"""Real milters from Debian's packages, each started on a free loopback port and stopped.

OpenDKIM (signing or verifying), OpenDMARC and rspamd's proxy worker in
milter mode, each a foreground child process with its configuration,
keys, pid file and log in a directory of its own; the system's
configuration (/etc/opendkim.conf, /etc/rspamd/local.d, ...) is never read
for settings and never written.  No milter asks the system's resolver: each
is pointed at a DNS server on loopback that the caller starts (the tests'
own), so that keys, SPF and DMARC records are the caller's and nothing
reaches the Internet.

The benchmark (run.py) starts OpenDKIM as Postfix's smtpd milter; the tests
(tests/milters.py) wrap every class here in a pytest fixture.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from servers import free_port, process_tree

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
START_ATTEMPTS = 3
LOOPBACK = "127.0.0.1"


class MilterUnavailable(RuntimeError):
    """The milter's program is not installed (Debian's package is named)."""


class MilterDidNotStart(RuntimeError):
    """The milter exited, or did not accept connections in time; its log is in the message."""

    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


def require(program: str, package: str) -> str:
    """The path of ``program``, found in PATH or the sbin directories."""
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin")
    if found is None:
        raise MilterUnavailable(f"{program} is missing (Debian's package {package})")
    return found


@dataclass(frozen=True)
class DkimKey:
    """A DKIM key pair: the private key's file and the TXT record that publishes it."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519", the key's k= tag (RFC 6376 3.6.1, RFC 8463)
    private_key: Path
    txt: str  # the record's text, e.g. "v=DKIM1; k=rsa; p=MIIB..."

    @property
    def record_name(self) -> str:
        """Where a verifier looks the key up (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"


def make_rsa_key(directory: Path, domain: str, selector: str, bits: int = 2048) -> DkimKey:
    """An RSA key made by OpenDKIM's own opendkim-genkey, as an administrator would."""
    genkey = require("opendkim-genkey", "opendkim-tools")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [genkey, f"--bits={bits}", f"--domain={domain}", f"--selector={selector}"],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT,
    )
    zone_stub = (directory / f"{selector}.txt").read_text()
    # 'sel._domainkey IN TXT ( "v=DKIM1; k=rsa; " "p=MIIB..." )  ; comment':
    # the record is the concatenation of the quoted strings.
    record = "".join(re.findall(r'"([^"]*)"', zone_stub.split(";  -----", 1)[0]))
    return DkimKey(domain, selector, "rsa", directory / f"{selector}.private", record)


def make_ed25519_key(directory: Path, domain: str, selector: str) -> DkimKey:
    """An Ed25519 key (RFC 8463): opendkim-genkey makes RSA keys only, openssl makes this.

    The record's p= is the raw 32-octet public key, the last 32 octets of
    its SubjectPublicKeyInfo (RFC 8463 4: "the public key is not encoded in
    the ASN.1 structure" used for RSA).
    """
    openssl = require("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / f"{selector}.private"
    subprocess.run(
        [openssl, "genpkey", "-algorithm", "ed25519", "-out", str(private)],
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT,
    )
    private.chmod(0o600)
    der = subprocess.run(
        [openssl, "pkey", "-in", str(private), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT,
    ).stdout
    public = base64.b64encode(der[-32:]).decode()
    return DkimKey(domain, selector, "ed25519", private, f"v=DKIM1; k=ed25519; p={public}")


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on 127.0.0.1:``port`` (or on any address), from /proc."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if int(hex_port, 16) == port and fields[3] == "0A" and address in ("0100007F", "00000000"):
            found.add(fields[9])
    return found


def _socket_inodes(pids: list[int]) -> set[str]:
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


def _accepting(address: int | Path, process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` (or a child) listens on ``address`` and a connection is accepted.

    A port is checked to be the milter's own: a port taken by someone else
    between free_port and the milter's bind would accept connections too,
    while the milter, failing to bind, exits.
    """
    if isinstance(address, Path):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(str(address))
        return True
    if not _listening_inodes(address) & _socket_inodes(process_tree(process.pid)):
        return False
    with socket.create_connection((LOOPBACK, address), timeout=1):
        return True


def wait_accepting(
    address: int | Path, process: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Return once ``address`` (a loopback port or a Unix socket) accepts a connection.

    Raises MilterDidNotStart if ``process`` ends first or START_TIMEOUT
    passes; the log is in the error so that a milter that refused its
    configuration says why.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if _accepting(address, process):
                return
        except OSError:
            pass
        time.sleep(0.02)
    status = process.poll()
    if status is None:
        stop_process(process)
    text = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise MilterDidNotStart(
        f"{what} did not start (exit status {status}):\n{text}", exited=status is not None
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Milter:
    """A milter under test: one foreground process listening on a loopback port.

    Or, where the subclass allows it (``unix=True``), on a Unix socket in
    its directory, as Debian configures OpenDKIM.  Postfix's milter client
    does not set TCP_NODELAY and sends some packets that get no reply (the
    macros of a stage the milter does not take); over TCP its next packet
    then waits for the peer's delayed acknowledgement, about 40 ms on Linux
    loopback, twice a message with OpenDKIM.  Over a Unix socket nothing
    waits.
    """

    name = ""

    def __init__(self, directory: Path, *, unix: bool = False) -> None:
        self.directory = directory
        self.unix = unix
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"{self.name}.log"
        self.started_in = 0.0  # seconds from spawning to accepting

    @property
    def socket(self) -> str:
        """The milter's address in Postfix's smtpd_milters syntax."""
        if self.unix:
            return f"unix:{self.unix_path}"
        return f"inet:{LOOPBACK}:{self.port}"

    @property
    def unix_path(self) -> Path:
        return self.directory / f"{self.name}.sock"

    @property
    def listen(self) -> str:
        """The milter's own Socket setting (libmilter's syntax)."""
        if self.unix:
            return f"local:{self.unix_path}"
        return f"inet:{self.port}@[{LOOPBACK}]"

    def command(self) -> list[str]:
        raise NotImplementedError

    def configure(self) -> None:
        """Write the configuration files for ``self.port`` into ``self.directory``."""
        raise NotImplementedError

    def start(self) -> None:
        command = self.command()  # first: a missing program is MilterUnavailable
        self.directory.mkdir(parents=True, exist_ok=True)
        # The free port is the milter's to bind: another process may take it
        # first, and the milter exits.  A few fresh ports, then the error.
        attempts = 1 if self.unix else START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self.unix:
                self.port = free_port()
            self.configure()
            began = time.monotonic()
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    start_new_session=True,
                )
            address = self.unix_path if self.unix else self.port
            try:
                wait_accepting(address, self.process, self.log, self.name)
            except MilterDidNotStart as exc:
                self.process = None
                if not exc.exited or attempt == attempts:
                    raise
            else:
                self.started_in = time.monotonic() - began
                return

    def terminate(self) -> None:
        """Ask the milter to stop (SIGTERM) without waiting: :meth:`stop` reaps it.

        libmilter notices the signal at its listener's next poll, up to
        about five seconds later; several milters stopped one by one would
        wait for each in turn.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Milter:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _unbound_forwarding_to(resolver: str, path: Path) -> Path:
    """A libunbound configuration that asks only ``resolver`` ("host:port"), no DNSSEC.

    libunbound refuses to send queries to loopback addresses unless told
    (do-not-query-localhost), and forwards with recursion desired, which a
    small authoritative server answers all the same.  It answers names under
    the special-use domains of RFC 6761 (.test, .invalid, ...) itself, with
    NXDOMAIN, unless their local zones are turned off (nodefault): tests use
    those names.
    """
    host, port = resolver.rsplit(":", 1)
    path.write_text(
        f"""\
server:
    do-not-query-localhost: no
    verbosity: 0
    use-syslog: no
    chroot: ""
    qname-minimisation: no
    local-zone: "test." nodefault
    local-zone: "invalid." nodefault
forward-zone:
    name: "."
    forward-addr: {host}@{port}
"""
    )
    return path


class OpenDKIM(Milter):
    """OpenDKIM: Mode s signs mail from loopback clients with ``keys``; Mode v verifies.

    Signing: every key whose domain is the From: domain signs
    (MultipleSignatures).  The keys must share one algorithm: OpenDKIM 2.11
    has one SignatureAlgorithm for the whole instance (an Ed25519 key under
    rsa-sha256 fails with "EVP_PKEY_get1_RSA() failed" and a 451), so RSA and
    Ed25519 signatures take two instances, one after the other as milters.
    Verifying: keys are looked up through libunbound (Debian's OpenDKIM is
    built with it: ``opendkim -V`` lists USE_UNBOUND), given a configuration
    file (ResolverConfiguration) that forwards every query to ``resolver``,
    never to /etc/resolv.conf; the result is an Authentication-Results
    field of ``authserv_id``.
    """

    name = "opendkim"

    def __init__(
        self,
        directory: Path,
        *,
        mode: str,
        keys: Sequence[DkimKey] = (),
        resolver: str | None = None,
        authserv_id: str = "milter.test",
        unix: bool = False,
    ) -> None:
        super().__init__(directory, unix=unix)
        if mode not in ("s", "v"):
            raise ValueError(f"mode {mode!r}: s (sign) or v (verify)")
        if mode == "s" and not keys:
            raise ValueError("a signer needs keys")
        if len({key.algorithm for key in keys}) > 1:
            raise ValueError("one algorithm per OpenDKIM instance")
        self.mode = mode
        self.keys = list(keys)
        self.resolver = resolver
        self.authserv_id = authserv_id

    def command(self) -> list[str]:
        program = require("opendkim", "opendkim")
        return [program, "-f", "-x", str(self.directory / "opendkim.conf")]

    def configure(self) -> None:
        lines = [
            "Syslog no",
            "Background no",
            f"Mode {self.mode}",
            f"Socket {self.listen}",
            # A Unix socket Postfix's daemons (user postfix) may connect to.
            "UMask 0111",
            f"PidFile {self.directory}/opendkim.pid",
            f"AuthservID {self.authserv_id}",
            "Canonicalization relaxed/simple",
            # Keys made by root in a private directory: OpenDKIM's check of
            # the files' owner and mode would refuse nothing here.
            "RequireSafeKeys no",
            "DNSTimeout 5",
        ]
        if self.mode == "s":
            key_table = self.directory / "KeyTable"
            signing_table = self.directory / "SigningTable"
            key_table.write_text(
                "".join(
                    f"{key.selector}.{key.domain} {key.domain}:{key.selector}:{key.private_key}\n"
                    for key in self.keys
                )
            )
            signing_table.write_text(
                "".join(f"*@{key.domain} {key.selector}.{key.domain}\n" for key in self.keys)
            )
            lines += [
                f"KeyTable {key_table}",
                f"SigningTable refile:{signing_table}",
                "MultipleSignatures yes",
                f"SignatureAlgorithm {self.keys[0].algorithm}-sha256",
                # Mail from loopback is "ours": signed, as from a submission host.
                "InternalHosts 127.0.0.0/8",
            ]
        else:
            # No client is internal: mail from loopback is verified, not
            # taken as the host's own (the default InternalHosts is 127.0.0.1).
            lines.append("InternalHosts 192.0.2.1")
        if self.resolver is not None:
            unbound = _unbound_forwarding_to(self.resolver, self.directory / "unbound.conf")
            lines.append(f"ResolverConfiguration {unbound}")
        (self.directory / "opendkim.conf").write_text("\n".join(lines) + "\n")


class OpenDMARC(Milter):
    """OpenDMARC refusing DMARC failures under p=reject (RejectFailures), doing its own SPF.

    OpenDMARC asks the system's resolver (libresolv's res_query for DMARC
    records; libspf2, also over libresolv, for SPF): it has no option naming
    a nameserver, and libresolv reads /etc/resolv.conf, port 53 only.  So it
    runs in a mount namespace of its own (``unshare --mount``, root only)
    where a resolv.conf of ours, naming ``resolver_ip``, is bind-mounted over
    /etc/resolv.conf; the caller serves DNS on ``resolver_ip`` port 53 (a
    loopback address of its choosing, so that it collides with nothing).
    Nothing outside the namespace sees the bind mount.

    SPF is its own (SPFSelfValidate, SPFIgnoreResults: no upstream field is
    trusted); DKIM results come from an Authentication-Results field of
    ``authserv_id`` if an OpenDKIM before it added one.  No client is ignored
    (IgnoreHosts names only a TEST-NET address: the default is 127.0.0.1).
    """

    name = "opendmarc"

    def __init__(
        self, directory: Path, *, resolver_ip: str, authserv_id: str = "milter.test"
    ) -> None:
        super().__init__(directory)
        self.resolver_ip = resolver_ip
        self.authserv_id = authserv_id

    def command(self) -> list[str]:
        program = require("opendmarc", "opendmarc")
        unshare = require("unshare", "util-linux")
        mount = require("mount", "mount")
        resolv = self.directory / "resolv.conf"
        config = self.directory / "opendmarc.conf"
        # unshare execs (no fork) and the shell execs opendmarc: one process.
        script = f'{mount} --bind "$1" /etc/resolv.conf && exec {program} -f -c "$2"'
        return [
            *(unshare, "--mount", "--propagation", "private"),
            *("sh", "-c", script, "sh", str(resolv), str(config)),
        ]

    def configure(self) -> None:
        (self.directory / "resolv.conf").write_text(
            f"nameserver {self.resolver_ip}\noptions timeout:2 attempts:1\n"
        )
        ignore = self.directory / "ignore-hosts"
        ignore.write_text("192.0.2.1\n")
        (self.directory / "opendmarc.conf").write_text(
            f"""\
Syslog false
Background false
Socket {self.listen}
PidFile {self.directory}/opendmarc.pid
AuthservID {self.authserv_id}
TrustedAuthservIDs {self.authserv_id}
IgnoreHosts {ignore}
RejectFailures true
SPFSelfValidate true
SPFIgnoreResults true
RequiredHeaders false
FailureReports false
"""
        )


# A handful of top-level domains for rspamd's URL detector: its default list
# (about 9,600 suffixes) is compiled into a hyperscan database at every
# start, 10 to 15 seconds; these few take well under one.
RSPAMD_TLDS = ("com", "net", "org", "test", "example", "invalid")

# Modules that ask the Internet (DNS blocklists, fuzzy hashes, ASN, URL
# redirectors), need what a test has not got (Redis, trained networks) or
# would sign (dkim_signing: an MX filter's work is checking).  Those that
# need Redis disable themselves without it.  The maps some modules fetch
# from maps.rspamd.com fail at the loopback DNS server (NXDOMAIN).
RSPAMD_DISABLED = (
    "rbl",
    "fuzzy_check",
    "asn",
    "emails",
    "multimap",
    "phishing",
    "whitelist",
    "mx_check",
    "reputation",
    "neural",
    "url_redirector",
    "rspamd_update",
    "dkim_signing",
)


class Rspamd(Milter):
    """rspamd 3's proxy worker in milter mode, scanning itself (self_scan: no normal worker).

    Its configuration is Debian's modules and rules (/etc/rspamd/common.conf)
    under a top level of ours: one proxy worker on a loopback port, no
    controller, its database and run directories here, DNS from ``resolver``
    ("host:port") only, the modules that would ask the Internet disabled.
    milter_headers adds X-Spamd-Result, X-Rspamd-Server and
    X-Rspamd-Queue-Id to every message, from loopback clients too.  A
    message with the GTUBE test string is refused: ``554 5.7.1 Gtube
    pattern`` (:data:`GTUBE_REPLY`); other rejects get ``reject_message``.
    It runs as root (``-u root -g root -i``), its files being root's.
    """

    name = "rspamd"
    reject_message = "Spam message rejected"
    GTUBE_REPLY = (554, "5.7.1 Gtube pattern")

    def __init__(self, directory: Path, *, resolver: str) -> None:
        super().__init__(directory)
        self.resolver = resolver

    def command(self) -> list[str]:
        program = require("rspamd", "rspamd")
        top = self.directory
        return [
            program,
            "-f",
            "-u",
            "root",
            "-g",
            "root",
            "-i",
            "-c",
            str(top / "rspamd.conf"),
            f"--var=LOCAL_CONFDIR={top}",
            f"--var=DBDIR={top / 'db'}",
            f"--var=RUNDIR={top / 'run'}",
            f"--var=LOGDIR={top}",
        ]

    def configure(self) -> None:
        top = self.directory
        for name in ("db", "run", "local.d"):
            (top / name).mkdir(exist_ok=True)
        (top / "tld.dat").write_text("\n".join(RSPAMD_TLDS) + "\n")
        for module in RSPAMD_DISABLED:
            (top / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        (top / "local.d" / "milter_headers.conf").write_text(
            """\
use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id"];
skip_local = false;
skip_authenticated = false;
"""
        )
        (top / "rspamd.conf").write_text(
            f"""\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    filters = "chartable,dkim,regexp";
    url_tld = "{top / "tld.dat"}";
    # Regular expressions through PCRE: no hyperscan database to compile
    # in the background of every start.
    disable_hyperscan = true;
    dns {{
        nameserver = ["{self.resolver}"];
        timeout = 1s;
        retransmits = 1;
    }}
    local_addrs = [];
    task_timeout = 8s;
}}
logging {{
    type = "console";
    level = "notice";
}}
worker "rspamd_proxy" {{
    bind_socket = "{LOOPBACK}:{self.port}";
    milter = yes;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
    count = 1;
    timeout = 120s;
    reject_message = "{self.reject_message}";
}}
"""
        )


def loopback_address(seed: int) -> str:
    """A loopback address other than 127.0.0.1, picked from ``seed`` (e.g. a pid)."""
    return f"127.{53 + seed % 150}.{(seed >> 8) % 250 + 1}.{seed % 250 + 2}"


def have_namespaces() -> bool:
    """Whether this process may make a mount namespace (root, with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], check=False).returncode == 0
