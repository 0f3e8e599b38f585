"""Shared test set-up: helper modules from this folder, and the --soak option.

Every run keeps hypothesis's example counts small (the "ci" profile);
``pytest --soak`` loads the "soak" profile, which raises them a hundredfold,
and runs the tests marked ``soak`` that are skipped otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("ci", deadline=None)
settings.register_profile(
    "soak", deadline=None, max_examples=20_000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="long fuzz and soak runs: more hypothesis examples, and the tests marked soak",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--soak"):
        settings.load_profile("soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="a long run: give --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
