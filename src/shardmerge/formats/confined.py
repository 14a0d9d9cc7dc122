"""Input files from strangers: read only inside their own folder, and only if they are files.

A base or adapter folder may come from anyone (a Hub repo, a shared drive), so a name in it
may be a link planted to make shardmerge read something else (``notes.txt ->
/proc/self/environ``: the process's environment, token included, copied and published as a
side file; ``notes.txt -> .git/config``: a clone's credentials). An input file is read only
where the link chain to it ends inside its input's folder, on no hidden file or folder
(``git`` refuses to follow links out of a work tree for the same reason), or, for a folder
of the Hub cache (``models--org--name/snapshots/<commit>[/sub]``), on one of that repo's
``blobs/``, which the snapshot's links point into. What it ends on must be a regular file:
never a FIFO (which would block), a device, a socket, or anything under ``/proc`` or
``/sys``. The check is made when the plan is built and again on each file opened: the path
the kernel opened is read back and checked, so a folder swapped for a link in between is
refused, not followed.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import InputError

# Where nothing a model is made of can live: the kernel's views of processes and devices.
_SYSTEM = ("/proc/", "/sys/")
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# A repo's folder in the Hub cache: models--org--name (datasets--, spaces--).
_HUB_REPO = re.compile(r"^(models|datasets|spaces)--.+")
_HINT = "copy the file into the folder instead of linking it, or remove the link"


def roots(folder: Path) -> tuple[str, ...]:
    """The real folders the files of the input in ``folder`` may resolve into: the folder, and
    where it lies in a snapshot of the Hub cache, the repo's ``blobs``."""
    real = os.path.realpath(folder)
    parts = Path(real).parts
    for index in range(len(parts) - 2, 0, -1):
        repo = Path(*parts[:index])
        if parts[index] == "snapshots" and _HUB_REPO.match(repo.name) and (repo / "blobs").is_dir():
            return (real, str(repo / "blobs"))
    return (real,)


def where(real: str, folder: Path) -> str | None:
    """Why a file at real path ``real`` may not be read as a file of ``folder``, if it may not."""
    if real.startswith(_SYSTEM):
        return "the kernel's, under /proc or /sys"
    for root in roots(folder):
        if real.startswith(root + os.sep):
            hidden = [part for part in Path(real[len(root) + 1 :]).parts if part.startswith(".")]
            return "a hidden file or folder" if hidden else None
    return f"outside {folder}"


def check(path: Path) -> str:
    """The real path of input file ``path`` (a name in its input's folder), or an InputError
    naming the link and where it leads, or what else it is."""
    real = os.path.realpath(path)
    why = where(real, path.parent)
    if why is not None:
        raise _refused(path, real, why)
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
    if not stat.S_ISREG(mode):
        raise InputError(
            f"is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a file: shardmerge does not read it",
            file=path,
            hint="remove it from the folder",
        )
    return real


def open_input(path: Path | str) -> int:
    """A read-only descriptor of input file ``path``, checked as ``check`` does, and checked
    again on the file the kernel opened (a name swapped for a link, a FIFO or another folder
    after planning is refused, not followed)."""
    path = Path(path)
    real = check(path)
    try:
        fd = os.open(real, _FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError("is not a regular file: shardmerge does not read it", file=path, hint="remove it")
        opened = _opened(fd)
        why = where(opened, path.parent) if opened is not None else None
        if why is not None:
            raise _refused(path, opened or real, why)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_input(path: Path | str, limit: int) -> bytes:
    """The whole of input file ``path``, which may hold at most ``limit`` bytes (a config or an
    index, read into memory: its size is the sender's to choose)."""
    fd = open_input(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputError(
                f"is {size} bytes, more than the {limit} a file of its kind may hold",
                file=path,
                hint="the file is damaged, or not what its name says",
            )
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _opened(fd: int) -> str | None:
    """The path of the file open at ``fd``, as the kernel knows it (None where it does not say)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _refused(path: Path, real: str, why: str) -> InputError:
    if os.path.islink(path):
        written = os.readlink(path)
        target = f"{written} ({real})" if written != real else real
        return InputError(
            f"a link to {target}, {why}: shardmerge follows links only to files inside an input's own folder",
            file=path,
            hint=_HINT,
        )
    return InputError(
        f"leads to {real}, {why}: shardmerge reads only files inside an input's own folder", file=path, hint=_HINT
    )
