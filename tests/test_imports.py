"""What each program imports at start is its start-up time (submit's: once a message)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The checks (dkimpy, pyspf, the asynchronous resolver), the milter client
# and dnspython: smtpd's and smtpsrvr's.  submit loads asyncio and the
# client when it has milters, any program dnspython when a channel's
# table is the nameserver.
SERVING = (
    "dkim",
    "spf",
    "dns.resolver",
    "dns.asyncresolver",
    "asyncio",
    "mmdf_smtp.checks.gate",
    "mmdf_smtp.checks.dkim",
    "mmdf_smtp.checks.spf",
    "mmdf_smtp.checks.dmarc",
    "mmdf_smtp.milter.client",
)


def imported(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module``."""
    code = f"import sys, {module}; print(*sys.modules, sep='\\n')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("program", ["submit", "checkque", "deliver"])
def test_programs_that_check_no_mail_import_no_checks(program: str) -> None:
    modules = imported(f"mmdf_smtp.cli.{program}")
    assert "mmdf_smtp.config" in modules  # they do read the configuration, [auth] and all
    assert sorted(modules.intersection(SERVING)) == []


def test_smtpd_imports_the_checks() -> None:
    """The other side of the above: the names are those the checks are imported under."""
    assert imported("mmdf_smtp.cli.smtpd").issuperset(SERVING)
