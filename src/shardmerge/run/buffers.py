"""Reusable host and device buffers."""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

import torch

from ..formats.safetensors import numel


class Memory(Protocol):
    """Where a buffer's bytes live: host memory (pageable or locked) or a device's; at most
    ``largest`` bytes a buffer (more go to pageable host memory)."""

    @property
    def largest(self) -> int: ...

    def empty(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` uninitialised bytes (a flat uint8 tensor)."""
        ...

    def free(self, tensor: torch.Tensor) -> None:
        """Give back a tensor from ``empty`` (it is not used again)."""
        ...


HUGE_PAGE = 2 * 1024 * 1024


def huge_pages(nbytes: int) -> memoryview:
    """``nbytes`` of anonymous memory aligned to, and backed by, transparent huge pages where
    the kernel gives them (``madvise`` mode): each 4 KiB page of a large buffer costs a TLB
    miss per pass over it, dearer still in a virtual machine (a two-level page walk)."""
    whole = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with suppress(AttributeError, OSError):
        whole.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(whole)
    address = ctypes.addressof(ctypes.c_char.from_buffer(whole))
    begin = -address % HUGE_PAGE
    return view[begin : begin + nbytes]


class HostMemory:
    """Plain (pageable) host memory; buffers of a huge page or more in huge pages."""

    largest = sys.maxsize

    def empty(self, nbytes: int) -> torch.Tensor:
        if nbytes < HUGE_PAGE:
            return torch.empty(nbytes, dtype=torch.uint8)
        return torch.frombuffer(huge_pages(nbytes), dtype=torch.uint8)

    def free(self, tensor: torch.Tensor) -> None:
        del tensor


HOST = HostMemory()


class Buffer:
    """A reusable buffer, grown to the largest request and never shrunk. Fresh tensors per
    weight would cost more than the merge: the allocator returns large blocks to the kernel,
    and faulting them in again runs at a fraction of memory speed.

    Requests larger than the memory's ``largest`` are served from a second, pageable buffer
    (``spill``), so that the usual blocks keep their memory (locked, say) beside one whole
    tensor that an op needs at once.

    ``ready``: set while a device still copies into the buffer (a download in flight); whoever
    reads the bytes calls ``settle()`` first."""

    def __init__(self, memory: Memory = HOST) -> None:
        self.memory = memory
        self.buffer = memory.empty(0)
        self.spill = HOST.empty(0)
        self.ready: Callable[[], None] | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.memory.largest:
            if nbytes > self.spill.numel():
                self.spill = HOST.empty(0)  # the old one first
                self.spill = HOST.empty(nbytes)
            return self.spill[:nbytes]
        if nbytes > self.buffer.numel():
            self.memory.free(self.buffer)  # the old one first
            self.buffer = self.memory.empty(0)
            self.buffer = self.memory.empty(nbytes)
        return self.buffer[:nbytes]

    def reserve(self, sizes: list[int]) -> None:
        """Size the buffer for each of ``sizes`` at once."""
        self.take(max((size for size in sizes if size <= self.memory.largest), default=0))
        self.take(max(sizes, default=0))

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.take(numel(shape) * dtype.itemsize).view(dtype).reshape(shape)

    def settle(self) -> None:
        """Wait until the bytes copied into the buffer have arrived."""
        if self.ready is not None:
            ready, self.ready = self.ready, None
            ready()
