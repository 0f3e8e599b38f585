"""Shared test set-up: helper modules from this folder, and the --soak option.

Every run keeps hypothesis's example counts small (the "ci" profile);
``pytest --soak`` loads the "soak" profile, which raises them a hundredfold,
runs the tests marked ``soak`` that are skipped otherwise, and gives each
test :data:`SOAK_TIMEOUT` instead of the usual limit.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import mmdf_smtp

sys.path.insert(0, str(Path(__file__).parent))

# The real-milter fixtures (opendkim_signer, opendmarc, ...) for every test module.
pytest_plugins = ["milters"]

settings.register_profile("ci", deadline=None)
settings.register_profile(
    "soak", deadline=None, max_examples=20_000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")

_OWN_BASE: Path | None = None
SOAK_TIMEOUT = 2 * 3600  # seconds a test may take in a --soak run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="long fuzz and soak runs: more hypothesis examples, and the tests marked soak",
    )


def pytest_configure(config: pytest.Config) -> None:
    # The programs under test start hundreds of fresh interpreters.  Where
    # PYTHONDONTWRITEBYTECODE is set, none of them keeps the package's
    # bytecode, and each compiles every module it imports again (a third of
    # its start-up).  pip compiles an installed package; this does it for the
    # source tree the tests run from.
    compileall.compile_dir(Path(mmdf_smtp.__file__).parent, quiet=1)
    if config.getoption("--soak"):
        settings.load_profile("soak")
    global _OWN_BASE  # noqa: PLW0603 - one per test run, removed at its end
    if os.geteuid() == 0 and config.option.basetemp is None:
        # Run as root, the servers under test serve sessions as nobody, who
        # must reach the tests' folders (wire.reachable_by_anyone).  pytest
        # takes group and other access off its shared root, /tmp/pytest-of-root,
        # each time any test run starts, so this run gets a root of its own.
        _OWN_BASE = Path(tempfile.mkdtemp(prefix="mmdf-tests-"))
        _OWN_BASE.chmod(0o711)
        config.option.basetemp = str(_OWN_BASE / "tmp")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_BASE is not None:
        shutil.rmtree(_OWN_BASE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        # The usual limit (pyproject's timeout) is for the short runs: a
        # soak of 20,000 examples takes many minutes, a hang still ends.
        for item in items:
            item.add_marker(pytest.mark.timeout(SOAK_TIMEOUT))
        return
    skip = pytest.mark.skip(reason="a long run: give --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
