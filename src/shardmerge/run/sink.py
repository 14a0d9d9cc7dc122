"""Where a shard's bytes go once computed: a writer thread and a hasher thread, in order.

The caller (reading and merging tensors) hands over blocks of bytes and kernel-side copies;
the writer appends them to the shard file and starts their writeback to disk, then passes
them to the hasher, which computes the shard's xxh3-128 for the journal (about 25 GB/s on
one core) and, when the shard will be published, its sha256 (the Hub's LFS object id, about
1.7 GB/s). Both release the GIL. So reading, merging, writing and hashing overlap, and no
shard is read back to hash it. Blocks travel in buffers of a small pool that return to it
once hashed: that pool bounds the memory in flight.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import xxhash

from ..formats.fileio import copy_range, pread_into, write_all
from ..planning.planner import HASH_CHUNK_BYTES

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
    def __init__(self, buffers: list[Any], *, sha256: bool = False) -> None:
        self._sha256 = sha256
        self._free: queue.Queue[Any] = queue.Queue()
        self._size = len(buffers)
        for buffer in buffers:
            self._free.put(buffer)
        self._to_writer: queue.Queue[_Item | None] = queue.Queue()
        self._to_hasher: queue.Queue[_Item | None] = queue.Queue()
        self._write_error: BaseException | None = None
        self._hash_error: BaseException | None = None
        self._scratch = bytearray(HASH_CHUNK_BYTES)
        self._threads = [
            threading.Thread(target=self._write_loop, name="shardmerge-writer", daemon=True),
            threading.Thread(target=self._hash_loop, name="shardmerge-hasher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def reserve(self, nbytes: int) -> None:
        """Size every buffer of the pool for ``nbytes`` now (the pool must be idle)."""
        buffers = [self._free.get() for _ in range(self._size)]
        for buffer in buffers:
            buffer.take(nbytes)
            self._free.put(buffer)

    def acquire(self) -> Any:
        """A free buffer of the pool; waits while the others are still being written or hashed."""
        return self._free.get()

    def release(self, buffer: Any) -> None:
        """Give back a buffer from ``acquire()`` that was not handed over."""
        self._free.put(buffer)

    def start(self, fd: int) -> None:
        """Begin a new file: what follows is appended to ``fd`` from its start."""
        self._put(("start", fd))

    def write(self, view: memoryview, buffer: Any | None = None) -> None:
        """Append ``view``; ``buffer`` (holding it) returns to the pool once written and hashed,
        or, a SharedBlock, is released."""
        self._put(("bytes", view, buffer))

    def copy(self, src: int, offset: int, count: int) -> None:
        """Append ``count`` bytes of ``src`` from ``offset`` by a kernel-side copy; ``src`` must
        stay open until ``digest()`` or ``discard()`` returns."""
        self._put(("copy", src, offset, count))

    def digest(self) -> Written:
        """Wait until everything handed over is written and hashed; the file's size and hashes,
        or the first error the writer or hasher met."""
        reply: queue.Queue[Any] = queue.Queue()
        self._to_writer.put(("end", reply))
        result = reply.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def discard(self) -> None:
        """Wait until everything handed over is done with, whatever happened to it."""
        reply: queue.Queue[Any] = queue.Queue()
        self._to_writer.put(("end", reply))
        reply.get()

    def close(self) -> None:
        self._to_writer.put(None)
        for thread in self._threads:
            thread.join()

    def _put(self, item: _Item) -> None:
        if self._write_error is not None:
            raise self._write_error  # fail fast: the shard is lost already
        self._to_writer.put(item)

    def _write_loop(self) -> None:
        fd, position = -1, 0
        while (item := self._to_writer.get()) is not None:
            kind = item[0]
            try:
                if kind == "start":
                    fd, position, self._write_error = item[1], 0, None
                elif kind == "end":
                    item = (*item, self._write_error, position)
                elif self._write_error is None:
                    count = item[1].nbytes if kind == "bytes" else item[3]
                    if kind == "bytes":
                        write_all(fd, item[1])
                    else:
                        copy_range(item[1], fd, item[2], count)
                    # Start writing these bytes back to disk now, behind the next ones, so
                    # the shard's fsync finds little left to do.
                    os.posix_fadvise(fd, position, count, os.POSIX_FADV_DONTNEED)
                    position += count
            except BaseException as exc:  # handed to the caller by digest()
                self._write_error = exc
            self._to_hasher.put(item)
        self._to_hasher.put(None)

    def _hash_loop(self) -> None:
        hashes = _Hashes(self._sha256)
        while (item := self._to_hasher.get()) is not None:
            kind = item[0]
            try:
                if kind == "end":
                    _, reply, write_error, size = item
                    error, self._hash_error = write_error or self._hash_error, None
                    reply.put(error if error is not None else hashes.written(size))
                    hashes = _Hashes(self._sha256)
                elif kind == "bytes" and self._hash_error is None:
                    hashes.update(item[1])
                elif kind == "copy" and self._hash_error is None:
                    self._hash_range(hashes, item[1], item[2], item[3])
            except BaseException as exc:  # handed to the caller by digest()
                self._hash_error = exc
            finally:
                if kind == "bytes" and isinstance(item[2], SharedBlock):
                    item[2].release()
                elif kind == "bytes" and item[2] is not None:
                    self._free.put(item[2])

    def _hash_range(self, hashes: _Hashes, fd: int, offset: int, count: int) -> None:
        end = offset + count
        while offset < end:
            view = memoryview(self._scratch)[: min(len(self._scratch), end - offset)]
            pread_into(fd, view, offset)
            hashes.update(view)
            offset += len(view)
