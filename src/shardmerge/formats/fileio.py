"""Bytes between files and buffers: exact reads and writes at an offset, output files opened
for direct I/O where the file system allows it, and a file's hashes. Reads are ``pread`` into
caller-owned buffers, never memory maps.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

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


def create(path: Path | str, flags: int = 0, *, dir_fd: int | None = None) -> int:
    """``path`` (in folder ``dir_fd``, if given) created anew for writing, never through a link:
    whatever has the name (a temp file left by a killed run, or a link planted there) is
    removed first, and the file is created exclusively, so a link put there meanwhile fails
    the open instead of being followed."""
    with suppress(FileNotFoundError):
        os.unlink(path, dir_fd=dir_fd)
    flags |= os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o644, dir_fd=dir_fd)


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


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of a file's first ``size`` bytes that hold data, without its holes (where the
    file system reports them with SEEK_DATA and SEEK_HOLE; elsewhere the whole file)."""
    offset = 0
    while offset < size:
        try:
            begin = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here to the end
                return
            if exc.errno != errno.EINVAL:
                raise
            yield offset, size  # the file system does not say where holes are
            return
        end = min(os.lseek(fd, begin, os.SEEK_HOLE), size)
        yield begin, end
        offset = end


def content_id(path: Path) -> str:
    """What identifies input file ``path``'s content: its sha256; for a file with holes, the
    sha256 of its data and where it lies (``sparse-sha256:...``), so that a sparse file of a
    terabyte is not read through its holes at every start."""
    fd = open_input(path)
    try:
        size = os.fstat(fd).st_size
        ranges = list(data_ranges(fd, size))
        digest = hashlib.sha256()
        if ranges == [(0, size)] or size == 0:
            _hash_range(fd, digest, 0, size)
            return digest.hexdigest()
        for begin, end in ranges:
            digest.update(f"{begin}:{end}:".encode())
            _hash_range(fd, digest, begin, end)
        return f"sparse-sha256:{digest.hexdigest()}:{size}"
    finally:
        os.close(fd)


def _hash_range(fd: int, digest: Any, begin: int, end: int) -> None:
    while begin < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - begin), begin)
        if not chunk:
            raise OSError(errno.EIO, "the file shrank while it was read")
        digest.update(chunk)
        begin += len(chunk)


def file_sha256(path: Path) -> str:
    _, sha256 = file_hashes(path, xxh3=False, sha256=True)
    assert sha256 is not None
    return sha256
