"""What the programs that serve SMTP sessions share (smtpd, smtpsrvr).

Apart from :mod:`.common`: the service brings in the session, the checks
and the milter client, which the other programs never use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import ConfigError
from ..policy import UnknownChannel
from ..privileges import Account, drop_privileges, prepare_account
from ..service import Service
from .common import EX_CONFIG, EX_OSERR, EX_USAGE


def load_service(
    program: str,
    config_path: str | None,
    channels: list[str],
    *,
    finicky: bool,
    hostname: str | None = None,
) -> Service:
    """The service, or exit: 64 for an unknown channel, 78 for bad configuration."""
    try:
        return Service.load(config_path, channels, finicky=finicky, hostname=hostname)
    except UnknownChannel as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        raise SystemExit(EX_USAGE) from None
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def become_user(program: str, service: Service) -> None:
    """Stop being root before serving anyone, or exit 78 (see privileges)."""
    with _or_exit(program, service, f"cannot become {service.config.user}"):
        drop_privileges(service.config.user, service.config.spool)


def prepare_user(program: str, service: Service) -> Account | None:
    """For a process that stays root: the user its children become, or exit 78."""
    with _or_exit(program, service, f"cannot give the spool to {service.config.user}"):
        return prepare_account(service.config.user, service.config.spool)


@contextmanager
def _or_exit(program: str, service: Service, failing: str) -> Iterator[None]:
    """Exit 78 for a configuration the user cannot be set up from, 71 (saying
    ``failing``) when the system refuses."""
    try:
        yield
    except ConfigError as exc:
        print(f"{program}: {service.config.source}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    except OSError as exc:
        print(f"{program}: {failing}: {exc}", file=sys.stderr)
        raise SystemExit(EX_OSERR) from None
