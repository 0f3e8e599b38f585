"""The manual pages: they render without a warning, they document every
option of the commands and every key of the configuration, and nothing
that is not there.

The pages are read as man(1) reads them (``man -l``, with every groff
warning on) and, when it is installed, as mandoc(1) lints them.  Under CI
(``CI=true``) a missing ``man`` or ``mandoc`` fails the tests rather than
skipping them: ``.ci/run`` installs both.

Options are taken from the commands themselves: each ``main`` is run until
it parses its arguments, and the parsers it built are read; submit's are
its getopt strings.  Configuration keys are taken from config.py's reader:
every key it reads for a configuration that has each table, and every key
it allows in a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import inspect
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mmdf_smtp import config
from mmdf_smtp.cli import submit

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = sorted(path for path in MAN.iterdir() if path.suffix in (".5", ".8"))
INCLUDES = [path for path in PAGES if path.read_text().startswith(".so ")]
FORMATTED = [path for path in PAGES if path not in INCLUDES]

# The commands with an argparse parser; the page of each is man/<command>.8.
ARGPARSE_COMMANDS = ["smtpd", "smtpsrvr", "checkque", "deliver"]


PACKAGES = {"man": "man-db", "mandoc": "mandoc"}  # Debian's, for each tool


def tool(name: str) -> str:
    """The program's path; a missing one fails the test under CI, else skips it."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES[name]
        message = f"{name} is not installed (.ci/run installs it: apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install man-db"):
        tool("man")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        tool("man")


# Rendering ------------------------------------------------------------------


def man_warnings(page: Path, *, cwd: Path | None = None) -> str:
    """What ``man -l`` says on stderr about ``page``, with all of groff's warnings on."""
    env = {
        **os.environ,
        "LC_ALL": "C.UTF-8",
        "MANWIDTH": "80",
        "MANROFFSEQ": "",  # no preprocessors from the page's first line
        "MAN_KEEP_STDERR": "1",
    }
    done = subprocess.run(
        [tool("man"), "--warnings=w", "-l", str(page)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 and not done.stderr:
        return f"man exited {done.returncode}"
    if "NAME" not in done.stdout:
        return done.stderr or "man rendered nothing"
    return done.stderr


def mandoc_warnings(page: Path) -> str:
    """mandoc's lint at warning level and above (its style hints are left out)."""
    done = subprocess.run(
        [tool("mandoc"), "-T", "lint", "-W", "warning", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


@pytest.mark.parametrize("page", FORMATTED, ids=lambda path: path.name)
def test_page_renders_without_warnings(page: Path) -> None:
    assert man_warnings(page) == ""


@pytest.mark.parametrize("page", FORMATTED, ids=lambda path: path.name)
def test_page_passes_mandoc_lint(page: Path) -> None:
    assert mandoc_warnings(page) == ""


def test_included_pages_render_where_installed(tmp_path: Path) -> None:
    """``rsmtpsrvr.8`` is ``.so man8/smtpsrvr.8``: it renders in a man tree."""
    assert INCLUDES, "rsmtpsrvr.8 is missing"
    for page in PAGES:
        (tmp_path / f"man{page.suffix[1:]}").mkdir(exist_ok=True)
        shutil.copy(page, tmp_path / f"man{page.suffix[1:]}" / page.name)
    for page in INCLUDES:
        target = page.read_text().split()[1]
        assert (tmp_path / target).exists(), f"{page.name}: {target} is not a page here"
        assert man_warnings(Path(f"man{page.suffix[1:]}") / page.name, cwd=tmp_path) == ""


BROKEN = {
    "unknown macro": ".XX not a macro\n",
    "undefined string": "\\*[nosuchstring]\n",
    "unbreakable line": "x" * 200 + "\n",
    "unknown escape": "\\qweird\n",
}


@pytest.mark.parametrize("error", list(BROKEN.values()), ids=list(BROKEN))
def test_a_page_with_an_error_is_caught(tmp_path: Path, error: str) -> None:
    """The checks above can fail: a page with an error makes man say so."""
    text = (MAN / "smtpd.8").read_text().replace(".SH OPTIONS\n", error + ".SH OPTIONS\n")
    broken = tmp_path / "smtpd.8"
    broken.write_text(text)
    assert "warning" in man_warnings(broken)


def test_a_page_with_an_error_fails_mandoc_lint(tmp_path: Path) -> None:
    text = (MAN / "smtpd.8").read_text().replace(".SH OPTIONS\n", ".XX\n.SH OPTIONS\n")
    broken = tmp_path / "smtpd.8"
    broken.write_text(text)
    assert "unknown macro" in mandoc_warnings(broken)


# Reading the pages' source ----------------------------------------------------

_FONT = re.compile(r"\\f(?:\[[A-Z]*\]|\(..|.)")
_SPECIAL = {"\\(dq": '"', "\\(aq": "'", "\\(lq": '"', "\\(rq": '"', "\\-": "-", "\\e": "\\"}


def roff_text(line: str) -> str:
    """A source line as the words a reader sees: no macro names, fonts or escapes."""
    if line.startswith((".", "'")):
        _, _, rest = line.partition(" ")
        words = re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)
        line = "".join(quoted or bare for quoted, bare in words)
    line = _FONT.sub("", line).replace("\\&", "")
    for escape, char in _SPECIAL.items():
        line = line.replace(escape, char)
    return line


def sections(page: Path) -> dict[str, list[str]]:
    """The page's source lines under each ``.SH`` heading."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in page.read_text().splitlines():
        if line.startswith(".SH"):
            current = found.setdefault(roff_text(line).strip(), [])
        else:
            current.append(line)
    return found


def tags(lines: list[str]) -> Iterator[tuple[str, str]]:
    """(subsection, tag) for each ``.TP`` entry, the tag as text."""
    subsection = ""
    after_tp = False
    for line in lines:
        if line.startswith(".SS"):
            subsection = roff_text(line).strip()
        elif line.startswith(".TP"):
            after_tp = True
        elif after_tp and not line.startswith('.\\"'):
            after_tp = False
            yield subsection, roff_text(line).strip()


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def documented_options(page: Path) -> set[str]:
    return {
        option
        for _, tag in tags(sections(page).get("OPTIONS", []))
        for option in _OPTION.findall(tag)
    }


def documented_arguments(page: Path) -> set[str]:
    return {tag for _, tag in tags(sections(page).get("ARGUMENTS", []))}


# Options ----------------------------------------------------------------------


class _Parsed(Exception):
    """Raised in place of parsing the arguments: the parsers are built by then."""


def parsers_of(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    made: list[argparse.ArgumentParser] = []
    build = argparse.ArgumentParser.__init__

    def init(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)
        made.append(self)

    def stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "__init__", init)
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        with pytest.raises(_Parsed):
            module.main([])
    assert made, f"{module.__name__} built no parser"
    return made


def code_options(command: str, monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], set[str]]:
    """The command's option strings, and the words of its positional arguments."""
    module = importlib.import_module(f"mmdf_smtp.cli.{command}")
    options: set[str] = set()
    positionals: set[str] = set()
    for parser in parsers_of(module, monkeypatch):
        for action in parser._actions:
            if action.option_strings:
                options.update(action.option_strings)
                continue
            metavar = action.metavar or action.dest
            names = metavar if isinstance(metavar, tuple) else (metavar,)
            positionals.update(word for name in names for word in name.split())
    return options, positionals


def submit_options() -> set[str]:
    """submit takes sendmail's options with getopt: its option strings say them."""
    letters = {f"-{letter}" for letter in submit._SHORT.replace(":", "")}
    return letters | {f"--{name.rstrip('=')}" for name in submit._LONG}


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_page_documents_every_option_and_no_other(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options, positionals = code_options(command, monkeypatch)
    page = MAN / f"{command}.8"
    documented = documented_options(page)
    assert sorted(options - documented) == [], f"options of {command} missing from {page.name}"
    assert sorted(documented - options) == [], f"{page.name} documents options {command} lacks"
    arguments = documented_arguments(page)
    assert sorted(positionals - arguments) == [], f"arguments missing from {page.name}"


def test_submit_page_documents_every_option_and_no_other() -> None:
    options = submit_options()
    documented = documented_options(MAN / "submit.8")
    assert sorted(options - documented) == []
    assert sorted(documented - options) == []
    assert "recipient" in documented_arguments(MAN / "submit.8")


def test_every_command_has_a_page() -> None:
    with (ROOT / "pyproject.toml").open("rb") as file:
        scripts = tomllib.load(file)["project"]["scripts"]
    for script in scripts:
        page = MAN / f"{script}.8"
        assert page.exists(), f"{script} has no manual page"
        text = page.read_text()
        if text.startswith(".so "):
            page = MAN / Path(text.split()[1]).name
        name = " ".join(sections(page)["NAME"])
        assert re.search(rf"(?<![\w-]){script}(?![\w-])", roff_text(name)), page.name


def test_smtpd_synopsis_has_the_four_forms() -> None:
    """MMDF's four flavours of smtpd, as the command line takes them."""
    forms = [
        "smtpd [-d] [-f] [-n maxconnects] [-c config] [-l addr:port]... smtpsrvr channels",
        "smtpd smtpsrvr channels port maxconnects network",
        "smtpd [-f] [-c config] smtpsrvr channels",
        "smtpd [-c config] sourcehost.sourceport",
    ]
    synopsis = "".join(roff_text(line) for line in sections(MAN / "smtpd.8")["SYNOPSIS"])
    flat = re.sub(r"\s+", "", synopsis)
    for form in forms:
        assert re.sub(r"\s+", "", form) in flat, form


# Configuration keys -------------------------------------------------------------

# A configuration that reaches every table of the reader: the tables that
# are read only when present ([tls], a channel) are present, with the keys
# they cannot do without.
PROBE = """\
[tls]
certificate = "cert.pem"
key = "key.pem"

[channels.name]

[auth]

[dnsbl]

[[milters]]
socket = "inet:127.0.0.1:8891"

[metrics]
"""
# Tables that their own classes read (AuthConfig.from_table, ...): the
# keys they ask for are noted as they are asked.
CHECKED_TABLES = ("auth", "dnsbl", "milters")


def code_keys(monkeypatch: pytest.MonkeyPatch, base: Path) -> tuple[set[str], set[str]]:
    """(dotted keys, table names) that config.py reads and allows."""
    reader = config._Reader
    keys: set[str] = set()

    def recording(method: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(method)

        def record(*args: Any, **kwargs: Any) -> Any:
            keys.add(signature.bind(*args, **kwargs).arguments["dotted"])
            return method(*args, **kwargs)

        return record

    allow = reader._table

    def table(self: Any, data: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if key != "channels":  # its "allowed" are the channels' names
            keys.update(f"{key}.{name}" for name in allowed)
        return allow(self, data, key, allowed)

    class Recording(dict[str, Any]):
        """A table that notes each key its reader asks for."""

        def __init__(self, name: str, data: dict[str, Any]) -> None:
            super().__init__(data)
            self.name = name

        def get(self, key: str, default: Any = None) -> Any:
            keys.add(f"{self.name}.{key}")
            return super().get(key, default)

        def __contains__(self, key: object) -> bool:
            keys.add(f"{self.name}.{key}")
            return super().__contains__(key)

        def __getitem__(self, key: str) -> Any:
            keys.add(f"{self.name}.{key}")
            return super().__getitem__(key)

    def recorded(method: Callable[..., Any], name: str) -> Callable[..., Any]:
        def read(self: Any, data: dict[str, Any], *args: Any) -> Any:
            value = data.get(name)
            if isinstance(value, dict):
                data = {**data, name: Recording(name, value)}
            elif isinstance(value, list):
                data = {**data, name: [Recording(name, each) for each in value]}
            return method(self, data, *args)

        return read

    with monkeypatch.context() as patch:
        for name in CHECKED_TABLES:
            patch.setattr(reader, f"_{name}", recorded(getattr(reader, f"_{name}"), name))
        for name, method in list(vars(reader).items()):
            if callable(method) and {"data", "dotted"} <= set(inspect.signature(method).parameters):
                patch.setattr(reader, name, recording(method))
        patch.setattr(reader, "_table", table)
        config.parse(PROBE, "probe", base=base)
    scalars = {key for key in keys if "." not in key}
    tables = {field.name for field in dataclasses.fields(config.Config)} - scalars - {"source"}
    for name in tables:
        assert any(key.startswith(f"{name}.") for key in keys), (
            f"the probe configuration does not reach [{name}]: add it to PROBE"
        )
    return keys, tables


def page_keys() -> tuple[set[str], set[str]]:
    """(dotted keys, table names) that mmdf-smtp.toml(5) documents under KEYS."""
    keys: set[str] = set()
    tables: set[str] = set()
    for subsection, tag in tags(sections(MAN / "mmdf-smtp.toml.5")["KEYS"]):
        key = tag.split()[0]
        if subsection == "Top level":
            keys.add(key)
            continue
        table = subsection.strip("[]")
        tables.add(table.split(".")[0])
        keys.add(f"{table}.{key}")
    return keys, tables


def test_config_page_documents_every_key_and_no_other(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys, tables = code_keys(monkeypatch, tmp_path)
    documented, documented_tables = page_keys()
    assert sorted(keys - documented) == [], "keys missing from mmdf-smtp.toml.5"
    assert sorted(documented - keys) == [], "mmdf-smtp.toml.5 documents keys config.py lacks"
    assert documented_tables == tables


def test_config_page_example_is_a_valid_configuration(tmp_path: Path) -> None:
    source = "\n".join(sections(MAN / "mmdf-smtp.toml.5")["EXAMPLES"])
    example = source.split(".EX\n", 1)[1].split("\n.EE", 1)[0]
    for escape, char in _SPECIAL.items():
        example = example.replace(escape, char)
    parsed = config.parse(example, "mmdf-smtp.toml.5", base=tmp_path)
    assert parsed.tls is not None
    assert list(parsed.channels) == ["local", "internal", "smtp"]


# Installation -------------------------------------------------------------------


def test_pages_are_installed_under_share_man() -> None:
    """``pip install`` (editable or not) puts every page under <prefix>/share/man."""
    try:
        distribution = importlib.metadata.distribution("mmdf-smtp")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("mmdf-smtp is not installed: pip install -e .")
    installed = {
        Path(str(file)).name: distribution.locate_file(file)
        for file in distribution.files or []
        if f"share/man/man{Path(str(file)).suffix[1:]}/" in str(file)
    }
    for page in PAGES:
        assert page.name in installed, f"{page.name} is not installed; reinstall: pip install -e ."
        assert Path(str(installed[page.name])).is_file()
