"""sha256 of a shard on a second thread, fed the same bytes as they are written.

hashlib releases the GIL on large buffers, so hashing (about 1.7 GB/s on one core) runs
beside reading, merging and writing instead of after them. Bytes handed over in a pooled
buffer go back to the pool once hashed; that pool is what bounds the memory in flight.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any

from .planner import HASH_CHUNK_BYTES
from .st_io import pread_into


class BackgroundHasher:
    def __init__(self, buffers: list[Any]) -> None:
        self._free: queue.Queue[Any] = queue.Queue()
        for buffer in buffers:
            self._free.put(buffer)
        self._todo: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._sha = hashlib.sha256()
        self._error: BaseException | None = None
        self._scratch = bytearray(HASH_CHUNK_BYTES)
        self._thread = threading.Thread(target=self._run, name="shardmerge-hasher", daemon=True)
        self._thread.start()

    def acquire(self) -> Any:
        """A free buffer of the pool; waits while both are still being written or hashed."""
        return self._free.get()

    def release(self, buffer: Any) -> None:
        """Give back a buffer from ``acquire()`` that was not handed over for hashing."""
        self._free.put(buffer)

    def update(self, view: memoryview, buffer: Any | None = None) -> None:
        self._todo.put(("bytes", view, buffer))

    def update_from_file(self, fd: int, offset: int, count: int) -> None:
        """Hash ``count`` bytes of ``fd`` from ``offset``; ``fd`` must stay open until
        ``digest()`` or ``discard()`` returns."""
        self._todo.put(("file", fd, offset, count))

    def digest(self) -> str:
        """The sha256 of everything since the last digest; starts the next stream."""
        reply: queue.Queue[str | BaseException] = queue.Queue()
        self._todo.put(("digest", reply))
        result = reply.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def discard(self) -> None:
        """Wait for everything handed over, drop it, and start a new stream."""
        reply: queue.Queue[str | BaseException] = queue.Queue()
        self._todo.put(("discard", reply))
        reply.get()

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            kind = item[0]
            if kind in ("digest", "discard"):
                error, self._error = self._error, None
                result = self._sha.hexdigest() if error is None else error
                self._sha = hashlib.sha256()
                item[1].put(result if kind == "digest" else "")
                continue
            try:
                if self._error is None:
                    self._hash(item)
            except BaseException as exc:  # handed to the caller by digest()
                self._error = exc
            finally:
                if kind == "bytes" and item[2] is not None:
                    self._free.put(item[2])

    def _hash(self, item: tuple[Any, ...]) -> None:
        if item[0] == "bytes":
            self._sha.update(item[1])
            return
        _, fd, offset, count = item
        end = offset + count
        while offset < end:
            view = memoryview(self._scratch)[: min(HASH_CHUNK_BYTES, end - offset)]
            pread_into(fd, view, offset)
            self._sha.update(view)
            offset += len(view)
