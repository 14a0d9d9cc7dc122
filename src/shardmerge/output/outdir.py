"""Writing files into the output folder atomically, and never through a link.

A file appears under its final name only complete: it is written as ``NAME.tmp``, fsynced,
renamed, and the folder is fsynced so the rename survives a power cut. A temp file is created
exclusively with ``O_NOFOLLOW`` (``formats/fileio.create``) and removed if its writing fails;
the rename replaces a name, never writes through it. The output folder may be writable by
others: a link found where shardmerge keeps its own files is refused, naming it, before
anything is written (``check_links``); the small files (the journal, the lock, the index,
the card, the side files) are opened, created and renamed relative to their folder's
descriptor, the state folder opened without following a link (``folder_fd``), so a folder
swapped for a link after the check is not written through either; and shardmerge's own
files are read without following links (``open_own``). Shards are written in the output
folder by path (``fileio.open_output``), created the same way.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError
from ..formats.confined import open_input
from ..formats.fileio import create, data_ranges

TMP_SUFFIX = ".tmp"
STATE_DIR = ".shardmerge"  # the output folder's own: the lock and the journal
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_COPY_CHUNK = 8 * 1024 * 1024


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


def link_error(path: Path) -> OutputError:
    try:
        what = f"a link (to {os.readlink(path)})"
    except OSError:
        what = "a link, or what is not a folder,"
    return OutputError(
        f"{what} where shardmerge keeps its own file: it never writes or reads its output through a link",
        file=path,
        hint="remove the link; a folder shardmerge wrote holds none",
    )


def check_links(folder: Path, state: Path) -> None:
    """Refuse a link anywhere shardmerge keeps files: in ``folder`` or its ``state`` folder."""
    for parent in (folder, state):
        for entry in parent.iterdir() if parent.is_dir() else ():
            if entry.is_symlink():
                raise link_error(entry)


def own_folder(path: Path) -> None:
    """Create folder ``path`` of shardmerge's (where missing); a link or a file there is refused."""
    try:
        os.mkdir(path)
    except FileExistsError:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise link_error(path) from None
        if not stat.S_ISDIR(mode):
            raise OutputError("not a folder, where shardmerge keeps its state", file=path, hint="remove it") from None


@contextmanager
def folder_fd(folder: Path) -> Iterator[int]:
    """A descriptor of ``folder``: the output folder as given (it may be a link of the user's),
    or the state folder in it, opened without following a link (refused, naming it). Files are
    then opened, created and renamed relative to it, so a folder swapped for a link after it
    was checked is never written through."""
    if folder.name != STATE_DIR:
        fd = os.open(folder, _FOLDER)
    else:
        parent = os.open(folder.parent, _FOLDER)
        try:
            fd = os.open(STATE_DIR, _FOLDER | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise link_error(folder) from None
            raise
        finally:
            os.close(parent)
    try:
        yield fd
    finally:
        os.close(fd)


def open_own(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of a file shardmerge keeps in its output folder (``flags``: read it, or with
    ``O_RDWR | O_CREAT`` the lock), opened without following a link (refused, naming it); it
    must be a regular file. FileNotFoundError where there is none."""
    with folder_fd(path.parent) as folder:
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise link_error(path) from None
            raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError("not a regular file, where shardmerge keeps its own", file=path, hint="remove it")
    return fd


def reader(path: Path) -> BinaryIO:
    """A file of the output folder opened for reading, as ``open_own`` opens it."""
    return os.fdopen(open_own(path), "rb")


def read_own(path: Path) -> bytes:
    """The bytes of a file of the output folder, read as ``open_own`` opens it."""
    with reader(path) as handle:
        return handle.read()


@contextmanager
def _writing(final: Path) -> Iterator[int]:
    """A new temp file for ``final``, renamed into place when the block ends, both in the
    descriptor of its folder; on a failure it is removed and the error names ``final``."""
    tmp = tmp_path(final).name
    with folder_fd(final.parent) as folder:
        try:
            fd = create(tmp, dir_fd=folder)
            try:
                yield fd
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final.name, src_dir_fd=folder, dst_dir_fd=folder)
            os.fsync(folder)
        except BaseException as exc:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            if isinstance(exc, OSError) and exc.filename in (None, tmp):
                exc.filename = str(final)
            raise


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with _writing(final) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def copy_atomic(source: Path, final: Path) -> None:
    """Copy input file ``source`` (checked as every input is) to ``final``. Only its data is
    copied: the holes of a sparse file stay holes (where the file system reports them with
    ``SEEK_DATA``/``SEEK_HOLE``; elsewhere the whole file is data)."""
    src = open_input(source)
    try:
        size = os.fstat(src).st_size
        with _writing(final) as dst:
            for begin, end in data_ranges(src, size):
                _copy_range(src, dst, begin, end)
            os.ftruncate(dst, size)
    finally:
        os.close(src)


def allocated(path: Path) -> int:
    """The bytes a copy of ``path`` takes on disk: its data, without its holes."""
    info = os.stat(path)
    return min(info.st_size, info.st_blocks * 512)


def _copy_range(src: int, dst: int, begin: int, end: int) -> None:
    """Bytes ``begin`` to ``end`` of ``src`` to the same place in ``dst``: in the kernel where it
    can (``copy_file_range``), else through a buffer."""
    offset = begin
    while offset < end:
        count = min(end - offset, _COPY_CHUNK)
        try:
            copied = os.copy_file_range(src, dst, count, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, count, offset)
            copied = os.pwrite(dst, data, offset) if data else 0
        if copied == 0:
            raise OSError(errno.EIO, "the file shrank while it was copied")
        offset += copied
