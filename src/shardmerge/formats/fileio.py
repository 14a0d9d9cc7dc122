"""Bytes between files and buffers: exact reads and writes at an offset, output files opened
for direct I/O where the file system allows it, and a file's hashes. Reads are ``pread`` into
caller-owned buffers, never memory maps.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import xxhash

from .confined import open_input

# Direct I/O writes whole blocks from aligned memory: 4096 bytes covers every common device.
DIRECT_IO_ALIGNMENT = 4096
_READ_CHUNK = 16 * 1024 * 1024


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short file is an error, not a short read."""
    view = buffer.cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise EOFError(f"unexpected end of file at byte {offset}")
        view = view[got:]
        offset += got


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (writes may be partial)."""
    view = data.cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def create(path: Path, flags: int = 0) -> int:
    """``path`` created anew for writing, never through a link: whatever has the name (a temp
    file left by a killed run, or a link planted there) is removed first, and the file is
    created exclusively, so a link put there meanwhile fails the open instead of being
    followed."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o644)


def open_output(path: Path) -> tuple[int, bool]:
    """``path`` created anew for writing (see ``create``): with O_DIRECT (True) where the file
    system takes it, else buffered (False)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return create(path, os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return create(path), False


def file_hashes(path: Path, *, xxh3: bool, sha256: bool) -> tuple[str | None, str | None]:
    """The xxh3-128 and the sha256 of a file, those asked for, in one read."""
    fast = xxhash.xxh3_128() if xxh3 else None
    slow = hashlib.sha256() if sha256 else None
    fd = open_input(path)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            for digest in (fast, slow):
                if digest is not None:
                    digest.update(chunk)
    finally:
        os.close(fd)
    return (fast.hexdigest() if fast else None, slow.hexdigest() if slow else None)


def file_sha256(path: Path) -> str:
    _, sha256 = file_hashes(path, xxh3=False, sha256=True)
    assert sha256 is not None
    return sha256
