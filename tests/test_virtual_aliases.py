"""Per-domain keys in the aliases file: ``name@domain`` and the ``@domain`` catch-all.

The parser and the lookup order in-process (with properties), then over
the wire: smtpd's RCPT replies, its commit-time Maildir copies, and
deliver's for mail that goes through the queue.
"""

from __future__ import annotations

import signal
import smtplib
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmdf_smtp.config import ConfigError, load
from mmdf_smtp.policy import Policy
from mmdf_smtp.policy.aliases import Aliases, Destination, Found, Kind, parse_aliases
from mmdf_smtp.protocol import Path as SmtpPath
from test_access import smtpd_start
from test_deliver_wire import BODY, maildir_messages, run_deliver
from test_deliver_wire import configure as configure_deliver
from test_local_commit import LF_BODY, SENDER, stored_as
from wire import daemon, queued

DOMAINS = ("example.org", "example.net", "localhost")
USERS = ("alice", "bob", "carol")
TABLE = """\
staff: alice, bob
info@example.org: bob
info@Example.NET.: carol
@example.net: alice
sales@example.org: sales@example.net
sales@example.net: carol, bob
loop@example.org: loop@example.net
loop@example.net: loop@example.org
bob@example.org: bob@example.org, far@relay.test
"""


def aliases(text: str = TABLE, *, users: tuple[str, ...] = USERS) -> Aliases:
    return Aliases(
        parse_aliases(text, "aliases", DOMAINS),
        users=users,
        local_domains=DOMAINS,
        default_domain="example.org",
        delimiters="+",
    )


# -- the parser ---------------------------------------------------------------


def test_address_and_catch_all_keys_are_parsed_in_lower_case() -> None:
    table = parse_aliases(
        'Info@Example.ORG: Bob\n@EXAMPLE.net: carol,\n  alice\n"x.y"@example.org: bob\n',
        "aliases",
        DOMAINS,
    )
    assert table == {
        "info@example.org": ("Bob",),
        "@example.net": ("carol", "alice"),
        "x.y@example.org": ("bob",),
    }


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("info@elsewhere.test: bob", "'elsewhere.test' is not one of local_domains"),
        ("@elsewhere.test: bob", "'elsewhere.test' is not one of local_domains"),
        ("info@: bob", "expected 'name@domain: target' or '@domain: target'"),
        ("@: bob", "expected 'name@domain: target' or '@domain: target'"),
        ("info @example.org: bob", "expected 'name: target, target'"),
    ],
)
def test_a_bad_key_names_file_and_line(line: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_aliases(f"# aliases\nstaff: alice\n{line}\n", "/etc/mmdf/aliases", DOMAINS)
    assert str(raised.value).startswith("/etc/mmdf/aliases:3: ")
    assert problem in str(raised.value)


@given(st.text(alphabet=string.printable + "é\u2028\x0b", max_size=200))
def test_parsing_raises_nothing_but_config_error(text: str) -> None:
    try:
        table = parse_aliases(text, "aliases", DOMAINS)
    except ConfigError:
        return
    for key in table:
        if "@" in key:
            assert key.rpartition("@")[2] in DOMAINS


# -- the lookup order ---------------------------------------------------------


def test_the_most_specific_key_wins() -> None:
    table = aliases(
        "info+tag@example.org: a1\ninfo@example.org: a2\ninfo+tag: a3\ninfo: a4\n"
        "@example.org: a5\nalice@example.org: a6\n"
    )
    assert table.find("info+tag@example.org") == Found(
        Kind.ADDRESS, "info+tag@example.org", ("a1",)
    )
    assert table.find("INFO+other@Example.Org.") == Found(Kind.ADDRESS, "info@example.org", ("a2",))
    assert table.find("info+tag@localhost") == Found(Kind.NAME, "info+tag", ("a3",))
    assert table.find("info+x@localhost") == Found(Kind.NAME, "info", ("a4",))
    # A user outranks the catch-all; the user's own address key outranks the user.
    assert table.find("bob+x@example.org") == Found(Kind.USER, "bob")
    assert table.find("alice@example.org") == Found(Kind.ADDRESS, "alice@example.org", ("a6",))
    assert table.find("postmaster@example.org") == Found(Kind.USER, "postmaster")
    assert table.find("nobody@example.org") == Found(Kind.CATCH_ALL, "@example.org", ("a5",))
    assert table.find("nobody@localhost") is None
    # A bare name is a classic name alone: no catch-all covers it.
    assert table.find("nobody") is None


KEY_LOCALS = ("info", "info+tag", "bob", "bob+tag", "postmaster", "x")


@st.composite
def tables(draw: st.DrawFn) -> dict[str, tuple[str, ...]]:
    keys = [*KEY_LOCALS]
    keys += [f"{local}@{domain}" for local in KEY_LOCALS for domain in DOMAINS]
    keys += [f"@{domain}" for domain in DOMAINS]
    chosen = draw(st.sets(st.sampled_from(keys)))
    return {key: (f"target-of-{key}",) for key in chosen}


@given(
    tables(),
    st.sampled_from((*KEY_LOCALS, "info+other", "nobody", "bob+x+y")),
    st.sampled_from(DOMAINS),
    st.sets(st.sampled_from(("info", "bob"))),
)
def test_the_key_chosen_is_the_most_specific_present(
    table: dict[str, tuple[str, ...]], local: str, domain: str, users: set[str]
) -> None:
    base = local.split("+", 1)[0]
    order: list[tuple[Kind, str]] = [
        (Kind.ADDRESS, f"{local}@{domain}"),
        (Kind.ADDRESS, f"{base}@{domain}"),
        (Kind.NAME, local),
        (Kind.USER, local),
        (Kind.NAME, base),
        (Kind.USER, base),
        (Kind.CATCH_ALL, f"@{domain}"),
    ]
    everyone = users | {"postmaster"}
    present = [
        (kind, key)
        for kind, key in order
        if (key in everyone if kind is Kind.USER else key in table)
    ]
    found = Aliases(
        table, users=users, local_domains=DOMAINS, default_domain="example.org", delimiters="+"
    ).find(f"{local.upper()}@{domain.upper()}.")
    if not present:
        assert found is None
    else:
        assert found is not None
        assert (found.kind, found.key) == present[0]
        assert found.targets == table.get(found.key, ())


# -- expansion ----------------------------------------------------------------


def test_expansion_through_address_keys() -> None:
    table = aliases()
    # Delivered-To names the address an alias led to, as for classic names.
    assert table.expand("info@example.org") == [Destination("bob@example.org", "bob")]
    assert table.expand("info@example.net") == [Destination("carol@example.org", "carol")]
    assert table.expand("Info+Tag@example.org") == [Destination("bob@example.org", "bob")]
    # A user's own address keeps the address as given, extension and all.
    assert table.expand("Carol+Tag@example.net") == [Destination("carol+tag@example.net", "carol")]
    assert table.expand("anything@example.net") == [Destination("alice@example.org", "alice")]
    # A user outranks the catch-all; postmaster is always one.
    assert table.expand("bob@example.net") == [Destination("bob@example.net", "bob")]
    assert table.expand("postmaster@example.net") == [
        Destination("postmaster@example.net", "postmaster")
    ]
    # A target at a local domain is looked up again; a bare name is a
    # classic name (bob, not the key bob@example.org).
    assert table.expand("sales@example.org") == [
        Destination("carol@example.org", "carol"),
        Destination("bob@example.org", "bob"),
    ]
    # An address key that names itself keeps the user's copy.
    assert table.expand("bob@example.org") == [
        Destination("bob@example.org", "bob"),
        Destination("far@relay.test"),
    ]
    assert table.expand("loop@example.org") == [
        Destination(
            "loop@example.org",
            problem="5.4.6 Alias loop: loop@example.org -> loop@example.net -> loop@example.org",
        )
    ]
    # No catch-all at example.org, and a bare name never reaches one.
    assert table.expand("nobody@example.org") == [
        Destination("nobody@example.org", problem="5.1.1 No such user here")
    ]
    assert aliases("staff: nobody\n@example.org: alice\n").expand("staff@example.net") == [
        Destination("nobody@example.org", problem="5.1.1 No such user here")
    ]


def test_an_explicit_postmaster_entry_outranks_postmaster() -> None:
    table = aliases("postmaster@example.net: carol\n@example.net: alice\n")
    assert table.expand("postmaster@example.net") == [Destination("carol@example.org", "carol")]
    assert table.expand("postmaster@example.org") == [
        Destination("postmaster@example.org", "postmaster")
    ]


def test_a_catch_all_that_comes_back_to_itself_is_a_loop() -> None:
    [found] = aliases("@example.net: ghost@example.net\n").expand("x@example.net")
    assert found.problem == "5.4.6 Alias loop: @example.net -> @example.net"


def test_nesting_through_address_keys_is_bounded() -> None:
    text = "".join(f"a{i}@example.org: a{i + 1}@example.org\n" for i in range(30))
    [found] = aliases(text).expand("a0@example.org")
    assert found.problem == "5.4.6 Alias nesting too deep at a20@example.org"


# -- RCPT time ----------------------------------------------------------------


def configure(directory: Path, *, at_commit: bool = True, table: str = TABLE) -> Path:
    """The wire tests' configuration with example.net local and carol a user."""
    path = configure_deliver(directory, at_commit=at_commit)
    (directory / "aliases").write_text(table)
    text = path.read_text()
    for old, new in (
        ('local_domains = ["example.org", "localhost"]', f"local_domains = {list(DOMAINS)}"),
        ('users = ["alice", "bob"]', f"users = {list(USERS)}"),
    ):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text.replace("'", '"'))
    return path


@pytest.mark.parametrize(
    ("recipient", "code"),
    [
        ("info@example.org", None),
        ("info+tag@example.net", None),
        ("anything@example.net", None),
        ("postmaster@example.net", None),
        ("nobody@example.org", "550 5.1.1"),
        ("nobody@localhost", "550 5.1.1"),
        ("nobody", "550 5.7.1"),
        ("info", "550 5.7.1"),
        ("postmaster", None),
    ],
)
def test_rcpt_time_asks_the_same_lookup(tmp_path: Path, recipient: str, code: str | None) -> None:
    policy = Policy(load(str(configure(tmp_path))))
    local, _, domain = recipient.partition("@")
    path = SmtpPath(local=local, domain=domain)
    reply = policy.check_recipient(policy.config.channels["smtp"], path)
    if code is None:
        assert reply is None
    else:
        assert reply is not None and f"{reply.code} {reply.enhanced}" == code, reply


# -- over the wire ------------------------------------------------------------


def rcpt_replies(port: int, recipients: list[str]) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        return [client.rcpt(recipient) for recipient in recipients]


def send(port: int, recipient: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(recipient)[0] == 250
        code, text = client.data(BODY)
    assert code == 250, text
    return text.decode().rsplit("(", 1)[1].rstrip(")")


def only_copy(directory: Path, user: str) -> bytes:
    [message] = maildir_messages(directory, user).values()
    return message


def check_copies(directory: Path, queue_ids: dict[str, str]) -> None:
    """What the messages to RECIPIENTS (queued as ``queue_ids``) left in the Maildirs."""
    copies = {
        (user, key.split(".")[1]): message
        for user in ("alice", "bob", "carol", "postmaster")
        for key, message in maildir_messages(directory, user).items()
    }
    expected = {
        # recipient: the mailbox and the Delivered-To of its copy
        "info@example.org": ("bob", "bob@example.org"),
        "info+tag@example.org": ("bob", "bob@example.org"),
        "info@example.net": ("carol", "carol@example.org"),
        "anything@example.net": ("alice", "alice@example.org"),
        "postmaster@example.net": ("postmaster", "postmaster@example.net"),
        "carol+tag@example.net": ("carol", "carol+tag@example.net"),
    }
    assert sorted(copies) == sorted(
        (user, f"M{queue_ids[recipient]}R0") for recipient, (user, _) in expected.items()
    )
    for recipient, (user, delivered_to) in expected.items():
        assert stored_as(copies[user, f"M{queue_ids[recipient]}R0"], delivered_to) == LF_BODY


RECIPIENTS = [
    "info@example.org",
    "info+tag@example.org",
    "info@example.net",
    "anything@example.net",
    "postmaster@example.net",
    "carol+tag@example.net",
]


def test_rcpt_replies_over_the_wire(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with daemon(config) as server:
        replies = rcpt_replies(
            server.port, [*RECIPIENTS, "whoever@Example.NET", "nobody@example.org"]
        )
    assert [code for code, _ in replies] == [250] * 7 + [550]
    assert replies[-1][1].startswith(b"5.1.1 ")


def test_commit_time_delivery_through_address_keys(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with daemon(config) as server:
        queue_ids = {recipient: send(server.port, recipient) for recipient in RECIPIENTS}
        # Every copy written at commit time: nothing waits for deliver.
        assert queued(config) == []
    check_copies(tmp_path, queue_ids)


def test_deliver_expands_address_keys(tmp_path: Path) -> None:
    config = configure(tmp_path, at_commit=False)
    with daemon(config) as server:
        queue_ids = {recipient: send(server.port, recipient) for recipient in RECIPIENTS}
        assert len(queued(config)) == len(RECIPIENTS)
    delivered = run_deliver(config, "--once")
    assert delivered.stderr.count(b"status=delivered") == len(RECIPIENTS), delivered.stderr
    assert b"to=<alice@example.org> orig_to=<anything@example.net>" in delivered.stderr
    assert queued(config) == []
    check_copies(tmp_path, queue_ids)


def test_a_loop_through_address_keys_bounces(tmp_path: Path) -> None:
    config = configure(tmp_path)
    with daemon(config) as server:
        queue_id = send(server.port, "loop@example.org")
        # Not for a Maildir: left to deliver, which reports it.
        [shown] = queued(config)
        assert shown["id"] == queue_id
    result = run_deliver(config, "--once")
    loop = "5.4.6 Alias loop: loop@example.org -> loop@example.net -> loop@example.org"
    [line] = [x for x in result.stderr.decode().splitlines() if "to=<loop@example.org>" in x]
    assert f"id={queue_id} " in line and "status=bounced" in line, line
    assert f"(550 {loop})" in line
    # The sender's notice: the sender is at example.net, so its catch-all has it.
    assert queued(config) == []
    [notice] = maildir_messages(tmp_path, "alice").values()
    assert b"Content-Type: multipart/report" in notice
    assert loop.encode() in notice


def test_a_key_for_a_domain_not_local_stops_smtpd(tmp_path: Path) -> None:
    config = configure(tmp_path, table="staff: alice\ninfo@elsewhere.test: bob\n")
    result = smtpd_start(config)
    assert result.returncode == 78, result.stderr
    assert f"{tmp_path / 'aliases'}:2: 'elsewhere.test' is not one of local_domains" in (
        result.stderr
    )


def test_sighup_picks_up_a_new_catch_all(tmp_path: Path) -> None:
    config = configure(tmp_path, table="staff: alice\n")
    with daemon(config) as server:
        [(code, _)] = rcpt_replies(server.port, ["whoever@example.net"])
        assert code == 550
        (tmp_path / "aliases").write_text("staff: alice\n@example.net: carol\n")
        server.process.send_signal(signal.SIGHUP)
        server.log_lines("configuration reloaded")
        server.log_lines(" started, pid ", server.workers)
        [(code, _)] = rcpt_replies(server.port, ["whoever@example.net"])
        assert code == 250
        send(server.port, "whoever@example.net")
    assert stored_as(only_copy(tmp_path, "carol"), "carol@example.org") == LF_BODY
