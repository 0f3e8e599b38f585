"""Configuration: the embedded default, the search order, errors that say where."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mmdf_smtp.config import ConfigError, NextHop, find_config_path, load, parse, split_listen


def test_embedded_default_serves_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMDF_CONFIG", raising=False)
    monkeypatch.setattr("mmdf_smtp.config.DEFAULT_PATH", Path("/nonexistent/mmdf.toml"))
    config = load(None)
    assert config.source == "<embedded default>"
    assert config.smtpd.listen == ("127.0.0.1:2525",)
    assert config.smtpd.maxconnects == 4
    assert config.spool.name == "spool" and config.spool.parent.name == "var"
    assert config.channels["local"].relay is True
    assert "127.0.0.0/8" in config.channels["local"].hosts
    assert config.local_domains == ("localhost",)


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMDF_CONFIG", str(tmp_path / "env.toml"))
    assert find_config_path("given.toml") == Path("given.toml")
    assert find_config_path(None) == tmp_path / "env.toml"


def test_relative_paths_are_taken_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mmdf.toml"
    path.write_text(
        'spool = "q"\n[channels.x]\ntable = "t/hosts"\n[channels.y]\ntable = "nameserver"\n'
    )
    config = load(str(path))
    assert config.spool == tmp_path / "q"
    assert config.channels["x"].table == str(tmp_path / "t/hosts")
    assert config.channels["y"].table == "nameserver"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[limits]\nrecipients = "many"\n', "f.toml:2: limits.recipients: must be a whole number"),
        ("[limits]\nerrors = 0\n", "f.toml:2: limits.errors: must be at least 1"),
        ("\n[smtpd]\nmaxconnects = -1\n", "f.toml:3: smtpd.maxconnects: must be at least 1"),
        (
            '[smtpd]\nlisten = ["nowhere"]\n',
            "f.toml:2: smtpd.listen: 'nowhere': expected host:port",
        ),
        ("colour = 1\n", "f.toml:1: colour: unknown key"),
        ("[limits]\nsize = 1\n", "f.toml:2: limits.size: unknown key"),
        ('[tls]\ncertificate = "c.pem"\n', "f.toml: tls.key: is required when [tls] is present"),
        ("[channels.local]\nrelay = 1\n", "f.toml:2: channels.local.relay: must be true or false"),
        ('[channels.local]\nhosts = "x"\n', "f.toml:2: channels.local.hosts: must be a list"),
        ("[dns]\ntimeout = 0\n", "f.toml:2: dns.timeout: must be a positive number"),
        ("[dns]\ncache_size = -1\n", "f.toml:2: dns.cache_size: must be at least 0"),
        ("[smtpd]\nworkers = -1\n", "f.toml:2: smtpd.workers: must be at least 0"),
        ('[dns]\ncache_size = "big"\n', "f.toml:2: dns.cache_size: must be a whole number"),
        ("[limits]\nerror_delay = -1\n", "f.toml:2: limits.error_delay: must be a number"),
        (
            "[smtpd]\nrate_per_network = -5\n",
            "f.toml:2: smtpd.rate_per_network: must be at least 0",
        ),
        ("hostname = \n", "f.toml: Invalid value"),
    ],
)
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.toml", base=Path("/"))
    assert str(caught.value).startswith(message)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:25", ("127.0.0.1", 25)),
        ("[::1]:2525", ("::1", 2525)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_split_listen(text: str, expected: tuple[str, int]) -> None:
    assert split_listen(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "::1", "host:99999", ":25"])
def test_split_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        split_listen(text)


def test_the_door_defaults_and_keys(tmp_path: Path) -> None:
    default = parse("", "t.toml", base=tmp_path).limits
    assert (default.greet_pause, default.forbid_unauth_pipelining, default.allow_nul) == (
        0.0,
        True,
        False,
    )
    text = (
        "[smtpd]\ngreet_pause = 2.5\nforbid_unauth_pipelining = false\n"
        "[limits]\nallow_nul = true\nerrors = 7\n"
    )
    limits = parse(text, "t.toml", base=tmp_path).limits
    assert (limits.greet_pause, limits.forbid_unauth_pipelining, limits.allow_nul) == (
        2.5,
        False,
        True,
    )
    assert limits.errors == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[smtpd]\ngreet_pause = -1\n", "t.toml:2: smtpd.greet_pause: must be a number of seconds"),
        (
            '[smtpd]\nforbid_unauth_pipelining = "yes"\n',
            "t.toml:2: smtpd.forbid_unauth_pipelining: must be true or false",
        ),
        ("[limits]\nallow_nul = 1\n", "t.toml:2: limits.allow_nul: must be true or false"),
    ],
)
def test_the_door_keys_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(text, "t.toml", base=tmp_path)
    assert str(error.value) == message


def test_the_proxy_keys(tmp_path: Path) -> None:
    default = parse("", "t.toml", base=tmp_path).smtpd
    assert (default.proxy_protocol, default.proxy_from, default.proxy_timeout) == (
        False,
        (ipaddress.ip_network("127.0.0.1/32"),),
        5.0,
    )
    text = (
        '[smtpd]\nproxy_protocol = true\nproxy_from = ["10.0.0.0/8", "2001:db8::7"]\n'
        "proxy_timeout = 2.5\n"
    )
    smtpd = parse(text, "t.toml", base=tmp_path).smtpd
    assert (smtpd.proxy_protocol, smtpd.proxy_from, smtpd.proxy_timeout) == (
        True,
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::7/128")),
        2.5,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[smtpd]\nproxy_protocol = 1\n", "t.toml:2: smtpd.proxy_protocol: must be true or false"),
        (
            '[smtpd]\nproxy_from = "10.0.0.0/8"\n',
            "t.toml:2: smtpd.proxy_from: must be a list of strings",
        ),
        (
            '[smtpd]\nproxy_from = ["10.0.0.1/8"]\n',
            "t.toml:2: smtpd.proxy_from: '10.0.0.1/8': not a network: 10.0.0.1/8 has host bits set",
        ),
        (
            '[smtpd]\nproxy_from = ["balancer.example"]\n',
            "t.toml:2: smtpd.proxy_from: 'balancer.example': not a network: "
            "'balancer.example' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            "[smtpd]\nproxy_timeout = 0\n",
            "t.toml:2: smtpd.proxy_timeout: must be a positive number of seconds",
        ),
    ],
)
def test_the_proxy_keys_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(text, "t.toml", base=tmp_path)
    assert str(error.value) == message


def test_the_next_hops_tls_and_auth_keys(tmp_path: Path) -> None:
    path = tmp_path / "mmdf.toml"
    path.write_text('[deliver]\nnext_hop = "smtp:relay.test:587"\n')
    deliver = load(str(path)).deliver
    assert (deliver.tls, deliver.tls_level, deliver.tls_ca_file, deliver.tls_name) == (
        "may",
        "may",
        None,
        None,
    )
    assert (deliver.auth_user, deliver.auth_password_file) == (None, None)
    path.write_text(
        '[deliver]\nnext_hop = "smtp:relay.test:587"\ntls_ca_file = "ca.pem"\n'
        'tls_name = "mail.relay.test"\nauth_user = "me"\nauth_password_file = "relay.pw"\n'
    )
    deliver = load(str(path)).deliver
    # Credentials go over TLS only: auth_user makes "may" "encrypt".
    assert (deliver.tls, deliver.tls_level, deliver.tls_required_by) == (
        "may",
        "encrypt",
        "auth_user",
    )
    assert deliver.tls_ca_file == tmp_path / "ca.pem"
    assert deliver.auth_password_file == tmp_path / "relay.pw"
    assert (deliver.tls_name, deliver.auth_user) == ("mail.relay.test", "me")
    path.write_text('[deliver]\nnext_hop = "smtps:relay.test:465"\ntls = "verify"\n')
    deliver = load(str(path)).deliver
    assert deliver.next_hop == NextHop(protocol="smtps", host="relay.test", port=465)
    assert (deliver.tls_level, deliver.tls_required_by) == ("verify", "tls")
    path.write_text('[deliver]\nnext_hop = "smtps:relay.test:465"\n')
    assert (load(str(path)).deliver.tls_level, load(str(path)).deliver.tls_required_by) == (
        "encrypt",
        "smtps",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'tls = "required"\n',
            'f.toml:2: deliver.tls: must be "none", "may", "encrypt" or "verify"',
        ),
        ("tls = true\n", "f.toml:2: deliver.tls: must be a string"),
        (
            'next_hop = "lmtp:/run/dovecot/lmtp"\ntls = "encrypt"\n',
            'f.toml:3: deliver.tls: "encrypt" cannot be had over a Unix socket',
        ),
        (
            'next_hop = "smtps:relay.test:465"\ntls = "none"\n',
            'f.toml:3: deliver.tls: "none" contradicts an "smtps:" next_hop',
        ),
        ('tls_name = ""\n', "f.toml:2: deliver.tls_name: must not be empty"),
        ("tls_ca_file = 1\n", "f.toml:2: deliver.tls_ca_file: must be a string"),
        ('auth_user = "me"\n', "f.toml:2: deliver.auth_user: needs deliver.auth_password_file"),
        (
            'auth_password_file = "pw"\n',
            "f.toml:2: deliver.auth_password_file: needs deliver.auth_user",
        ),
        (
            'tls = "none"\nauth_user = "me"\nauth_password_file = "pw"\n',
            'f.toml:3: deliver.auth_user: needs TLS, and deliver.tls = "none" forbids it',
        ),
        (
            'next_hop = "lmtp:/run/lmtp"\nauth_user = "me"\nauth_password_file = "pw"\n',
            "f.toml:3: deliver.auth_user: needs TLS, which a Unix-socket next_hop cannot have",
        ),
        (
            'auth_user = ""\nauth_password_file = "pw"\n',
            "f.toml:2: deliver.auth_user: must be a printable, non-empty name",
        ),
        ('next_hop = "smtps:/run/socket"\n', "f.toml:2: deliver.next_hop: 'smtps:/run/socket'"),
    ],
)
def test_the_next_hops_tls_and_auth_keys_are_checked(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse("[deliver]\n" + text, "f.toml", base=Path("/"))
    assert str(caught.value).startswith(message)
