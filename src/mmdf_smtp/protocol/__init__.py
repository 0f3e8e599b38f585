"""The sans-IO SMTP server core: octets in, events and replies out.

No sockets, clocks or files here; the shells in :mod:`mmdf_smtp.shells`
drive it, and so do the tests.
"""

from . import replies
from .connection import NEED_DATA, PAUSED, ServerConnection, Signal, State, Timer
from .events import (
    ConnectionClosed,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageComplete,
    MessageData,
    OutOfTurn,
    Path,
    RcptTo,
    Reset,
    StartData,
    StartTLS,
)
from .limits import Limits
from .replies import Reply

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ConnectionClosed",
    "Event",
    "Hello",
    "Limits",
    "MailFrom",
    "MessageAborted",
    "MessageComplete",
    "MessageData",
    "OutOfTurn",
    "Path",
    "RcptTo",
    "Reply",
    "Reset",
    "ServerConnection",
    "Signal",
    "StartData",
    "StartTLS",
    "State",
    "Timer",
    "replies",
]
