"""One run per output folder: an exclusive ``flock`` on ``OUT/.shardmerge/lock``.

The lock is the kernel's, held by an open file, so it dies with its holder: a run that was
killed leaves nothing that blocks the next one (the file stays; only the lock counts). The
file names the holder (pid, host, command, start time) for the message a second run prints.
``flock`` is local to one machine on some network filesystems: two hosts writing one NFS
folder are not kept apart by it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from ..formats.jsondoc import parse
from . import outdir

LOCK_FILE = "lock"
STATE_DIR = outdir.STATE_DIR
# A run that finds the lock taken looks again for this long before it gives up: ``verify``
# takes a shared lock for an instant to see whether a run holds it, and must not make a run
# that starts at that moment fail.
_PATIENCE_SECONDS = 1.0
_HOLDER_BYTES = 64 * 1024
_POLL_SECONDS = 0.05


def lock_path(folder: Path) -> Path:
    return folder / STATE_DIR / LOCK_FILE


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (creating the folder); raises OutputError at once,
    naming the holder, when another run holds it. The state folder and the lock file are
    never links (refused, naming them): a run must not write through one."""
    path = lock_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    outdir.own_folder(path.parent)
    fd = outdir.open_own(path, os.O_RDWR | os.O_CREAT)
    try:
        deadline = time.monotonic() + _PATIENCE_SECONDS
        while not _try(fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                raise OutputError(
                    f"another shardmerge run ({_holder(fd)}) is writing this folder",
                    file=folder,
                    hint="wait for it to finish or stop it; a run that was killed leaves no lock behind",
                )
            time.sleep(_POLL_SECONDS)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def held_by(folder: Path) -> str | None:
    """Who holds ``folder``'s lock now, or None; takes nothing that a run could wait on."""
    path = lock_path(folder)
    try:
        fd = outdir.open_own(path)
    except (OSError, OutputError):
        return None
    try:
        return None if _try(fd, fcntl.LOCK_SH) else _holder(fd)
    finally:
        os.close(fd)


def _try(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    """Who the lock file open at ``fd`` names as its holder."""
    try:
        holder = parse(os.pread(fd, _HOLDER_BYTES, 0))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
