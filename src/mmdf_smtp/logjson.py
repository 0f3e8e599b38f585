"""``log_format = "json"``: each log line as one JSON object.

The lines are written for people and for fail2ban: a session's id, what
happened, then ``key=value`` fields (``id=`` the queue id on every line
about a message, ``client=``, ``from=<...>``, ``reply="..."``).  The JSON
object carries the same fields, read back from the text by the one
grammar the text follows, so that a line cannot say one thing as text and
another as JSON: ``session`` (the session's id, when the line names one),
``event`` (the words that are not fields, e.g. ``queued``), ``detail`` (a
part in parentheses, such as deliver's reply), every ``key=value`` as
``"key": "value"`` (the quotes of a quoted value taken off), and
``message``, the text line whole.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

# A field, a part in parentheses (one level of nesting), or a word.
_TOKEN = re.compile(
    r"""(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>"(?:[^"\\]|\\.)*"|\S*)"""
    r"""|(?P<detail>\((?:[^()]|\([^()]*\))*\))"""
    r"""|(?P<word>\S+)"""
)
_SESSION_ID = re.compile(r"[0-9a-f]{8}")
NUMBERS = frozenset({"size", "messages", "attempts"})
# Names the object's own fields take; a line's field of the same name gets a "_" after it.
_OWN = frozenset({"time", "program", "pid", "level", "message", "exception"})


def fields(text: str) -> dict[str, Any]:
    """The fields of one log line's text (without the ``program(pid):`` prefix)."""
    found: dict[str, Any] = {}
    words: list[str] = []
    for match in _TOKEN.finditer(text):
        key = match.group("key")
        if key is not None:
            value = match.group("value")
            if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
                value = value[1:-1].replace('\\"', '"')
            else:
                value = value.removesuffix(":").removesuffix(";")  # "id=ab12...: text"
            if key in _OWN:
                key += "_"
            found[key] = int(value) if key in NUMBERS and value.isdigit() else value
        elif match.group("detail") is not None:
            found["detail"] = match.group("detail")[1:-1]
        else:
            words.append(match.group("word"))
    # "<session> queued ...", "session <session> ...": the session's id is no event.
    if words and _SESSION_ID.fullmatch(words[0]):
        found["session"] = words.pop(0)
    elif len(words) >= 2 and words[0] == "session" and _SESSION_ID.fullmatch(words[1]):
        found["session"] = words.pop(1)
    if words:
        found["event"] = " ".join(words)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object a record, on one line."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self._program = program

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "program": self._program,
            "pid": record.process,
            "level": record.levelname.lower(),
        }
        line.update(fields(text))
        line["message"] = text
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)
