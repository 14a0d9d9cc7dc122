"""The output folder: who owns it, and writing files into it atomically.

A file appears under its final name only complete: it is written as ``NAME.tmp``, fsynced,
renamed, and the folder is fsynced so the rename survives a power cut.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import OutputError

STATE_DIR = ".shardmerge"
JOB_FILE = "job.json"
TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(final: Path) -> Path:
    return final.with_name(final.name + TMP_SUFFIX)


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished, fsynced temp file into place."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    tmp = tmp_path(final)
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    commit(tmp, final)


def copy_atomic(source: Path, final: Path) -> None:
    tmp = tmp_path(final)
    with source.open("rb") as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    commit(tmp, final)


def claim(folder: Path, fingerprint: str, inputs: list[Path]) -> None:
    """Make ``folder`` ours for this job, or refuse.

    An empty or missing folder is claimed; a non-empty one only if an earlier run of the same
    job (same fingerprint) left it. Leftover temp files of that run are removed.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError("output path exists and is not a folder", file=folder, hint="choose another output path")
    resolved = folder.resolve()
    for source in inputs:
        if resolved == source.resolve():
            raise OutputError("output folder is one of the inputs", file=folder, hint="choose another output path")
    marker = folder / STATE_DIR / JOB_FILE
    if folder.is_dir() and any(folder.iterdir()):
        if not marker.is_file():
            raise OutputError(
                "output folder is not empty and was not written by shardmerge",
                file=folder,
                hint="choose an empty or new folder, or remove this one",
            )
        try:
            owner = json.loads(marker.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner != fingerprint:
            raise OutputError(
                "output folder holds the output of a different merge job",
                file=folder,
                hint="choose another output folder, or remove this one to replace it",
            )
    (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(f"*{TMP_SUFFIX}"):
        leftover.unlink()
    write_bytes_atomic(marker, (json.dumps({"fingerprint": fingerprint}, indent=2) + "\n").encode())
