"""Input files from strangers: read only inside their own folder, and only if they are files.

A base or adapter folder may come from anyone (a Hub repo, a shared drive), so a name in it
may be a link planted to make shardmerge read something else (``notes.txt ->
/proc/self/environ``: the process's environment, token included, copied and published as a
side file). Every input file shardmerge reads lies directly in its input's folder, and is
read only where the link chain to it ends inside that folder (``git`` refuses to follow
links out of a work tree for the same reason), or, for a folder of the Hub cache (a
snapshot: ``models--org--name/snapshots/<commit>``), inside that repo's ``blobs/``, which the
snapshot's links point into. What it ends on must be a regular file: never a FIFO (which
would block), a device, a socket, or anything under ``/proc``, ``/sys`` or ``/dev``. The
check is made when the plan is built and again when each file is opened, on the file
opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError

# Where nothing a model is made of can live: the kernel's views of processes and devices.
_SYSTEM = ("/proc", "/sys", "/dev")
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def roots(folder: Path) -> tuple[str, ...]:
    """The real folders the files of the input in ``folder`` may resolve into."""
    real = os.path.realpath(folder)
    snapshots = os.path.dirname(real)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs):
        return (real, blobs)
    return (real,)


def check(path: Path) -> str:
    """The real path of input file ``path`` (a name in its input's folder), or an InputError
    naming the link and where it leads, or what else it is."""
    real = os.path.realpath(path)
    inside = any(real == root or real.startswith(root + os.sep) for root in roots(path.parent))
    if not inside or real.startswith(tuple(prefix + os.sep for prefix in _SYSTEM)):
        raise InputError(
            f"a link to {_target(path)}, outside {path.parent}: shardmerge follows links only inside an input's "
            "own folder",
            file=path,
            hint="copy the file into the folder instead of linking it, or remove the link",
        )
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
    """A read-only descriptor of input file ``path``, checked as ``check`` does, on the file
    opened (a name swapped for a link or a FIFO after planning is refused, not followed)."""
    path = Path(path)
    real = check(path)
    try:
        fd = os.open(real, _FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        raise InputError("is not a regular file: shardmerge does not read it", file=path, hint="remove it")
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


def _target(path: Path) -> str:
    """Where the link at (or above) ``path`` leads, as written, then resolved."""
    written = os.readlink(path) if path.is_symlink() else None
    real = os.path.realpath(path)
    return f"{written} ({real})" if written is not None and written != real else real
