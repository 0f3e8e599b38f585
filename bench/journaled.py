"""A journaled file system for the servers' queues and Maildirs, as a production host has.

The machine's root file system may not be one: ext4 made without a
journal charges every file created after many unlinks a scan past the
inodes freed in the last minutes (``recently_deleted()`` in
fs/ext4/ialloc.c, called only when there is no journal), up to a
millisecond a create.  A queue that churns (Postfix's does, by design)
pays for that as no production host would.  So the bench makes an ext4
image with its journal, loop-mounts it, and runs every server on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SIZE = 16 * 1024**3  # sparse: only what the run writes takes disk space


class MountUnavailable(Exception):
    """The journaled file system could not be made or mounted here."""


@dataclass(frozen=True)
class FileSystem:
    """Where a directory's files live: device, type, and the journal's mode."""

    path: Path
    device: str
    fstype: str
    options: str
    journal: str

    def describe(self) -> str:
        return f"{self.path} on {self.device} ({self.fstype}, journal: {self.journal})"


def _mount_of(path: Path) -> tuple[str, str, str, str]:
    """The /proc/mounts line (device, mount point, type, options) holding ``path``."""
    resolved = path.resolve()
    best: tuple[str, str, str, str] = ("?", "/", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, fstype, options = line.split()[:4]
        point = point.replace("\\040", " ")
        if resolved.is_relative_to(point) and len(point) >= len(best[1]):
            best = (device, point, fstype, options)
    return best


def _ext4_journal(device: str) -> str:
    """ext4's journal mode for ``device`` ("data=ordered"), or "none".

    /proc/mounts leaves the default data=ordered out; /proc/fs/ext4/<dev>/options
    lists it, and says nothing of data= when there is no journal at all.
    """
    options_file = Path("/proc/fs/ext4") / Path(device).name / "options"
    try:
        options = options_file.read_text().split()
    except OSError:
        return "unknown"
    modes = [option for option in options if option.startswith("data=")]
    return modes[0] if modes else "none"


def describe(path: Path) -> FileSystem:
    device, _, fstype, options = _mount_of(path)
    if fstype in ("ext3", "ext4"):
        journal = _ext4_journal(device)
    elif fstype == "xfs":
        journal = "xfs log"
    else:
        journal = "unknown"
    return FileSystem(path, device, fstype, options, journal)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()
        raise MountUnavailable(f"{' '.join(argv)}: exit {result.returncode}: {detail}")


def _short_parent() -> Path:
    for candidate in (Path("/run"), Path("/tmp")):
        if candidate.is_dir() and os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def journaled(workdir: Path, size: int = IMAGE_SIZE) -> Iterator[FileSystem]:
    """An ext4 image with its journal in ``workdir``, loop-mounted; unmounted and removed after.

    Raises :class:`MountUnavailable` when mkfs.ext4 is missing or the mount
    is refused (no loop devices, not root).
    """
    if shutil.which("mkfs.ext4") is None:
        raise MountUnavailable("mkfs.ext4 is missing (Debian's e2fsprogs package)")
    directory = Path(tempfile.mkdtemp(prefix="mmdf-bench-fs-", dir=workdir))
    image = directory / "fs.img"
    # Mounted on a short path, whatever --workdir is: Postfix binds Unix
    # sockets under its queue directory by their whole name (postlog's),
    # and a name is at most 107 octets (sun_path, unix(7)).
    point = Path(tempfile.mkdtemp(prefix="mmdf-bench-", dir=_short_parent()))
    mounted = False
    try:
        with image.open("wb") as file:
            file.truncate(size)
        _run(["mkfs.ext4", "-F", "-q", "-O", "has_journal", str(image)])
        _run(["mount", "-o", "loop", str(image), str(point)])
        mounted = True
        # Postfix's daemons (user postfix) and deliver (nobody) walk through it.
        point.chmod(0o755)
        found = describe(point)
        if found.fstype != "ext4" or found.journal == "none":
            raise MountUnavailable(f"{found.describe()}: not the journaled ext4 asked for")
        yield found
    finally:
        if mounted:
            os.sync()
            result = subprocess.run(["umount", str(point)], capture_output=True, check=False)
            if result.returncode != 0:
                # Something still holds a file there: lazily, so the image can go.
                subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            point.rmdir()
        shutil.rmtree(directory, ignore_errors=True)
