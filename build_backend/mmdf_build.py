"""setuptools' build backend, with the data files in editable wheels too.

``[tool.setuptools.data-files]`` (the manual pages, for
``<prefix>/share/man``) goes into the wheel that ``pip install .`` builds,
but setuptools leaves it out of the editable wheel of ``pip install -e .``
(pypa/setuptools#3399).  This backend is setuptools' own, except that
``build_editable`` adds those files to the wheel's ``.data/data/`` folder,
where an installer puts them under the prefix as it does for a normal
wheel (the wheel format, PEP 427, "The .data directory").
"""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import shutil
import tempfile
import tomllib
import zipfile
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - the backend's other hooks, unchanged


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    name: str = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_data_files(os.path.join(wheel_directory, name), data_files())
    return name


def data_files() -> dict[str, list[str]]:
    """``[tool.setuptools.data-files]``: target folder -> source files (globs allowed)."""
    with open("pyproject.toml", "rb") as file:
        table = tomllib.load(file).get("tool", {}).get("setuptools", {}).get("data-files", {})
    return {
        target: sorted(path for pattern in patterns for path in glob.glob(pattern))
        for target, patterns in table.items()
    }


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def add_data_files(wheel: str, files: dict[str, list[str]]) -> None:
    """Rewrite ``wheel`` with ``files`` under its .data/data/, and RECORD to match."""
    with zipfile.ZipFile(wheel) as original:
        record = next(n for n in original.namelist() if n.endswith(".dist-info/RECORD"))
        data_dir = record.removesuffix(".dist-info/RECORD") + ".data/data"
        fd, rewritten = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(wheel))
        os.close(fd)
        with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as out:
            lines = [
                line
                for line in original.read(record).decode().splitlines()
                if not line.startswith(f"{record},")
            ]
            for item in original.infolist():
                if item.filename != record:
                    out.writestr(item, original.read(item.filename))
            for target, sources in files.items():
                for source in sources:
                    with open(source, "rb") as file:
                        content = file.read()
                    arcname = f"{data_dir}/{target}/{os.path.basename(source)}"
                    out.writestr(arcname, content)
                    lines.append(f"{arcname},{_record_hash(content)},{len(content)}")
            lines.append(f"{record},,")  # RECORD has no hash of itself
            out.writestr(record, "".join(line + "\n" for line in lines))
    shutil.move(rewritten, wheel)
