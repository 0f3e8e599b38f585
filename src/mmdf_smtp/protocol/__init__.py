"""The sans-IO SMTP server core: octets in, events and replies out.

No sockets, clocks or files here; the shells in :mod:`mmdf_smtp.shells`
drive it, and so do the tests.
"""

from . import replies
from .connection import NEED_DATA, PAUSED, ServerConnection, Signal, State, Timer
from .events import (
    CloseReason,
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
    Refused,
    Reset,
    StartData,
    StartTLS,
)
from .limits import Limits
from .replies import Reply

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "CloseReason",
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
    "Refused",
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
