"""The aliases file, in the classic aliases(5) format.

    # comment
    postmaster: root
    staff: alice, bob,
        carol            <- a line starting with white space continues the last

Keys are compared in lower case.  Only the names matter here (a recipient
exists when it is an alias); delivery expands the targets.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, read_text


def read_aliases(path: Path) -> dict[str, tuple[str, ...]]:
    text = read_text(path, "aliases")
    aliases: dict[str, list[str]] = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line[0] in " \t":
            if current is None:
                raise ConfigError(f"{path}:{number}: continuation line with no alias before it")
            aliases[current].extend(_targets(line))
            continue
        name, colon, rest = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name:
            raise ConfigError(f"{path}:{number}: expected 'name: target, target'")
        current = name
        aliases.setdefault(name, []).extend(_targets(rest))
    return {name: tuple(targets) for name, targets in aliases.items()}


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
