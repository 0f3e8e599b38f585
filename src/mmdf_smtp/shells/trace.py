"""The ``-d`` trace: every command and reply of a session, on the debug log."""

from __future__ import annotations

from ..protocol import State
from ..session import Session


def trace_input(session: Session, data: bytes) -> None:
    """Commands line by line; message content only as a count of octets."""
    if session.connection.state in (State.DATA, State.BDAT):
        session.trace(f"<<< ({len(data)} octets of message content)")
        return
    for line in data.splitlines():
        session.trace("<<< " + line.decode("utf-8", "backslashreplace"))


def trace_output(session: Session, data: bytes) -> None:
    for line in data.splitlines():
        session.trace(">>> " + line.decode("utf-8", "backslashreplace"))
