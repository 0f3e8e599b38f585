"""The TOML configuration: found, read, checked, and turned into typed values.

Every error names the file, the line (when the key can be found in it) and
the key, and the commands exit with EX_CONFIG (78) on it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .checks.config import AuthConfig, DnsblConfig
from .milter.config import MilterConfig
from .protocol.limits import Limits

DEFAULT_PATH = Path("/etc/mmdf/mmdf.toml")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
EMBEDDED = "<embedded default>"


class ConfigError(Exception):
    """A configuration that cannot be used; the text says where and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpdConfig:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    maxconnects: int = 4
    workers: int = 0  # processes serving sessions; 0: one per core
    max_per_client: int = 0  # sessions at once from one address; 0: no limit
    max_per_network: int = 0  # from one /24 or /64
    rate_per_client: int = 0  # new connections a minute from one address
    rate_per_network: int = 0  # from one /24 or /64
    # Each connection opens with a PROXY header (HAProxy's v1 or v2) naming
    # the client, accepted only from proxy_from and within proxy_timeout.
    proxy_protocol: bool = False
    proxy_from: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.1/32"),)
    proxy_timeout: float = 5.0  # seconds; Postfix's smtpd_upstream_proxy_timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    certificate: Path
    key: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()  # "host" or "host:port"; empty: the system resolver
    timeout: float = 10.0  # seconds for one whole look-up
    cache_size: int = 1_000  # answers kept for their TTL, in each process; 0: none


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelConfig:
    name: str
    hosts: tuple[str, ...] = ()
    table: str | None = None  # a file path, or "nameserver"
    relay: bool = False
    checks: bool = True  # false: trusted hosts, whose mail skips blocklists, [auth] and milters


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalConfig:
    users: tuple[str, ...] = ()
    aliases: Path | None = None
    maildir: str = "/var/mail/{user}/Maildir"
    # smtpd's commit process writes the Maildir copies of a message for
    # local mailboxes only, instead of queueing it for deliver (the spool only).
    deliver_at_commit: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class NextHop:
    """Where non-local mail goes: ``lmtp:host:port``, ``lmtp:/socket``,
    ``smtp:host:port`` or ``smtps:host:port`` (SMTP in TLS from the first
    octet, RFC 8314 3.3)."""

    protocol: str  # "lmtp", "smtp" or "smtps"
    host: str  # a host name, an address, or (LMTP only) the path of a Unix socket
    port: int  # 0 for a Unix socket


# [deliver] tls, Postfix's smtp_tls_security_level's names, weakest first.
TLS_LEVELS = ("none", "may", "encrypt", "verify")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverConfig:
    next_hop: NextHop | None = None
    queue_lifetime: int = 432_000  # seconds from arrival before a temporary failure bounces
    retry_min: int = 60  # seconds before the first retry; doubled at each one
    retry_max: int = 3600  # the longest wait between two tries
    # Each character ends a local part's own name: "alice+tag" is alice's
    # (Postfix's recipient_delimiter, several characters allowed); "": none.
    recipient_delimiter: str = "+"
    delay_warning: int = 0  # seconds from arrival before a delay notice; 0: none
    concurrency: int = 20  # deliveries under way at once
    # Of those, the most to the next hop at once (Postfix's
    # default_destination_concurrency_limit): the rest stay free for local
    # mail, so a slow or dead hop never holds it up.
    destination_concurrency_limit: int = 10
    # A connection to the next hop is kept for the next message this long
    # when idle (Postfix's smtp_connection_cache_time_limit), and carries
    # at most this many messages (smtp_connection_reuse_count_limit).
    connection_cache_time: float = 2.0
    connection_reuse_limit: int = 100
    # TLS to the next hop, one of TLS_LEVELS; auth_user and an smtps hop
    # make it at least "encrypt" (see tls_required_by).
    tls: str = "may"
    tls_ca_file: Path | None = None  # the CAs "verify" trusts; None: the system's
    tls_name: str | None = None  # the name "verify" checks; None: the next hop's host
    # SMTP AUTH (RFC 4954) to the next hop; the password is read from its
    # own file by deliver, so that the configuration holds no secret.
    auth_user: str | None = None
    auth_password_file: Path | None = None

    @property
    def tls_level(self) -> str:
        """The level in force: ``tls``, raised to "encrypt" where credentials
        go or the hop speaks TLS from the start."""
        if self.tls in ("none", "may") and self.tls_required_by != "tls":
            return "encrypt"
        return self.tls

    @property
    def tls_required_by(self) -> str:
        """What asks for the level in force: "tls", "auth_user" or "smtps"."""
        if self.tls in ("encrypt", "verify"):
            return "tls"
        if self.auth_user is not None:
            return "auth_user"
        if self.next_hop is not None and self.next_hop.protocol == "smtps":
            return "smtps"
        return "tls"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessConfig:
    """The access tables' files (see :mod:`mmdf_smtp.policy.access`); None: no table."""

    clients: Path | None = None
    senders: Path | None = None
    recipients: Path | None = None


QUEUE_BACKENDS = ("spool", "postgresql")


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """Where messages lie once answered 250: the spool directory (``spool``,
    the default), or a PostgreSQL database that several hosts share."""

    backend: str = "spool"  # one of QUEUE_BACKENDS
    dsn: str | None = None  # libpq's connection string; required by "postgresql"
    # How long a deliverer's claim on a message lives unrenewed: a deliverer
    # that died holds its messages this long.  The same on every node.
    lease_seconds: int = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """Where Prometheus scrapes ``/metrics``; None: not served (nothing is counted)."""

    listen: str | None = None  # smtpd's supervisor: every worker's counts, and deliver's
    deliver_listen: str | None = None  # deliver's own, for a deliver without smtpd

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.deliver_listen is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    source: str  # the file it came from, or EMBEDDED
    hostname: str
    spool: Path
    local_domains: tuple[str, ...] = ()
    user: str | None = None
    log: str = "stderr"  # "stderr", "syslog", or "syslog:/path/of/the/socket"
    log_format: str = "text"  # or "json": one object a line
    smtpd: SmtpdConfig = field(default_factory=SmtpdConfig)
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig | None = None
    dns: DnsConfig = field(default_factory=DnsConfig)
    channels: Mapping[str, ChannelConfig] = field(default_factory=dict)
    local: LocalConfig = field(default_factory=LocalConfig)
    deliver: DeliverConfig = field(default_factory=DeliverConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    auth: AuthConfig | None = None  # the built-in checks at SMTP time; None: none
    milters: tuple[MilterConfig, ...] = ()  # in the order they are asked
    dnsbl: DnsblConfig | None = None  # the blocklists asked at connect; None: none
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)

    @property
    def filters(self) -> bool:
        """Whether any filter is configured (a channel may still skip them)."""
        return bool(self.auth or self.milters or (self.dnsbl and self.dnsbl.sites))


_DOOR_KEYS = {"greet_pause", "forbid_unauth_pipelining"}
_HOP_SECURITY_KEYS = {"tls", "tls_ca_file", "tls_name", "auth_user", "auth_password_file"}


def find_config_path(explicit: str | None) -> Path | None:
    """``-c PATH``, else ``$MMDF_CONFIG``, else /etc/mmdf/mmdf.toml, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MMDF_CONFIG")
    if env:
        return Path(env)
    if DEFAULT_PATH.exists():
        return DEFAULT_PATH
    return None


def load(explicit: str | None = None) -> Config:
    path = find_config_path(explicit)
    if path is None:
        text = resources.files("mmdf_smtp").joinpath("default.toml").read_text()
        return parse(text, EMBEDDED, base=_default_base())
    return parse(read_text(path, "configuration"), str(path), base=path.parent)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file the configuration names; ConfigError when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8: {exc}") from exc


def key_error(config: Config, dotted: str, problem: str) -> ConfigError:
    """An error about what a key names (a file that cannot be used), found
    after parsing: named as a parsing error is, with the key's line."""
    text = ""
    if config.source != EMBEDDED:
        # Changed or gone since: the file and the key are still named.
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(config.source).read_text(encoding="utf-8")
    return _Reader(text, config.source, Path(config.source).parent).error(dotted, problem)


def _default_base() -> Path:
    """Where the embedded default puts its spool: the checkout's var/.

    The embedded configuration is for trying the software out, so its spool
    lies beside the source (``var/`` at the repository root) when running
    from a checkout, else under the current directory.
    """
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "src").is_dir():
            return parent
    return Path.cwd()


def parse(text: str, source: str, *, base: Path) -> Config:
    """Parse configuration ``text``; relative paths are taken from ``base``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return _Reader(text, source, base).config(data)


_KEY_LINE = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=")
_TABLE_LINE = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")


class _Reader:
    def __init__(self, text: str, source: str, base: Path) -> None:
        self._text = text
        self._source = source
        self._base = base

    def _line_of(self, dotted: str) -> int | None:
        """The line where ``dotted`` (``table.key``) is set, if it can be found."""
        *tables, key = dotted.split(".")
        want = ".".join(tables)
        current = ""
        for number, line in enumerate(self._text.splitlines(), 1):
            if table := _TABLE_LINE.match(line):
                current = table.group(1).replace('"', "").replace(" ", "")
                continue
            found = _KEY_LINE.match(line)
            if found and current == want and found.group(1) == key:
                return number
        return None

    def error(self, dotted: str, problem: str) -> ConfigError:
        line = self._line_of(dotted)
        where = f"{self._source}:{line}" if line else self._source
        return ConfigError(f"{where}: {dotted}: {problem}")

    def _table(self, data: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        for unknown in sorted(set(value) - allowed):
            raise self.error(f"{key}.{unknown}", "unknown key")
        return value

    def _str(self, data: Mapping[str, Any], dotted: str, default: str | None) -> str | None:
        value = data.get(dotted.rsplit(".", 1)[-1], default)
        if value is not None and not isinstance(value, str):
            raise self.error(dotted, "must be a string")
        return value

    def _int(self, data: Mapping[str, Any], dotted: str, default: int, minimum: int) -> int:
        value = data.get(dotted.rsplit(".", 1)[-1], default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(dotted, "must be a whole number")
        if value < minimum:
            raise self.error(dotted, f"must be at least {minimum}")
        return value

    def _seconds(
        self, data: Mapping[str, Any], dotted: str, default: float, *, zero: bool
    ) -> float:
        """A number of seconds; 0 allowed only where it means "none"."""
        value = data.get(dotted.rsplit(".", 1)[-1], default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.error(dotted, "must be a number of seconds")
        if value == 0 and not zero:
            raise self.error(dotted, "must be a positive number of seconds")
        return float(value)

    def _bool(self, data: Mapping[str, Any], dotted: str, default: bool) -> bool:
        value = data.get(dotted.rsplit(".", 1)[-1], default)
        if not isinstance(value, bool):
            raise self.error(dotted, "must be true or false")
        return value

    def _strings(self, data: Mapping[str, Any], dotted: str) -> tuple[str, ...]:
        value = data.get(dotted.rsplit(".", 1)[-1], [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(dotted, "must be a list of strings")
        return tuple(value)

    def _path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self._base / path

    def config(self, data: dict[str, Any]) -> Config:
        top = {"hostname", "spool", "local_domains", "user", "log", "log_format"}
        tables = {"smtpd", "limits", "tls", "dns", "channels", "local", "deliver"}
        tables |= {"auth", "milters", "dnsbl", "metrics", "queue", "access"}
        for unknown in sorted(set(data) - top - tables):
            raise self.error(unknown, "unknown key")
        hostname = self._str(data, "hostname", None) or socket.getfqdn()
        spool = self._str(data, "spool", "var/spool")
        user = self._str(data, "user", None)
        log = self._str(data, "log", "stderr") or "stderr"
        if log not in ("stderr", "syslog") and not log.startswith("syslog:/"):
            raise self.error("log", 'must be "stderr", "syslog" or "syslog:/path/to/socket"')
        log_format = self._str(data, "log_format", "text")
        if log_format not in ("text", "json"):
            raise self.error("log_format", 'must be "text" or "json"')
        domains = tuple(d.lower().rstrip(".") for d in self._strings(data, "local_domains"))
        return Config(
            source=self._source,
            hostname=hostname,
            spool=self._path(spool or "var/spool"),
            local_domains=domains,
            user=user,
            log=log,
            log_format=log_format or "text",
            smtpd=self._smtpd(data),
            limits=self._door(data, self._limits(data)),
            tls=self._tls(data),
            dns=self._dns(data),
            channels=self._channels(data),
            local=self._local(data),
            deliver=self._deliver(data),
            queue=self._queue(data),
            auth=self._auth(data, hostname),
            milters=self._milters(data),
            dnsbl=self._dnsbl(data),
            metrics=self._metrics(data),
            access=self._access(data),
        )

    def _access(self, data: Mapping[str, Any]) -> AccessConfig:
        t = self._table(data, "access", {"clients", "senders", "recipients"})
        paths = {}
        for key in ("clients", "senders", "recipients"):
            text = self._str(t, f"access.{key}", None)
            if text is not None and not text.strip():
                raise self.error(f"access.{key}", "must be the path of a table file")
            paths[key] = self._path(text) if text else None
        return AccessConfig(**paths)

    def _queue(self, data: Mapping[str, Any]) -> QueueConfig:
        t = self._table(data, "queue", {"backend", "dsn", "lease_seconds"})
        backend = self._str(t, "queue.backend", "spool")
        if backend is None or backend not in QUEUE_BACKENDS:
            raise self.error("queue.backend", 'must be "spool" or "postgresql"')
        dsn = self._str(t, "queue.dsn", None)
        if dsn is not None and not dsn.strip():
            raise self.error("queue.dsn", "must not be empty")
        if backend == "postgresql" and dsn is None:
            raise self.error(
                "queue.backend",
                '"postgresql" needs queue.dsn, the database\'s connection string '
                '(e.g. "postgresql://mmdf@127.0.0.1:5432/mmdf")',
            )
        lease_seconds = self._int(t, "queue.lease_seconds", 300, 1)
        return QueueConfig(backend=backend, dsn=dsn, lease_seconds=lease_seconds)

    def _metrics(self, data: Mapping[str, Any]) -> MetricsConfig:
        t = self._table(data, "metrics", {"listen", "deliver_listen"})
        addresses = {}
        for key in ("listen", "deliver_listen"):
            address = self._str(t, f"metrics.{key}", None)
            if address is not None:
                try:
                    split_listen(address)
                except ValueError as exc:
                    raise self.error(f"metrics.{key}", str(exc)) from exc
            addresses[key] = address
        return MetricsConfig(**addresses)

    def _auth(self, data: Mapping[str, Any], hostname: str) -> AuthConfig | None:
        if "auth" not in data:
            return None
        table = data["auth"]
        if not isinstance(table, dict):
            raise self.error("auth", "must be a table")
        try:
            return AuthConfig.from_table(table, hostname=hostname)
        except ValueError as exc:
            raise self._checked_error("auth", table, exc) from exc

    def _milters(self, data: Mapping[str, Any]) -> tuple[MilterConfig, ...]:
        tables = data.get("milters", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise self.error("milters", "must be an array of tables: [[milters]]")
        milters = []
        for table in tables:
            try:
                milters.append(MilterConfig.from_table(table))
            except ValueError as exc:
                raise self._checked_error("milters", table, exc) from exc
        return tuple(milters)

    def _dnsbl(self, data: Mapping[str, Any]) -> DnsblConfig | None:
        if "dnsbl" not in data:
            return None
        table = data["dnsbl"]
        if not isinstance(table, dict):
            raise self.error("dnsbl", "must be a table")
        try:
            return DnsblConfig.from_table(table)
        except ValueError as exc:
            raise self._checked_error("dnsbl", table, exc) from exc

    def _checked_error(self, name: str, table: Mapping[str, Any], exc: ValueError) -> ConfigError:
        """A table's own check failed: name the key it names, and its line."""
        text = str(exc)
        named = [key for key in table if key in text]
        key = f"{name}.{max(named, key=len)}" if named else name
        return self.error(key, text)

    def _smtpd(self, data: Mapping[str, Any]) -> SmtpdConfig:
        counts = {"max_per_client", "max_per_network", "rate_per_client", "rate_per_network"}
        proxy = {"proxy_protocol", "proxy_from", "proxy_timeout"}
        keys = {"listen", "maxconnects", "workers", *counts, *_DOOR_KEYS, *proxy}
        t = self._table(data, "smtpd", keys)
        listen = self._strings(t, "smtpd.listen") if "listen" in t else SmtpdConfig().listen
        for address in listen:
            try:
                split_listen(address)
            except ValueError as exc:
                raise self.error("smtpd.listen", str(exc)) from exc
        return SmtpdConfig(
            listen=listen,
            maxconnects=self._int(t, "smtpd.maxconnects", 4, 1),
            workers=self._int(t, "smtpd.workers", 0, 0),
            **{key: self._int(t, f"smtpd.{key}", 0, 0) for key in sorted(counts)},
            proxy_protocol=self._bool(t, "smtpd.proxy_protocol", False),
            proxy_from=self._networks(t, "smtpd.proxy_from", SmtpdConfig().proxy_from),
            proxy_timeout=self._seconds(
                t, "smtpd.proxy_timeout", SmtpdConfig().proxy_timeout, zero=False
            ),
        )

    def _networks(
        self, data: Mapping[str, Any], dotted: str, default: tuple[IPNetwork, ...]
    ) -> tuple[IPNetwork, ...]:
        """Networks as ``192.0.2.0/24``, ``2001:db8::/32`` or a bare address."""
        if dotted.rsplit(".", 1)[-1] not in data:
            return default
        networks = []
        for text in self._strings(data, dotted):
            try:
                networks.append(ipaddress.ip_network(text))
            except ValueError as exc:
                raise self.error(dotted, f"{text!r}: not a network: {exc}") from exc
        return tuple(networks)

    def _door(self, data: Mapping[str, Any], limits: Limits) -> Limits:
        """[smtpd]'s rules for clients at the door: the core enforces them, with the limits."""
        t = data.get("smtpd", {})
        return replace(
            limits,
            greet_pause=self._seconds(t, "smtpd.greet_pause", limits.greet_pause, zero=True),
            forbid_unauth_pipelining=self._bool(
                t, "smtpd.forbid_unauth_pipelining", limits.forbid_unauth_pipelining
            ),
        )

    def _limits(self, data: Mapping[str, Any]) -> Limits:
        t = self._table(
            data,
            "limits",
            {
                "message_size",
                "recipients",
                "command_timeout",
                "data_timeout",
                "errors",
                "errors_before_delay",
                "error_delay",
                "allow_nul",
            },
        )
        d = Limits()
        return Limits(
            message_size=self._int(t, "limits.message_size", d.message_size, 0),
            recipients=self._int(t, "limits.recipients", d.recipients, 1),
            command_timeout=self._int(t, "limits.command_timeout", int(d.command_timeout), 1),
            data_timeout=self._int(t, "limits.data_timeout", int(d.data_timeout), 1),
            errors=self._int(t, "limits.errors", d.errors, 1),
            errors_before_delay=self._int(
                t, "limits.errors_before_delay", d.errors_before_delay, 0
            ),
            error_delay=self._seconds(t, "limits.error_delay", d.error_delay, zero=True),
            allow_nul=self._bool(t, "limits.allow_nul", d.allow_nul),
        )

    def _tls(self, data: Mapping[str, Any]) -> TlsConfig | None:
        if "tls" not in data:
            return None
        t = self._table(data, "tls", {"certificate", "key"})
        cert = self._str(t, "tls.certificate", None)
        key = self._str(t, "tls.key", None)
        if not cert:
            raise self.error("tls.certificate", "is required when [tls] is present")
        if not key:
            raise self.error("tls.key", "is required when [tls] is present")
        return TlsConfig(certificate=self._path(cert), key=self._path(key))

    def _dns(self, data: Mapping[str, Any]) -> DnsConfig:
        t = self._table(data, "dns", {"nameservers", "timeout", "cache_size"})
        servers = self._strings(t, "dns.nameservers")
        for server in servers:
            try:
                split_listen(server, default_port=53)
            except ValueError as exc:
                raise self.error("dns.nameservers", str(exc)) from exc
        timeout = self._seconds(t, "dns.timeout", DnsConfig().timeout, zero=False)
        cache_size = self._int(t, "dns.cache_size", DnsConfig().cache_size, 0)
        return DnsConfig(nameservers=servers, timeout=timeout, cache_size=cache_size)

    def _channels(self, data: Mapping[str, Any]) -> dict[str, ChannelConfig]:
        t = self._table(data, "channels", set(data.get("channels", {})))
        channels: dict[str, ChannelConfig] = {}
        for name, body in t.items():
            if not isinstance(body, dict):
                raise self.error(f"channels.{name}", "must be a table")
            prefix = f"channels.{name}"
            for unknown in sorted(set(body) - {"hosts", "table", "relay", "checks"}):
                raise self.error(f"{prefix}.{unknown}", "unknown key")
            table = self._str(body, f"{prefix}.table", None)
            if table is not None and table != "nameserver":
                table = str(self._path(table))
            channels[name] = ChannelConfig(
                name=name,
                hosts=self._strings(body, f"{prefix}.hosts"),
                table=table,
                relay=self._bool(body, f"{prefix}.relay", False),
                checks=self._bool(body, f"{prefix}.checks", True),
            )
        return channels

    def _local(self, data: Mapping[str, Any]) -> LocalConfig:
        t = self._table(data, "local", {"users", "aliases", "maildir", "deliver_at_commit"})
        aliases = self._str(t, "local.aliases", None)
        maildir = self._str(t, "local.maildir", LocalConfig().maildir) or LocalConfig().maildir
        return LocalConfig(
            users=tuple(u.lower() for u in self._strings(t, "local.users")),
            aliases=self._path(aliases) if aliases else None,
            maildir=str(self._path(maildir)),
            deliver_at_commit=self._bool(t, "local.deliver_at_commit", True),
        )

    def _deliver(self, data: Mapping[str, Any]) -> DeliverConfig:
        t = self._table(
            data,
            "deliver",
            {
                "next_hop",
                "queue_lifetime",
                "retry_min",
                "retry_max",
                "recipient_delimiter",
                "delay_warning",
                "concurrency",
                "destination_concurrency_limit",
                "connection_cache_time",
                "connection_reuse_limit",
                *_HOP_SECURITY_KEYS,
            },
        )
        next_hop = self._str(t, "deliver.next_hop", None)
        retry_min = self._int(t, "deliver.retry_min", 60, 1)
        retry_max = self._int(t, "deliver.retry_max", 3600, 1)
        if retry_max < retry_min:
            raise self.error("deliver.retry_max", f"must be at least retry_min ({retry_min})")
        try:
            hop = parse_next_hop(next_hop) if next_hop else None
        except ValueError as exc:
            raise self.error("deliver.next_hop", str(exc)) from exc
        return DeliverConfig(
            next_hop=hop,
            queue_lifetime=self._int(t, "deliver.queue_lifetime", 432_000, 1),
            retry_min=retry_min,
            retry_max=retry_max,
            recipient_delimiter=self._delimiter(t),
            delay_warning=self._int(t, "deliver.delay_warning", 0, 0),
            concurrency=self._int(t, "deliver.concurrency", 20, 1),
            destination_concurrency_limit=self._int(
                t, "deliver.destination_concurrency_limit", 10, 1
            ),
            connection_cache_time=self._seconds(t, "deliver.connection_cache_time", 2.0, zero=True),
            connection_reuse_limit=self._int(t, "deliver.connection_reuse_limit", 100, 1),
            **self._hop_security(t, hop),
        )

    def _hop_security(self, data: Mapping[str, Any], hop: NextHop | None) -> dict[str, Any]:
        """[deliver]'s TLS and AUTH keys, checked against each other and the hop."""
        tls = self._str(data, "deliver.tls", "may")
        if tls not in TLS_LEVELS:
            raise self.error("deliver.tls", 'must be "none", "may", "encrypt" or "verify"')
        unix_socket = hop is not None and hop.port == 0
        if unix_socket and tls in ("encrypt", "verify"):
            raise self.error(
                "deliver.tls", f'"{tls}" cannot be had over a Unix socket (next_hop "lmtp:/...")'
            )
        if hop is not None and hop.protocol == "smtps" and tls == "none":
            raise self.error("deliver.tls", '"none" contradicts an "smtps:" next_hop')
        ca_file = self._str(data, "deliver.tls_ca_file", None)
        name = self._str(data, "deliver.tls_name", None)
        for key, value in (("tls_ca_file", ca_file), ("tls_name", name)):
            if value is not None and not value.strip():
                raise self.error(f"deliver.{key}", "must not be empty")
        user = self._str(data, "deliver.auth_user", None)
        password_file = self._str(data, "deliver.auth_password_file", None)
        if user is not None:
            if not user or any(not c.isprintable() for c in user):
                raise self.error("deliver.auth_user", "must be a printable, non-empty name")
            if password_file is None:
                raise self.error("deliver.auth_user", "needs deliver.auth_password_file")
            # Credentials go over TLS only (RFC 4954 4, RFC 4616 4).
            if tls == "none":
                raise self.error(
                    "deliver.auth_user", 'needs TLS, and deliver.tls = "none" forbids it'
                )
            if unix_socket:
                raise self.error(
                    "deliver.auth_user", "needs TLS, which a Unix-socket next_hop cannot have"
                )
        elif password_file is not None:
            raise self.error("deliver.auth_password_file", "needs deliver.auth_user")
        return {
            "tls": tls,
            "tls_ca_file": self._path(ca_file) if ca_file else None,
            "tls_name": name,
            "auth_user": user,
            "auth_password_file": self._path(password_file) if password_file else None,
        }

    def _delimiter(self, data: Mapping[str, Any]) -> str:
        value = self._str(data, "deliver.recipient_delimiter", "+") or ""
        if any(c in value for c in '@" \t\\') or not value.isascii() or not value.isprintable():
            raise self.error(
                "deliver.recipient_delimiter", "must be printable ASCII, without @, quote or space"
            )
        return value


def parse_next_hop(text: str) -> NextHop:
    """``lmtp:host:port``, ``lmtp:/path/to/socket``, ``smtp:host:port`` or ``smtps:host:port``."""
    protocol, _, rest = text.partition(":")
    expected = (
        'expected "lmtp:host:port", "lmtp:/path/to/socket", "smtp:host:port" or "smtps:host:port"'
    )
    if protocol not in ("lmtp", "smtp", "smtps") or not rest:
        raise ValueError(f"{text!r}: {expected}")
    if protocol == "lmtp" and rest.startswith("/"):
        return NextHop(protocol=protocol, host=rest, port=0)
    try:
        host, port = split_listen(rest)
    except ValueError:
        raise ValueError(f"{text!r}: {expected}") from None
    return NextHop(protocol=protocol, host=host, port=port)


def split_listen(address: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif not sep or ":" in host:
        if default_port is None:
            raise ValueError(f"{address!r}: expected host:port or [ipv6]:port")
        host, port = address.strip("[]"), str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{address!r}: expected host:port or [ipv6]:port")
    return host, int(port)
