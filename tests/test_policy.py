"""Policy: host tables, the nameserver table (with our own DNS server), channels, relaying."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path as FilePath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsserver import Zone, dns_server
from mmdf_smtp.config import Config, ConfigError, parse
from mmdf_smtp.policy import Policy, UnknownChannel
from mmdf_smtp.policy.hosts import HostTable, build_table
from mmdf_smtp.protocol import Path
from strategies import ip_networks

ip = ipaddress.ip_address


def config(text: str, base: FilePath = FilePath("/")) -> Config:
    return parse(
        'hostname = "mx.example.org"\nlocal_domains = ["example.org"]\n' + text, "t", base=base
    )


# -- host tables ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "address", "name", "expected"),
    [
        (["Host.Example.ORG."], None, "host.example.org", True),
        (["host.example.org"], None, "HOST.example.org.", True),
        (["host.example.org"], None, "other.example.org", False),
        ([".example.org"], None, "deep.sub.example.org", True),
        ([".example.org"], None, "example.org", False),
        ([".example.org"], None, "badexample.org", False),
        (["192.0.2.7"], "192.0.2.7", None, True),
        (["192.0.2.7"], "192.0.2.8", None, False),
        (["192.0.2.0/24"], "192.0.2.200", None, True),
        (["192.0.2.0/24"], "192.0.3.1", None, False),
        (["127.0.0.0/8"], "::ffff:127.0.0.5", None, True),
        (["2001:db8::/32"], "2001:db8:1::1", None, True),
        (["::1"], "::1", None, True),
        (["::1"], "127.0.0.1", None, False),
        (["10.1.2.3/8"], "10.200.0.1", None, True),
    ],
)
def test_host_table_matching(
    entries: list[str], address: str | None, name: str | None, expected: bool
) -> None:
    table = build_table(entries, None, "test")
    assert table.matches(ip(address) if address else None, name) is expected


@pytest.mark.parametrize(
    "entry", ["300.1.1.1", "10.0.0.0/33", "1.2.3", "bad name", "-x.org", ":::"]
)
def test_bad_entries_are_config_errors(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"channels\.x\.hosts"):
        build_table([entry], None, "channels.x.hosts")


def test_table_file(tmp_path: FilePath) -> None:
    path = tmp_path / "internal"
    path.write_text(
        "# MMDF table\n"
        "\n"
        "gateway.example.org: 192.0.2.1   # name:value, as MMDF wrote them\n"
        "relay.example.org 192.0.2.2\n"
        "192.0.2.0/28\n"
        "2001:db8::1\n"
        ".lan\n"
    )
    table = build_table([], path, "x")
    assert table.names == {"gateway.example.org", "relay.example.org"}
    assert table.suffixes == {".lan"}
    assert table.matches(ip("192.0.2.15"), None)
    assert table.matches(ip("2001:db8::1"), None)
    assert table.matches(None, "printer.lan")
    assert not table.matches(ip("192.0.2.16"), "gateway.example.net")


def test_table_file_errors_name_the_line(tmp_path: FilePath) -> None:
    path = tmp_path / "bad"
    path.write_text("ok.example.org\n\n999.1.1.1/8\n")
    with pytest.raises(ConfigError, match=f"^{path}:3: '999.1.1.1/8' is not a valid"):
        build_table([], path, "x")
    with pytest.raises(ConfigError, match="cannot read table"):
        build_table([], tmp_path / "missing", "x")


@given(st.ip_addresses(v=4), st.integers(min_value=8, max_value=32), st.ip_addresses(v=4))
def test_any_address_in_a_network_matches_and_none_outside(
    base: ipaddress.IPv4Address, prefix: int, other: ipaddress.IPv4Address
) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    table = HostTable()
    table.add(str(network), "test")
    assert table.matches(base, None)
    assert table.matches(other, None) is (other in network)


labels = st.sampled_from(["a", "b", "example", "org", "mx", "c-d"])
host_names = st.lists(labels, min_size=1, max_size=4).map(".".join)


@given(
    st.lists(ip_networks, max_size=20),
    st.lists(host_names, max_size=5),
    st.lists(host_names.map(lambda name: "." + name), max_size=5),
    st.ip_addresses(),
    host_names,
)
def test_a_table_matches_as_a_scan_of_its_entries_would(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    names: list[str],
    suffixes: list[str],
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    name: str,
) -> None:
    table = HostTable()
    for entry in [*map(str, networks), *names, *suffixes]:
        table.add(entry, "test")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    by_address = any(n.version == address.version and address in n for n in networks)
    by_name = name in names or any(name.endswith(suffix) for suffix in suffixes)
    assert table.matches(address, None) is by_address
    assert table.matches(None, name) is by_name


# -- the nameserver table ---------------------------------------------------------


@pytest.fixture
def zone() -> Zone:
    z = Zone()
    # 127.0.0.10 forward-confirms as client.example.net
    z.add("10.0.0.127.in-addr.arpa", "PTR", "client.example.net.")
    z.add("client.example.net", "A", "127.0.0.10")
    # 127.0.0.11 has a PTR whose name does not point back
    z.add("11.0.0.127.in-addr.arpa", "PTR", "liar.example.net.")
    z.add("liar.example.net", "A", "127.0.0.99")
    # 127.0.0.12: the reverse zone fails
    z.servfail.add("12.0.0.127.in-addr.arpa")
    # 127.0.0.13: the reverse zone never answers
    z.silent.add("13.0.0.127.in-addr.arpa")
    # 127.0.0.14 is this very host, by name
    z.add("14.0.0.127.in-addr.arpa", "PTR", "mx.example.org.")
    z.add("mx.example.org", "A", "127.0.0.14")
    # 127.0.0.15: second PTR confirms
    z.add("15.0.0.127.in-addr.arpa", "PTR", "nope.example.net.", "two.example.net.")
    z.add("two.example.net", "A", "127.0.0.15")
    z.add(
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa",
        "PTR",
        "v6.example.net.",
    )
    z.add("v6.example.net", "AAAA", "::1")
    return z


@pytest.fixture
def dns_policy(zone: Zone) -> Iterator[Policy]:
    with dns_server(zone) as address:
        text = f"""
[dns]
nameservers = ["{address}"]
timeout = 0.5
[channels.local]
hosts = ["127.0.0.1"]
relay = true
[channels.smtp]
table = "nameserver"
[channels.other]
hosts = []
"""
        yield Policy(config(text))


@pytest.mark.parametrize(
    ("address", "channel", "name"),
    [
        ("127.0.0.10", "smtp", "client.example.net"),
        ("127.0.0.15", "smtp", "two.example.net"),
        ("::1", "smtp", "v6.example.net"),
        ("127.0.0.11", None, None),
        ("127.0.0.14", None, "mx.example.org"),
        ("127.0.0.20", None, None),
    ],
)
def test_nameserver_table(
    dns_policy: Policy, address: str, channel: str | None, name: str | None
) -> None:
    who = dns_policy.identify(["smtp"], ip(address), None, finicky=True, us="mx.example.org")
    assert (who.channel.name if who.channel else None) == channel
    assert who.client_name == name
    if channel is None:
        assert who.refusal is not None and who.refusal.code == 554


@pytest.mark.parametrize("address", ["127.0.0.12", "127.0.0.13"])
@pytest.mark.parametrize("finicky", [True, False])
def test_dns_failure_is_a_temporary_refusal(
    dns_policy: Policy, address: str, finicky: bool
) -> None:
    who = dns_policy.identify(
        ["smtp", "other"], ip(address), None, finicky=finicky, us="mx.example.org"
    )
    assert who.channel is None
    assert who.refusal is not None
    assert (who.refusal.code, who.refusal.enhanced) == (421, "4.4.3")
    assert who.refusal.text == (
        f"mx.example.org: Cannot resolve your address [{address}], try again later"
    )


def test_names_are_kept_for_their_time_to_live_and_failures_asked_again(
    dns_policy: Policy, zone: Zone
) -> None:
    for _ in range(2):
        for address in ("127.0.0.10", "127.0.0.12"):
            dns_policy.identify(["smtp"], ip(address), None, finicky=True, us="mx.example.org")
    asked = [
        zone.queries.count((name, kind))
        for name, kind in [
            ("10.0.0.127.in-addr.arpa", "PTR"),
            ("client.example.net", "A"),
            ("12.0.0.127.in-addr.arpa", "PTR"),  # SERVFAIL
        ]
    ]
    assert asked == [1, 1, 2]


def test_own_address_is_never_found_through_dns(dns_policy: Policy) -> None:
    who = dns_policy.identify(
        ["smtp"], ip("127.0.0.10"), None, finicky=True, us="mx", local_address=ip("127.0.0.10")
    )
    assert who.channel is None


def test_own_address_by_forward_lookup_of_our_name(zone: Zone) -> None:
    zone.add("16.0.0.127.in-addr.arpa", "PTR", "alias.example.net.")
    zone.add("alias.example.net", "A", "127.0.0.16")
    zone.add("mx.example.org", "A", "127.0.0.16")
    with dns_server(zone) as address:
        policy = Policy(
            config(f'[dns]\nnameservers = ["{address}"]\n[channels.smtp]\ntable = "nameserver"\n')
        )
        who = policy.identify(["smtp"], ip("127.0.0.16"), None, finicky=True, us="mx")
    assert who.channel is None


# -- channel choice ---------------------------------------------------------------


def test_first_channel_that_knows_the_client_wins(dns_policy: Policy, zone: Zone) -> None:
    who = dns_policy.identify(["local", "smtp"], ip("127.0.0.1"), None, finicky=True, us="mx")
    assert who.channel is not None and who.channel.name == "local"
    assert zone.queries == []  # no table needed a name: no DNS asked


def test_an_address_entry_decides_even_when_the_table_has_names_and_dns_fails(
    zone: Zone,
) -> None:
    with dns_server(zone) as address:
        text = (
            f'[dns]\nnameservers = ["{address}"]\ntimeout = 0.5\n'
            '[channels.local]\nhosts = ["localhost", "127.0.0.12"]\n'
        )
        policy = Policy(config(text))
        # 127.0.0.12's reverse zone fails: the address alone is enough.
        who = policy.identify(["local"], ip("127.0.0.12"), None, finicky=True, us="mx")
        assert who.channel is not None and who.channel.name == "local"
        assert who.refusal is None
        assert zone.queries == []


def test_without_dns_a_client_is_decided_or_left_for_a_thread(
    dns_policy: Policy, zone: Zone
) -> None:
    known = dns_policy.identify(
        ["local", "smtp"], ip("127.0.0.1"), None, finicky=True, us="mx", dns=False
    )
    assert known is not None and known.channel is not None and known.channel.name == "local"
    # The nameserver table would need a look-up: no decision, and no query.
    assert (
        dns_policy.identify(
            ["local", "smtp"], ip("127.0.0.10"), None, finicky=True, us="mx", dns=False
        )
        is None
    )
    assert zone.queries == []
    who = dns_policy.identify(["local", "smtp"], ip("127.0.0.10"), None, finicky=True, us="mx")
    assert who is not None and who.channel is not None and who.channel.name == "smtp"


def test_unknown_client_gets_the_last_channel_unless_finicky(dns_policy: Policy) -> None:
    who = dns_policy.identify(["local", "other"], ip("127.0.0.50"), None, finicky=False, us="mx")
    assert who.channel is not None and who.channel.name == "other"
    assert who.refusal is None
    who = dns_policy.identify(["local", "other"], ip("127.0.0.50"), None, finicky=True, us="mx")
    assert who.channel is None
    assert who.refusal is not None
    assert (who.refusal.code, who.refusal.enhanced, who.refusal.text) == (
        554,
        "5.7.1",
        "mx: Your name, '[127.0.0.50]', is unknown to us.",
    )


def test_a_given_name_is_matched_without_dns(zone: Zone) -> None:
    with dns_server(zone) as address:
        text = (
            f'[dns]\nnameservers = ["{address}"]\n[channels.internal]\nhosts = [".corp.example"]\n'
        )
        policy = Policy(config(text))
        who = policy.identify(
            ["internal"], ip("127.0.0.77"), "pc.corp.example", finicky=True, us="mx"
        )
        assert who.channel is not None and who.client_name == "pc.corp.example"
        assert zone.queries == []
        # Without a name, the name-type table makes the policy ask DNS once.
        who = policy.identify(["internal"], ip("127.0.0.10"), None, finicky=True, us="mx")
        assert who.channel is None
        assert zone.queries == [("10.0.0.127.in-addr.arpa", "PTR"), ("client.example.net", "A")]


def test_unknown_channel_names() -> None:
    policy = Policy(config("[channels.local]\nhosts = []\n"))
    with pytest.raises(UnknownChannel, match="'nosuch'"):
        policy.check_channels(["local", "nosuch"])
    policy.check_channels(["local"])


# -- recipients -------------------------------------------------------------------


@pytest.fixture
def recipients_policy(tmp_path: FilePath) -> Policy:
    aliases = tmp_path / "aliases"
    aliases.write_text("# aliases(5)\nStaff: alice,\n   bob   # continued\nabuse: root\n")
    text = f"""
[channels.local]
relay = true
[channels.smtp]
table = "nameserver"
[local]
users = ["Alice", "bob"]
aliases = "{aliases}"
"""
    return Policy(config(text))


@pytest.mark.parametrize(
    ("channel", "recipient", "code"),
    [
        ("smtp", Path(local="alice", domain="example.org"), None),
        ("smtp", Path(local="ALICE", domain="Example.ORG."), None),
        ("smtp", Path(local='"bob"', domain="example.org"), None),
        ("smtp", Path(local="staff", domain="example.org"), None),
        ("smtp", Path(local="abuse", domain="example.org"), None),
        ("smtp", Path(local="postmaster", domain="example.org"), None),
        ("smtp", Path(local="Postmaster", domain=""), None),
        ("smtp", Path(local="carol", domain="example.org"), (550, "5.1.1")),
        ("smtp", Path(local="alice", domain="elsewhere.example"), (550, "5.7.1")),
        ("smtp", Path(local="alice", domain="[192.0.2.1]"), (550, "5.7.1")),
        ("local", Path(local="anyone", domain="elsewhere.example"), None),
        ("local", Path(local="carol", domain="example.org"), (550, "5.1.1")),
    ],
)
def test_recipients(
    recipients_policy: Policy, channel: str, recipient: Path, code: tuple[int, str] | None
) -> None:
    reply = recipients_policy.check_recipient(recipients_policy.config.channels[channel], recipient)
    assert (None if reply is None else (reply.code, reply.enhanced)) == code


def test_relay_refusal_names_the_domain(recipients_policy: Policy) -> None:
    reply = recipients_policy.check_recipient(
        recipients_policy.config.channels["smtp"], Path(local="x", domain="elsewhere.example")
    )
    assert reply is not None and reply.text == "Relaying denied for elsewhere.example"


def test_aliases_errors_name_the_line(tmp_path: FilePath) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("ok: a\nbroken line\n")
    with pytest.raises(ConfigError, match=f"^{aliases}:2: expected 'name: target"):
        Policy(config(f'[local]\naliases = "{aliases}"\n'))


# -- the clients access table by name ----------------------------------------------


def test_clients_access_table_by_verified_name(zone: Zone, tmp_path: FilePath) -> None:
    """A name entry matches the client's forward-confirmed name only, and
    the most specific entry wins; a client whose name cannot be had now is
    matched by nothing but its address."""
    table = tmp_path / "clients"
    table.write_text(
        "client.example.net   REJECT Not you\n"
        ".example.net         HOLD Looked at first\n"
        "127.0.0.13           OK\n"
    )
    with dns_server(zone) as address:
        policy = Policy(
            config(
                f"""
[dns]
nameservers = ["{address}"]
timeout = 0.5
[channels.smtp]
hosts = ["127.0.0.0/8"]
[access]
clients = "{table}"
"""
            ),
            access=True,
        )

        def verdict(client: str) -> tuple[int | None, str | None, bool]:
            who = policy.identify(["smtp"], ip(client), None, finicky=True, us="mx.example.org")
            assert who.channel is not None and who.refusal is None
            reply = who.access.reply
            return (reply.code if reply else None, who.access.hold, who.trusted)

        assert verdict("127.0.0.10") == (554, None, False)  # client.example.net, at the greeting
        assert verdict("127.0.0.15") == (None, "Looked at first", False)  # two.example.net
        assert verdict("127.0.0.11") == (None, None, False)  # liar.example.net: not confirmed
        assert verdict("127.0.0.12") == (None, None, False)  # SERVFAIL: no name to match
        assert verdict("127.0.0.13") == (None, None, True)  # by address, DNS never asked
    assert ("13.0.0.127.in-addr.arpa", "PTR") not in zone.queries
    reply = policy.identify(["smtp"], ip("127.0.0.10"), None, finicky=True, us="mx").access.reply
    assert reply is not None and (reply.enhanced, reply.text) == ("5.7.1", "Not you")
