"""What every command shares: exit codes (sysexits.h), arguments, logging."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from logging.handlers import SysLogHandler
from typing import NoReturn

from ..config import Config, ConfigError, load
from ..logjson import JsonFormatter
from ..queue import QueueBackend, open_backend

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but bad arguments exit with EX_USAGE rather than 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: {message}\n")


def load_config(program: str, config_path: str | None) -> Config:
    """The configuration, or exit 78 (EX_CONFIG) saying what is wrong."""
    try:
        return load(config_path)
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def open_queue(program: str, config: Config) -> QueueBackend:
    """The queue ``[queue]`` names, or exit 78 (EX_CONFIG) saying why it cannot be had."""
    try:
        return open_backend(config)
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def stderr_is_the_client() -> bool:
    """Under inetd, stderr is the connection too: nothing may be logged there."""
    try:
        err, conn = os.fstat(2), os.fstat(0)
    except OSError:
        return True
    return stat.S_ISSOCK(err.st_mode) and (err.st_dev, err.st_ino) == (conn.st_dev, conn.st_ino)


def setup_logging(
    program: str, *, debug: bool, target: str = "stderr", log_format: str = "text"
) -> None:
    """Log as the configuration says; ``-d`` (debug) always traces to stderr.

    On stderr lines read ``program(pid): text``, as the seed's debug output
    did; to syslog they go as ``program[pid]: text`` with facility mail.
    With ``log_format`` "json" each line is a JSON object instead (to
    syslog after the ``program[pid]: `` tag), see :mod:`mmdf_smtp.logjson`.
    """
    # The formats use no caller, thread or process name; finding the caller
    # walks the stack once a line (the logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger("mmdf_smtp")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if target.startswith("syslog") and not debug:
        address = target.partition(":")[2] or "/dev/log"
        try:
            handler = SysLogHandler(address=address, facility=SysLogHandler.LOG_MAIL)
        except OSError as exc:
            print(f"{program}: cannot log to syslog at {address}: {exc}", file=sys.stderr)
            raise SystemExit(EX_CONFIG) from None
        # %(process)d, not getpid() now: worker processes log under their own pid.
        handler.setFormatter(logging.Formatter(f"{program}[%(process)d]: %(message)s"))
        if log_format == "json":
            handler.setFormatter(_SyslogJson(program))
    elif stderr_is_the_client():
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{program}(%(process)d): %(message)s"))
        if log_format == "json":
            handler.setFormatter(JsonFormatter(program))
    root.addHandler(handler)


class _SyslogJson(JsonFormatter):
    """syslog's tag first (``program[pid]: ``), then the object."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._program}[{record.process}]: {super().format(record)}"
