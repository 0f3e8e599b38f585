"""What the programs that serve SMTP sessions share (smtpd, smtpsrvr).

Apart from :mod:`.common`: the service brings in the session, the checks
and the milter client, which the other programs never use.
"""

from __future__ import annotations

import sys

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
    try:
        drop_privileges(service.config.user, service.config.spool)
    except ConfigError as exc:
        print(f"{program}: {service.config.source}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    except OSError as exc:
        print(f"{program}: cannot become {service.config.user}: {exc}", file=sys.stderr)
        raise SystemExit(EX_OSERR) from None


def prepare_user(program: str, service: Service) -> Account | None:
    """For a process that stays root: the user its children become, or exit 78."""
    try:
        return prepare_account(service.config.user, service.config.spool)
    except ConfigError as exc:
        print(f"{program}: {service.config.source}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    except OSError as exc:
        print(f"{program}: cannot give the spool to {service.config.user}: {exc}", file=sys.stderr)
        raise SystemExit(EX_OSERR) from None
