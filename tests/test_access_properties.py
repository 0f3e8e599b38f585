"""Properties of the access tables' parser and look-ups (hypothesis)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.config import ConfigError
from mmdf_smtp.policy.access import (
    Action,
    Stage,
    parse_action,
    parse_address_table,
    parse_client_table,
)
from strategies import ip_networks

WHERE = "/etc/mmdf/access"

words = st.sampled_from(
    ["OK", "REJECT", "DEFER", "HOLD", "DISCARD", "reject", "550", "450 4.7.1", "554 5.1.2",
     "250", "FROB", "<>", "@", ".", "example.com", ".example.com", "a@", "a@b.example",
     "10.0.0.0/8", "::1", "300.1.1.1", "#", "text", "5.7.1", "a b"]
)  # fmt: skip
lines = st.one_of(
    st.text(max_size=60),
    st.lists(words, max_size=5).map(" ".join),
)


@given(lines, st.booleans())
def test_any_line_is_an_entry_or_refused_with_its_place(line: str, senders: bool) -> None:
    for parse in (
        lambda: parse_address_table({7: line}, WHERE, senders=senders),
        lambda: parse_client_table({7: line}, WHERE),
    ):
        try:
            parse()
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(f"{WHERE}:7: ") and len(message) > len(WHERE) + 4


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
local_part = st.from_regex(r"[a-z0-9][a-z0-9._]{0,8}", fullmatch=True)


@given(
    local_part,
    st.lists(label, min_size=2, max_size=5),
    st.sets(st.integers(min_value=0, max_value=7)),
    st.booleans(),
)
def test_the_most_specific_sender_entry_wins(
    local: str, labels: list[str], levels: set[int], upper: bool
) -> None:
    """Levels: 0 the address, 1 the domain, 2.. each parent (.parent) nearest
    first, 7 the local part (user@); a level beyond the parents is left out."""
    domain = ".".join(labels)
    parents = [".".join(labels[i:]) for i in range(1, len(labels))]
    keys = {0: f"{local}@{domain}", 1: domain, 7: f"{local}@"}
    keys |= {2 + i: f".{parent}" for i, parent in enumerate(parents)}
    present = sorted(level for level in levels if level in keys)
    text = "\n".join(f"{keys[level]} REJECT level {level}" for level in present)
    table = parse_address_table(dict(enumerate(text.splitlines(), 1)), WHERE, senders=True)
    address = f"{local}@{domain}"
    entry = table.lookup(address.upper() if upper else address, "+")
    if not present:
        assert entry is None
    else:
        assert entry is not None and entry.text == f"level {present[0]}"
        # The extension is looked through: "local+tag" finds the same entry.
        tagged = table.lookup(f"{local}+tag@{domain}", "+")
        assert tagged is not None and tagged.text == entry.text


@given(st.lists(ip_networks, max_size=30), st.ip_addresses())
def test_networks_are_found_as_a_scan_of_them_would(
    table_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    lines = {i: f"{network} REJECT {i}" for i, network in enumerate(table_networks, 1)}
    table = parse_client_table(lines, WHERE)
    entry = table.by_address(address)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    holding = [
        (network.prefixlen, i)
        for i, network in enumerate(table_networks, 1)
        if network.version == address.version and address in network
    ]
    if not holding:
        assert entry is None
        return
    longest = max(length for length, _ in holding)
    # Of the same network written twice, the later line, as for any key.
    last = max(i for length, i in holding if length == longest)
    assert entry is not None and entry.text == str(last)


@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.sets(st.integers(min_value=0, max_value=32), min_size=1),
    st.booleans(),
)
def test_the_longest_network_wins(number: int, prefixes: set[int], exact: bool) -> None:
    address = ipaddress.IPv4Address(number)
    lines = {}
    for i, prefix in enumerate(sorted(prefixes), 1):
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        lines[i] = f"{network} REJECT prefix {prefix}"
    if exact:
        lines[0] = f"{address} DEFER the address"
    table = parse_client_table(lines, WHERE)
    entry = table.by_address(address)
    assert entry is not None
    assert entry.text == ("the address" if exact else f"prefix {max(prefixes)}")
    # An IPv4-mapped IPv6 address (a dual-stack socket's view) is the same client.
    assert table.by_address(ipaddress.IPv6Address(f"::ffff:{address}")) == entry


@given(
    st.sampled_from(["REJECT", "DEFER", "HOLD", "DISCARD"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
)
def test_actions_keep_their_text(name: str, text: str) -> None:
    entry = parse_action(f"{name} {text}")
    assert entry.action is Action(name) and entry.text == text


@pytest.mark.parametrize(
    ("words", "stage", "reply"),
    [
        ("REJECT", Stage.SENDER, "550 5.7.1 Sender address rejected: Access denied"),
        ("DEFER", Stage.RECIPIENT, "450 4.7.1 Recipient address deferred: Try again later"),
        ("REJECT", Stage.CLIENT, "554 5.7.1 Client host rejected: Access denied"),
        ("451 Later", Stage.CLIENT, "421 4.7.1 Later"),
        ("553 5.1.8 Bad domain", Stage.SENDER, "553 5.1.8 Bad domain"),
        ("452 Full", Stage.RECIPIENT, "452 4.7.1 Full"),
    ],
)
def test_replies(words: str, stage: Stage, reply: str) -> None:
    verdict = parse_action(words).verdict(stage)
    assert verdict.reply is not None and verdict.reply.lines() == [reply]
    assert verdict.reason == "access"


def test_ok_goes_on() -> None:
    verdict = parse_action("OK").verdict(Stage.SENDER)
    assert verdict.reply is None and not verdict.discard and verdict.hold is None


# A name all of digits and dots is refused: it would read as an address.
host_label = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(host_label, min_size=2, max_size=5), st.sets(st.integers(0, 4)))
def test_the_nearest_client_name_wins(labels: list[str], levels: set[int]) -> None:
    """Level 0: the name itself; 1..: ``.parent``, the nearest first."""
    name = ".".join(labels)
    keys = {0: name} | {i: "." + ".".join(labels[i:]) for i in range(1, len(labels))}
    present = sorted(level for level in levels if level in keys)
    table = parse_client_table(
        {n: f"{keys[level]} REJECT level {level}" for n, level in enumerate(present, 1)}, WHERE
    )
    entry = table.by_name(name.upper() + ".")
    if not present:
        assert entry is None
    else:
        assert entry is not None and entry.text == f"level {present[0]}"
