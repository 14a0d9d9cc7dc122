"""Where a shard's bytes go once computed: a gatherer and a writer thread, in order.

The caller (reading and merging tensors) hands over blocks of bytes and ranges of the source
file to copy. The gatherer (on the host, the caller's own thread: see ``inline``) collects
them in a few page-aligned staging buffers (a copied range is read straight into one, and a
merged block can be rounded straight into one: ``fill``); the writer writes each full buffer
with direct I/O where the file system allows it (the bytes go from the buffer to the disk,
not through the page cache, which costs a copy per byte and, on a machine short of free
memory, reclaim), then hashes it: the shard's xxh3-128 for the journal (about 25 GB/s on one
core) and, when the shard will be published, its sha256 (the Hub's LFS object id, about
1.7 GB/s). Hashing and writing release the GIL. So reading, merging, gathering, writing and
hashing overlap, and no shard is read back to hash it. The caller's buffers return to their
pool once gathered; the staging buffers once written and hashed: the two pools bound the
memory in flight.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ..formats.fileio import DIRECT_IO_ALIGNMENT, pread_into, pwrite_all
from ..tuning import STAGING_BUFFERS, STAGING_BYTES
from .buffers import Buffer, huge_pages

_Item = tuple[Any, ...]


@dataclass(frozen=True)
class Written:
    """A shard as written: its size, its xxh3-128 and, when asked for, its sha256 (hex)."""

    size: int
    xxh3_128: str
    sha256: str | None


class _Hashes:
    def __init__(self, sha256: bool) -> None:
        self.xxh3 = xxhash.xxh3_128()
        self.sha = hashlib.sha256() if sha256 else None

    def update(self, data: memoryview) -> None:
        self.xxh3.update(data)
        if self.sha is not None:
            self.sha.update(data)

    def written(self, size: int) -> Written:
        return Written(size, self.xxh3.hexdigest(), self.sha.hexdigest() if self.sha is not None else None)


@dataclass
class _File:
    """The file being written: where its bytes stand in the writer's hands."""

    fd: int
    direct: bool
    size: int = 0  # bytes handed over so far
    written: int = 0  # bytes written to the file (with direct I/O, whole blocks)
    stage: memoryview | None = None  # the staging buffer being filled
    fill: int = 0


class SharedBlock:
    """A buffer whose bytes go to several sinks (one base read, several outputs): it returns
    to its pool once each user has released it."""

    def __init__(self, buffer: Any, pool: queue.Queue[Any], users: int) -> None:
        self.buffer = buffer
        self._pool = pool
        self._users = users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            done = self._users == 0
        if done:
            self._pool.put(self.buffer)


class ShardSink:
    def __init__(self, buffers: list[Any], *, sha256: bool = False, inline: bool = False) -> None:
        """``inline``: no gatherer thread; what it would do is done in the caller's thread as
        each item is handed over, and ``fill`` lets the caller compute bytes straight into the
        staging buffers (no copy). For the CPU device, whose bytes are ready when handed over;
        a staged device's downloads need the gatherer to wait for them."""
        self._sha256 = sha256
        self._inline = inline
        self._file = _File(-1, direct=False)
        self._free: queue.Queue[Any] = queue.Queue()
        self._size = len(buffers)
        for buffer in buffers:
            self._free.put(buffer)
        self._stages: queue.Queue[memoryview] = queue.Queue()
        for _ in range(STAGING_BUFFERS):
            self._stages.put(huge_pages(STAGING_BYTES))  # page-aligned, as direct I/O needs
        self._to_gatherer: queue.Queue[_Item | None] = queue.Queue()
        self._to_writer: queue.Queue[_Item | None] = queue.Queue()
        self._error: BaseException | None = None  # the file's first error, from either thread
        self._threads = [threading.Thread(target=self._write_loop, name="shardmerge-writer", daemon=True)]
        if not inline:
            self._threads.append(threading.Thread(target=self._gather_loop, name="shardmerge-gatherer", daemon=True))
        for thread in self._threads:
            thread.start()

    def reserve(self, sizes: list[int]) -> None:
        """Size every buffer of the pool for blocks of each of ``sizes`` bytes now (the pool
        must be idle)."""
        buffers = [self._free.get() for _ in range(self._size)]
        for buffer in buffers:
            buffer.reserve(sizes)
            self._free.put(buffer)

    def acquire(self) -> Any:
        """A free buffer of the pool; waits while the others are still being gathered."""
        return self._free.get()

    def release(self, buffer: Any) -> None:
        """Give back a buffer from ``acquire()`` that was not handed over."""
        self._free.put(buffer)

    def start(self, fd: int, direct: bool) -> None:
        """Begin a new file: what follows is appended to ``fd`` (empty, opened with O_DIRECT
        when ``direct``) from its start."""
        self._put(("start", fd, direct))

    def write(self, view: memoryview, buffer: Any | None = None) -> None:
        """Append ``view``; ``buffer`` (holding it) returns to the pool once gathered, or, a
        SharedBlock, is released."""
        self._put(("bytes", view, buffer))

    def copy(self, src: int, offset: int, count: int) -> None:
        """Append ``count`` bytes of ``src`` from ``offset``; ``src`` must stay open until
        ``digest()`` or ``discard()`` returns."""
        self._put(("copy", src, offset, count))

    def digest(self) -> Written:
        """Wait until everything handed over is written and hashed; the file's size and hashes,
        or the first error met writing it."""
        reply: queue.Queue[Any] = queue.Queue()
        self._send(("end", reply))
        result = reply.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def discard(self) -> None:
        """Wait until everything handed over is done with, whatever happened to it."""
        reply: queue.Queue[Any] = queue.Queue()
        self._send(("end", reply))
        reply.get()

    def close(self) -> None:
        if self._inline:
            self._to_writer.put(None)
        else:
            self._to_gatherer.put(None)
        for thread in self._threads:
            thread.join()

    def aligned(self, itemsize: int) -> bool:
        """Whether ``fill`` can be given values of ``itemsize`` bytes now: the sink is inline
        and no value would straddle two staging buffers."""
        return self._inline and self._error is None and self._file.fill % itemsize == 0

    def fill(self, nbytes: int, put: Any) -> None:
        """Append ``nbytes`` computed by ``put(offset, room)`` straight into the staging
        buffers: ``room`` (a writable memoryview) is to receive the bytes from ``offset`` on;
        called once per staging buffer the bytes span (inline sinks only, see ``aligned``)."""
        file, done = self._file, 0
        while done < nbytes:
            room = self._room(file)
            count = min(len(room), nbytes - done)
            put(done, room[:count])
            done += count
            self._filled(file, count)

    def _put(self, item: _Item) -> None:
        if self._error is not None:
            raise self._error  # fail fast: the shard is lost already
        self._send(item)

    def _send(self, item: _Item) -> None:
        if self._inline:
            self._handle(item)
        else:
            self._to_gatherer.put(item)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc

    # The gatherer thread.

    def _gather_loop(self) -> None:
        while (item := self._to_gatherer.get()) is not None:
            self._handle(item)
        self._to_writer.put(None)

    def _handle(self, item: _Item) -> None:
        """One item handed over: gathered (in the gatherer thread, or inline)."""
        file = self._file
        kind = item[0]
        try:
            if kind == "start":
                self._file = _File(item[1], item[2])
            elif kind == "end":
                if file.stage is not None:  # the last, partial buffer
                    self._to_writer.put(("stage", file, file.stage, file.fill, True))
                    file.stage = None
                self._to_writer.put(("end", item[1], file.size))
            elif self._error is None and kind == "bytes":
                if isinstance(item[2], Buffer):
                    item[2].settle()  # a device's copy into it has arrived
                self._append(file, item[1])
            elif self._error is None:
                self._append_range(file, item[1], item[2], item[3])
        except BaseException as exc:  # handed to the caller by digest()
            self._fail(exc)
        finally:
            if kind == "bytes" and isinstance(item[2], SharedBlock):
                item[2].release()
            elif kind == "bytes" and item[2] is not None:
                item[2].settle()  # reused only once no copy into it is in flight
                self._free.put(item[2])

    def _room(self, file: _File) -> memoryview:
        """The free part of the staging buffer being filled (taking a fresh one if need be)."""
        if file.stage is None:
            file.stage, file.fill = self._stages.get(), 0
        return memoryview(file.stage)[file.fill :]

    def _append(self, file: _File, view: memoryview) -> None:
        source = np.frombuffer(view, np.uint8)
        while source.size:
            room = self._room(file)
            count = min(len(room), source.size)
            np.frombuffer(room, np.uint8, count)[:] = source[:count]  # numpy copies without the GIL
            source = source[count:]
            self._filled(file, count)

    def _append_range(self, file: _File, src: int, offset: int, count: int) -> None:
        end = offset + count
        while offset < end:
            room = self._room(file)
            step = min(len(room), end - offset)
            pread_into(src, room[:step], offset)
            offset += step
            self._filled(file, step)

    def _filled(self, file: _File, count: int) -> None:
        file.fill += count
        file.size += count
        if file.fill == STAGING_BYTES:
            self._to_writer.put(("stage", file, file.stage, file.fill, False))
            file.stage = None

    # The writer thread.

    def _write_loop(self) -> None:
        hashes = _Hashes(self._sha256)
        while (item := self._to_writer.get()) is not None:
            if item[0] == "end":
                _, reply, size = item
                error, self._error = self._error, None  # clean before the caller goes on
                reply.put(error if error is not None else hashes.written(size))
                hashes = _Hashes(self._sha256)
                continue
            _, file, stage, fill, last = item
            try:
                if self._error is None:
                    self._write(file, stage, fill, last)
                    hashes.update(memoryview(stage)[:fill])
            except BaseException as exc:  # handed to the caller by digest()
                self._fail(exc)
            finally:
                self._stages.put(stage)

    def _write(self, file: _File, stage: memoryview, fill: int, last: bool) -> None:
        """Write a staging buffer's ``fill`` bytes. Direct I/O writes whole blocks: the last,
        partial one is padded with zeros, then the file cut to its size."""
        length = fill
        if file.direct and last:
            length = -(-fill // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
            stage[fill:length] = bytes(length - fill)
        data = memoryview(stage)[:length]
        if file.direct:
            try:
                pwrite_all(file.fd, data, file.written)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The file system took O_DIRECT at open but refuses the write: go buffered,
                # writing the same bytes at the same offset again.
                flags = fcntl.fcntl(file.fd, fcntl.F_GETFL)
                fcntl.fcntl(file.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                file.direct = False
                data = data[:fill]
        if not file.direct:
            pwrite_all(file.fd, data, file.written)
            # Start writing these bytes back to disk now, behind the next ones, so the
            # shard's fsync finds little left to do.
            os.posix_fadvise(file.fd, file.written, len(data), os.POSIX_FADV_DONTNEED)
        file.written += len(data)
        if file.written != file.size and last:
            os.ftruncate(file.fd, file.size)
