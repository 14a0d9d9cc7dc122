"""Bytes between files and buffers: whole writes, exact reads at an offset, range copies in
the kernel. Reads are ``pread`` into caller-owned buffers, never memory maps.
"""

from __future__ import annotations

import errno
import os


def write_all(fd: int, data: memoryview | bytes) -> None:
    """``os.write`` until every byte is written (writes may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short file is an error, not a short read."""
    view = buffer.cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise EOFError(f"unexpected end of file at byte {offset}")
        view = view[got:]
        offset += got


# copy_file_range is refused across file systems and by some file systems; fall back then.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
_COPY_CHUNK = 64 * 1024 * 1024


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at its position.

    Uses ``copy_file_range`` so the bytes never enter this process; falls back to reads and
    writes through one bounded buffer where the kernel refuses.
    """
    end = offset + count
    if hasattr(os, "copy_file_range"):
        try:
            while offset < end:
                copied = os.copy_file_range(src_fd, dst_fd, min(end - offset, _COPY_CHUNK), offset)
                if copied == 0:
                    raise EOFError(f"unexpected end of file at byte {offset}")
                offset += copied
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    buffer = bytearray(min(end - offset, _COPY_CHUNK))
    while offset < end:
        view = memoryview(buffer)[: min(end - offset, len(buffer))]
        pread_into(src_fd, view, offset)
        write_all(dst_fd, view)
        offset += len(view)
