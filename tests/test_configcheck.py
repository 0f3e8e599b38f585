"""``smtpd -t`` and ``deliver -t``: the configuration checked before a restart.

Each error is shown to be the start's own: the same command line without
``-t`` is run too, and must fail with the same status and the same words.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from wire import PYTHON, certificate, env, write_config

SMTPD = [PYTHON, "-m", "mmdf_smtp.cli.smtpd"]
DELIVER = [PYTHON, "-m", "mmdf_smtp.cli.deliver"]
EX_USAGE, EX_OSERR, EX_CONFIG = 64, 71, 78


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def smtpd(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    flag = ["-t"] if check else []
    return run([*SMTPD, *flag, "-c", str(config), *(args or ("smtpsrvr", "local,smtp"))])


def deliver(config: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    # --once: a start that got past the configuration would make one pass and exit.
    return run([*DELIVER, "-c", str(config), *(["-t"] if check else ["--once"])])


def test_smtpd_t_says_ok_without_listening_or_making_the_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        checked = smtpd(config)
        assert (checked.returncode, checked.stdout, checked.stderr) == (
            0,
            f"smtpd: configuration OK ({config})\n",
            "",
        )
        # What would have happened, had it tried to listen.
        started = smtpd(config, check=False)
        assert started.returncode == EX_OSERR, started.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in started.stderr
    assert not (tmp_path / "spool").exists()
    with socket.create_server(("127.0.0.1", port)):
        pass  # free: the check left nothing behind


def test_smtpd_t_takes_every_form(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert smtpd(config, "7f000001.25").stdout == f"smtpd: configuration OK ({config})\n"
    embedded = run([*SMTPD, "-t", "smtpsrvr", "local", "2525", "4", "127.0.0.1"])
    assert (embedded.returncode, embedded.stdout) == (
        0,
        "smtpd: configuration OK (embedded default)\n",
    )
    forty_one = run([*SMTPD, "-t", "-d", "smtpsrvr", "local", "2525", "4", "127.0.0.1"])
    assert forty_one.returncode == EX_USAGE
    assert "takes no options but -t" in forty_one.stderr
    bad_listen = smtpd(config, "-l", "nowhere", "smtpsrvr", "local")
    assert bad_listen.returncode == EX_USAGE
    assert "argument -l/--listen: 'nowhere': expected host:port" in bad_listen.stderr
    assert not (tmp_path / "spool").exists()


# Each makes a change to write_config's configuration, whose last table is [local].
Edit = Callable[[Path, str], str]


def appended(text: str) -> Edit:
    return lambda _, config: config + text


def with_proxy(_: Path, config: str) -> str:
    return config.replace("[smtpd]\n", "[smtpd]\nproxy_protocol = true\n")


def mismatched(directory: Path, config: str) -> str:
    ca = trustme.CA()
    cert, _ = certificate(ca, directory)
    other = directory / "other"
    other.mkdir()
    _, key = certificate(ca, other)
    return config + f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'


def missing_key(directory: Path, config: str) -> str:
    cert, key = certificate(trustme.CA(), directory)
    key.unlink()
    return config + f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'


def bad_aliases(directory: Path, config: str) -> str:
    (directory / "aliases").write_text("staff: alice, bob\nno colon here\n")
    return config + f'aliases = "{directory / "aliases"}"\n'


def bad_access(directory: Path, config: str) -> str:
    (directory / "senders").write_text("fine.example OK\nthird.example FROB\n")
    return config + f'[access]\nsenders = "{directory / "senders"}"\n'


@pytest.mark.parametrize(
    ("edit", "args", "status", "words"),
    [
        (appended("[smtpd\n"), (), EX_CONFIG, "mmdf.toml: "),
        (appended("frobnicate = 1\n"), (), EX_CONFIG, ":24: local.frobnicate: unknown key"),
        (bad_aliases, (), EX_CONFIG, "aliases:2: expected 'name: target, target'"),
        (bad_access, (), EX_CONFIG, "senders:2: "),
        (mismatched, (), EX_CONFIG, "[tls]: cannot load certificate"),
        (missing_key, (), EX_CONFIG, "No such file or directory"),
        (appended(""), ("smtpsrvr", "local,nosuch"), EX_USAGE, "unknown channel 'nosuch'"),
        (appended(""), ("/nonexistent/srvr", "local"), EX_USAGE, "not an executable program"),
        (
            with_proxy,
            ("/bin/cat", "local"),
            EX_CONFIG,
            "smtpd.proxy_protocol: needs the in-process server",
        ),
        (
            with_proxy,
            ("7f000001.25",),
            EX_CONFIG,
            "smtpd.proxy_protocol: read by the listening daemon only",
        ),
    ],
    ids=[
        "toml-syntax",
        "unknown-key",
        "aliases-line",
        "access-line",
        "key-mismatch",
        "missing-key",
        "unknown-channel",
        "no-smtpsrvr",
        "proxy-external",
        "proxy-inetd",
    ],
)
def test_smtpd_t_fails_as_the_start_does(
    tmp_path: Path, edit: Edit, args: tuple[str, ...], status: int, words: str
) -> None:
    config = write_config(tmp_path)
    config.write_text(edit(tmp_path, config.read_text()))
    checked = smtpd(config, *args)
    assert (checked.returncode, checked.stdout) == (status, "")
    assert words in checked.stderr, checked.stderr
    if args == ("7f000001.25",):
        # The start would serve its stdin; its refusal is the same as under inetd.
        ours, theirs = socket.socketpair()
        with ours, theirs:
            started = subprocess.run(
                [*SMTPD, "-c", str(config), *args],
                stdin=theirs,
                stdout=theirs,
                stderr=subprocess.PIPE,
                text=True,
                env=env(),
                timeout=60,
                check=False,
            )
    else:
        started = smtpd(config, *args, check=False)
    assert (started.returncode, started.stderr) == (status, checked.stderr)
    assert not (tmp_path / "spool").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root becomes the configured user")
def test_smtpd_t_as_root_refuses_a_user_that_cannot_be_become(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('user = "nobody"', 'user = "root"'))
    checked = smtpd(config)
    assert checked.returncode == EX_CONFIG
    assert checked.stderr == (
        f"smtpd: {config}: user: 'root' is root; the mail system never runs as root\n"
    )
    started = smtpd(config, check=False)
    assert (started.returncode, started.stderr) == (EX_CONFIG, checked.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="root's own file")
def test_smtpd_t_as_root_reads_a_key_only_root_may_read(tmp_path: Path) -> None:
    cert, key = certificate(trustme.CA(), tmp_path)
    key.chmod(0o600)
    os.chown(key, 0, 0)
    config = write_config(tmp_path, tls=(cert, key))
    checked = smtpd(config)
    assert (checked.returncode, checked.stdout) == (0, f"smtpd: configuration OK ({config})\n")


def test_deliver_t_says_ok_without_making_the_spool(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("secret\n")
    config = write_config(
        tmp_path,
        f'[deliver]\nnext_hop = "smtp:[127.0.0.1]:2525"\nauth_user = "u"\n'
        f'auth_password_file = "{tmp_path / "password"}"\n',
    )
    checked = deliver(config)
    assert (checked.returncode, checked.stdout, checked.stderr) == (
        0,
        f"deliver: configuration OK ({config})\n",
        "",
    )
    assert not (tmp_path / "spool").exists()
    both = run([*DELIVER, "-t", "--once", "-c", str(config)])
    assert both.returncode == EX_USAGE
    assert "no --once nor --flush" in both.stderr


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            '[deliver]\nauth_user = "u"\nauth_password_file = "{d}/absent"\n',
            "deliver.auth_password_file: {d}/absent: cannot read: No such file or directory",
        ),
        ('[deliver]\ntls = "sometimes"\n', "deliver.tls: "),
        (
            '[deliver]\ntls = "verify"\ntls_ca_file = "{d}/absent"\n',
            "deliver.tls_ca_file: {d}/absent: cannot load the CAs",
        ),
        ('aliases = "{d}/aliases"\n', "aliases:1: expected 'name: target, target'"),
    ],
    ids=["password-file", "tls-value", "ca-file", "aliases-line"],
)
def test_deliver_t_fails_as_the_start_does(tmp_path: Path, extra: str, words: str) -> None:
    (tmp_path / "aliases").write_text("no colon here\n")
    config = write_config(tmp_path, extra.format(d=tmp_path))
    checked = deliver(config)
    assert (checked.returncode, checked.stdout) == (EX_CONFIG, "")
    assert words.format(d=tmp_path) in checked.stderr, checked.stderr
    started = deliver(config, check=False)
    assert (started.returncode, started.stderr) == (EX_CONFIG, checked.stderr)
