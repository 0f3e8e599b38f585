"""Shared test set-up: tests import their helper modules from this folder."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_OWN_BASE: Path | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", help="long soak and fuzz runs (by hand, not in CI)"
    )


def pytest_configure(config: pytest.Config) -> None:
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
