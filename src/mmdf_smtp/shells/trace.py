"""The ``-d`` trace: every command and reply of a session, on stderr."""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import ServerConnection, State

Tracer = Callable[[str], None]


def trace_input(trace: Tracer, connection: ServerConnection, data: bytes) -> None:
    """Commands line by line; message content only as a count of octets."""
    if connection.state in (State.DATA, State.BDAT):
        trace(f"<<< ({len(data)} octets of message content)")
        return
    for line in data.splitlines():
        trace("<<< " + line.decode("utf-8", "backslashreplace"))


def trace_output(trace: Tracer, data: bytes) -> None:
    for line in data.splitlines():
        trace(">>> " + line.decode("utf-8", "backslashreplace"))
