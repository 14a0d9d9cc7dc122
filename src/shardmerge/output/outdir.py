"""Writing files into the output folder atomically.

A file appears under its final name only complete: it is written as ``NAME.tmp``, fsynced,
renamed, and the folder is fsynced so the rename survives a power cut.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(final: Path, attempt: str = "") -> Path:
    """Where ``final`` is written before it is complete; ``attempt`` names one of several
    writers of it (cluster tasks), so that no two share a temp file."""
    return final.with_name(final.name + (f".{attempt}" if attempt else "") + TMP_SUFFIX)


def remove_temps(folder: Path) -> None:
    """Temp files in ``folder`` that no writer will finish: left by a run that was killed, or
    by cluster tasks that died or lost to a duplicate."""
    for leftover in folder.glob(f"*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


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
