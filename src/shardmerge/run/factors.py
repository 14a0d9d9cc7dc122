"""The adapters' factors of a tensor in float32 on the device: read once per tensor, or per
block where they are as large as the tensor (replacement tensors), into reused arenas; and
applied to a float32 value.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import torch

from ..formats.checkpoint import read_checkpoint_header
from ..formats.confined import open_input
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import pread_into
from ..formats.safetensors import ITEMSIZE, numel
from ..planning.model import MergeOp, Plan, TensorPlan
from .buffers import Buffer, Memory
from .kernels import apply_op, for_expert

# The factors of each op of a tensor (None: read block by block), each a list (None for an
# absent optional factor).
Factors = list[list[torch.Tensor | None] | None]


class Arena:
    """Tensors carved one after another from one reused buffer, all given back at once: the
    float32 adapter factors of one tensor (or block), replaced by the next one's. Fresh
    tensors instead would leave the allocator's heap fragmented, and resident memory would
    grow with the number of tensors merged."""

    _ALIGN = 64

    def __init__(self, memory: Memory) -> None:
        self.buffer = Buffer(memory)
        self.used = 0

    def reset(self, nbytes: int) -> None:
        """Start over, with room for ``nbytes`` (padding included)."""
        self.buffer.take(nbytes)
        self.used = 0

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        begin = self.used
        self.used = begin + self._slot(shape)
        return self.buffer.buffer[begin : begin + numel(shape) * 4].view(torch.float32).reshape(shape)

    @classmethod
    def room(cls, shapes: list[tuple[int, ...]]) -> int:
        return sum(cls._slot(shape) for shape in shapes)

    @classmethod
    def _slot(cls, shape: tuple[int, ...]) -> int:
        """Bytes a float32 tensor of ``shape`` takes in the arena, padded to the alignment."""
        return -(-numel(shape) * 4 // cls._ALIGN) * cls._ALIGN


class AdapterReader:
    """Reads adapter tensors with pread, not mmap: pages of a mapped file stay resident and
    count against memory, so a large adapter would grow the footprint as the merge went on."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tensors = read_checkpoint_header(Path(path)).tensors
        self.fd = open_input(path)

    def shape(self, key: str, rows: tuple[int, int] | None = None) -> tuple[int, ...]:
        shape = self.tensors[key].shape
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    def get_tensor(self, key: str, rows: tuple[int, int] | None, into: Buffer) -> torch.Tensor:
        """Tensor ``key``, or only rows ``rows`` of it, read into the reused buffer ``into``."""
        info = self.tensors[key]
        begin, end = info.begin, info.end
        if rows is not None:
            row_bytes = (end - begin) // info.shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        raw = into.take(end - begin)
        pread_into(self.fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[info.dtype]).reshape(self.shape(key, rows))

    def close(self) -> None:
        os.close(self.fd)


def open_adapters(plan: Plan, stack: ExitStack) -> list[AdapterReader]:
    readers = []
    for adapter in plan.adapters:
        reader = AdapterReader(adapter.weights_file)
        stack.callback(reader.close)
        readers.append(reader)
    return readers


class AdapterFactors:
    """Reads the factors of a tensor's ops into two arenas (whole tensor, per block), through
    one staging buffer for them as stored."""

    def __init__(self, memory: Memory, adapters: list[AdapterReader]) -> None:
        self.adapters = adapters
        self.staging = Buffer()  # adapter tensors as stored, on their way to float32
        self.whole_arena = Arena(memory)  # the factors read once per tensor
        self.block_arena = Arena(memory)  # the factors read per block (replacement tensors)

    def needs(self, tensor: TensorPlan, height: int) -> tuple[int, int, int]:
        """Bytes of staging, whole-tensor arena and per-block arena ``tensor`` needs, its
        blocks at most ``height`` rows."""
        blocked = _blocked(tensor)
        staging, rooms = 0, []
        for per_block in (False, True):
            span = (0, height) if per_block else None
            keys = [
                (self.adapters[op.adapter], key)
                for op in tensor.ops
                if (op.kind == "replace" and blocked) == per_block
                for key in op.keys
                if key
            ]
            shapes = [reader.shape(key, span) for reader, key in keys]
            sizes = [
                numel(shape) * ITEMSIZE[reader.tensors[key].dtype]
                for shape, (reader, key) in zip(shapes, keys, strict=True)
            ]
            staging = max([staging, *sizes])
            rooms.append(Arena.room(shapes))
        return staging, rooms[0], rooms[1]

    def reserve(self, staging: int, whole: int, block: int) -> None:
        self.staging.take(staging)
        self.whole_arena.reset(whole)
        self.block_arena.reset(block)

    def whole(self, tensor: TensorPlan) -> Factors:
        """The factors of each op read once for the whole tensor; None where they are read per
        block (replacement tensors, as large as the base tensor)."""
        blocked = _blocked(tensor)
        return self._read(
            self.whole_arena, [None if op.kind == "replace" and blocked else op for op in tensor.ops], None
        )

    def apply(
        self,
        value: torch.Tensor,
        tensor: TensorPlan,
        whole: Factors,
        rows: tuple[int, int] | None,
        expert: tuple[int, bool] | None = None,
    ) -> torch.Tensor:
        """Every op of ``tensor`` applied to ``value``, its rows ``rows`` (None: all), the
        factors read per block read now. ``expert``: one expert's matrix of a packed weight
        (its index, and whether ``value`` is the transpose of the model's)."""
        if any(factors is None for factors in whole):  # replacement tensors, read block by block
            assert rows is not None
            missing = [op if factors is None else None for op, factors in zip(tensor.ops, whole, strict=True)]
            own = self._read(self.block_arena, missing, rows)
            whole = [factors if factors is not None else mine for factors, mine in zip(whole, own, strict=True)]
        for op, factors in zip(tensor.ops, whole, strict=True):
            assert factors is not None
            value = apply_op(value, op if expert is None else for_expert(op, *expert), factors, rows)
        return value

    def _read(self, arena: Arena, ops: list[MergeOp | None], rows: tuple[int, int] | None) -> Factors:
        """In float32 on the device, in ``arena``: the factors of each op (None for None)."""
        keys = [(self.adapters[op.adapter], key) for op in ops if op is not None for key in op.keys if key]
        arena.reset(Arena.room([reader.shape(key, rows) for reader, key in keys]))
        result: Factors = []
        for op in ops:
            if op is None:
                result.append(None)
                continue
            reader = self.adapters[op.adapter]
            factors: list[torch.Tensor | None] = []
            for key in op.keys:
                if not key:
                    factors.append(None)
                    continue
                factor = arena.tensor(reader.shape(key, rows))
                factor.copy_(reader.get_tensor(key, rows, self.staging))
                factors.append(factor)
            result.append(factors)
        return result


def _blocked(tensor: TensorPlan) -> bool:
    """Whether ``tensor`` is merged in blocks of fewer rows than it has."""
    return 0 < tensor.block_rows < (tensor.shape[0] if tensor.shape else 1)
