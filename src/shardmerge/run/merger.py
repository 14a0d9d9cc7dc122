"""Merging one tensor: read the base block, apply every op in float32, round once.

``TensorMerger`` holds the reused buffers (the source block, the float32 value, the rounded
output in the sink's pool) and the adapter-factor arenas, all sized from the plan before the
first tensor; ``write_shard`` streams one shard into ``NAME.tmp`` behind a header computed
from the plan, with the sink's threads writing and hashing while the next block is merged.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import DeviceError, NonFiniteError
from ..formats.checkpoint import read_checkpoint_header
from ..formats.confined import open_input
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import open_output, pread_into
from ..formats.quantization import QuantFormat
from ..formats.safetensors import ITEMSIZE, numel
from ..output import journal as journals
from ..output import outdir
from ..planning.model import MergeOp, Plan, QuantRead, ShardPlan, TensorPlan
from ..planning.planner import COPY_CHUNK_BYTES, WIDEN_CHUNK
from .buffers import HOST, Buffer, Memory
from .device import Device, Fill
from .kernels import all_finite, apply_lora_columns, apply_op, by_columns
from .packed_merge import PackedMerger
from .quant import combine, dequantize_into, largest, quantize_into, scale_columns, scale_rows, scales_for
from .sink import ShardSink, Written
from .stop import StopRequest


@contextmanager
def lean_process(device: Device) -> Iterator[None]:
    """This process merges on ``device`` now (see ``Device.activate``): what the interpreter
    holds (torch's modules above all) is frozen, so that the cyclic collector need not walk
    it again at each collection the merge's small objects trigger (about a fifth of a second
    per GiB merged); where the arithmetic runs on the CPU, torch uses one thread. The sink's
    gatherer and writer threads and the kernel's I/O need a core; the merge's products are
    small (rank r) and its conversions memory-bound: a second torch thread gave the same wall
    time for 0.9 s more CPU per 2 GiB."""
    gc.freeze()
    threads = torch.get_num_threads()
    if device.torch.type == "cpu":
        torch.set_num_threads(1)
    try:
        with device.activate():
            yield
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()


@dataclass(frozen=True)
class Block:
    """Rows ``first`` to ``last`` of a tensor: ``span`` (None for the whole tensor), their
    shape, and their bytes ``begin`` to ``end`` in the source file."""

    first: int
    last: int
    span: tuple[int, int] | None
    shape: tuple[int, ...]
    begin: int
    end: int


def row_blocks(tensor: TensorPlan) -> list[Block]:
    """The blocks of rows ``tensor`` is merged in, as the plan fixed them. Those of a fused
    expert tensor merged by expert rows (``TensorPlan.expert_rows``) count rows of all its
    experts' matrices in turn, each block within one expert."""
    if tensor.expert_rows:
        return _expert_blocks(tensor)
    rows = tensor.shape[0] if tensor.shape else 1
    step = max(1, tensor.block_rows or rows)
    row_bytes = (tensor.src_end - tensor.src_begin) // max(tensor.base_rows or rows, 1)
    blocks = []
    for first in range(0, max(rows, 1), step):
        last = min(rows, first + step)
        begin = tensor.src_begin + first * row_bytes
        blocks.append(
            Block(
                first,
                last,
                (first, last) if step < rows else None,
                (last - first, *tensor.shape[1:]) if tensor.shape else (),
                begin,
                begin + (last - first) * row_bytes if tensor.shape else tensor.src_end,
            )
        )
    return blocks


def _expert_blocks(tensor: TensorPlan) -> list[Block]:
    experts, rows, cols = tensor.shape
    step = max(1, tensor.block_rows)
    row_bytes = (tensor.src_end - tensor.src_begin) // (experts * rows)
    blocks = []
    for expert in range(experts):
        for first in range(expert * rows, (expert + 1) * rows, step):
            last = min((expert + 1) * rows, first + step)
            begin = tensor.src_begin + first * row_bytes
            blocks.append(
                Block(first, last, (first, last), (last - first, cols), begin, begin + (last - first) * row_bytes)
            )
    return blocks


class _Arena:
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


@dataclass
class Scales:
    """A quantized weight's scales: the base's (as stored, on the device), and where the
    weight is requantized, the new ones as stored and the float32 factors it is scaled by;
    or, where they are found block by block as the weight is written (``streamed``), the
    largest magnitudes of the blocks so far."""

    read: QuantRead
    base: torch.Tensor
    stored: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    streamed: list[torch.Tensor] | None = None

    @property
    def requantized(self) -> bool:
        return self.factor is not None or self.streamed is not None

    def rows(self, scales: torch.Tensor, block: Block) -> torch.Tensor:
        span = scale_rows(self.read.format, block.first, block.last) if block.span else None
        return scales if span is None else scales[..., span[0] : span[1], :]

    def offset(self, block: Block) -> int:
        """Where ``block`` begins within its first scale row's block of rows."""
        return block.first % self.read.format.row_step() if block.span else 0


class TensorMerger:
    """Computes merged tensors: read the base tensor, apply every op in float32, round once
    (or requantize once, for a quantized weight written back in its format)."""

    def __init__(self, place: Device, plan: Plan, adapters: list[AdapterReader], *, sha256: bool = False) -> None:
        self.place = place  # where the arithmetic runs, and how bytes get there and back
        self.device = place.torch
        self.adapters = adapters
        # The merged quantized weights by name, for their new scales (written in their shard).
        self.weights = {t.name: t for shard in plan.shards for t in shard.tensors if t.quant and t.ops}
        memory = place.memory
        self.read_buffer = Buffer()  # converted tensors' chunks and packed weights' rows
        self.reads = place.reads(self.read_buffer)  # merged blocks, on the device
        self.uploaded = Buffer(memory)  # a block read by a shared pass, on the device (grown there)
        self.work = Buffer(memory)  # the float32 value being merged
        self.rounded = Buffer(memory) if place.staged else None
        self.staging = Buffer()  # adapter tensors as stored, on their way to float32
        self.whole = _Arena(memory)  # the factors read once per tensor
        self.block = _Arena(memory)  # the factors read per block (replacement tensors)
        # Three output buffers: one is written, one hashed, while the next block fills the third.
        # ``sha256``: the shards are published, and the Hub names them by their sha256.
        self.sink = ShardSink([Buffer(place.pinned) for _ in range(3)], sha256=sha256)
        # Tensors holding NaN or Inf that the base already held, kept as they were.
        self.kept_non_finite: set[str] = set()
        # Merged tensors whose output is the base's own values (an update of zero).
        self.unchanged: set[str] = set()
        # Quantized weights: their base scales as read, room to widen FP8 values, the pieces a
        # requantized block is measured in (its FP8 codes, three float32 values), the base's
        # values where a block holds NaN or Inf, and the largest magnitudes of merged weights
        # (by name, for their new scales) until the shard is written.
        self.scale_buffer = Buffer(HOST)
        self.widen = Buffer(memory)
        self.codes = Buffer(memory)
        self.pieces = [Buffer(memory) for _ in range(4)]
        self.difference = Buffer(memory)
        self.largest: dict[str, torch.Tensor] = {}
        # Requantized weights: squared norms of the update, what survived, the rounding error.
        self.requantized: dict[str, list[float]] = {}
        self.packed = PackedMerger(self)

    def begin_shard(self, folder: Path) -> None:
        """A new shard begins, written into ``folder``: drop what was kept for the last one's
        scales."""
        self.largest.clear()
        self.packed.begin_shard(folder)

    def close(self) -> None:
        self.sink.close()
        self.packed.close()

    def reserve(self, shards: tuple[ShardPlan, ...]) -> None:
        """Size every reused buffer for the largest block of ``shards`` at once. Grown as the
        merge went, each would be freed and allocated again larger; the freed blocks stay in
        the allocator's heap, and resident memory would depend on the order of tensor sizes."""
        tensors = [tensor for shard in shards for tensor in shard.tensors]
        needs = [self._needs(tensor) for tensor in tensors]
        try:
            self._reserve(tensors, needs)
        except DeviceError as exc:  # out of memory: name the tensor that needs the most
            if exc.tensor is None and needs:
                exc.tensor = max(zip(needs, tensors, strict=True), key=lambda pair: sum(pair[0]))[1].name
            raise

    def _reserve(self, tensors: list[TensorPlan], needs: list[tuple[int, int, int, int, int, int]]) -> None:
        self.packed.reserve([t for t in tensors if t.quant and t.quant.format.packing])
        source, work, _, staging, whole, block = (max((need[i] for need in needs), default=0) for i in range(6))
        blocks = [need[0] for need, t in zip(needs, tensors, strict=True) if _read_ahead(t)]
        others = max((need[0] for need, t in zip(needs, tensors, strict=True) if not _read_ahead(t)), default=0)
        quantized = [t for t in tensors if t.quant and not t.quant.format.packing]
        self.scale_buffer.take(max((t.quant.scale_end - t.quant.scale_begin for t in quantized if t.quant), default=0))
        self.widen.take(4 * WIDEN_CHUNK if quantized else 0)
        merged = [t for t in quantized if t.ops]
        piece = max((numel(self._piece_shape(t, b)) for t in merged for b in row_blocks(t)[:1]), default=0)
        self.codes.take(piece)
        for buffer in self.pieces:
            buffer.take(4 * piece)
        self.read_buffer.take(others if self.place.staged else source)
        self.reads.reserve(blocks)
        self.work.take(work)
        self.staging.take(staging)
        self.whole.reset(whole)
        self.block.reset(block)
        self.sink.reserve([need[2] for need in needs])

    def _needs(self, tensor: TensorPlan) -> tuple[int, int, int, int, int, int]:
        """Bytes ``tensor`` needs in each buffer: source, work, output, staging, and the two
        factor arenas (whole tensor, per block)."""
        if not tensor.ops and tensor.quant is None:
            if tensor.dtype == tensor.src_dtype or tensor.scale_of:
                return (0, 0, 0, 0, 0, 0)
            chunk = min(COPY_CHUNK_BYTES, tensor.src_end - tensor.src_begin)
            return (chunk, 0, chunk // ITEMSIZE[tensor.src_dtype] * ITEMSIZE[tensor.dtype], 0, 0, 0)
        packed = tensor.quant is not None and tensor.quant.format.packing
        blocks = row_blocks(tensor)
        count = max(numel(block.shape) for block in blocks)
        blocked = 0 < tensor.block_rows < (tensor.shape[0] if tensor.shape else 1)
        if packed:  # spans of the factors' rows: at most a block of one matrix's
            blocks = [Block(0, tensor.block_rows, (0, tensor.block_rows), (), 0, 0)]
        staging, rooms = 0, []
        for per_block in (False, True):
            span = (0, max(block.last - block.first for block in blocks)) if per_block else None
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
            rooms.append(_Arena.room(shapes))
        if packed:
            source, work, output = self.packed.needs(tensor)
            return (source, work, output, staging, rooms[0], rooms[1])
        source = max(block.end - block.begin for block in blocks)
        work = 0 if _columns(tensor) else 4 * count
        return (source, work, count * ITEMSIZE[tensor.dtype], staging, rooms[0], rooms[1])

    def _blocks(self, fd: int, tensor: TensorPlan, blocks: list[Block]) -> Iterator[torch.Tensor]:
        """The base's bytes of each of ``blocks`` of ``tensor`` (read from ``fd``) on the
        device, as its source dtype; zeros for a resized tensor, whose replacement (the
        adapter's whole tensor, at weight 1) makes the base's values irrelevant."""
        reads: list[tuple[int, Fill]] = [
            (block.end - block.begin, _zero if tensor.base_rows else partial(_pread, fd, block.begin))
            for block in blocks
        ]
        for raw in self.reads.blocks(reads):
            yield raw.view(TORCH_DTYPES[tensor.src_dtype])

    def upload(self, source: torch.Tensor) -> torch.Tensor:
        """A block read by the shared pass (host memory), on the device."""
        return self.place.upload(source, self.uploaded)

    def read(self, fd: int, tensor: TensorPlan, begin: int, end: int) -> torch.Tensor:
        raw = self.read_buffer.take(end - begin)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype])

    def merge(self, fd: int, tensor: TensorPlan) -> Iterator[tuple[memoryview, Buffer]]:
        """The output bytes of ``tensor``, read from the source file ``fd``, block by block:
        blocks of rows where every op allows it, else the whole tensor. Each block comes in a
        buffer of the sink's pool that goes back to it once written and hashed."""
        if tensor.quant is not None and tensor.quant.format.packing:
            yield from self.packed.merge(fd, tensor)
            return
        scales = self.scales(fd, tensor)  # first: finding new scales may merge the weight once
        whole = self.whole_factors(tensor)
        blocks = row_blocks(tensor)
        for block, source in zip(blocks, self._blocks(fd, tensor, blocks), strict=True):
            yield self.merge_block(source, tensor, block, whole, scales)
        if scales is not None and scales.streamed is not None:  # for the scales, written next
            self.largest[tensor.name] = combine(scales.streamed, scales.read.format)

    def scales(self, fd: int, tensor: TensorPlan) -> Scales | None:
        """The scales of a quantized weight read from ``fd``: the base's, and the new ones if
        it is requantized."""
        if tensor.quant is None:
            return None
        read = tensor.quant
        raw = self.scale_buffer.take(read.scale_end - read.scale_begin)
        scale_fd = open_input(read.scale_source)
        try:
            pread_into(scale_fd, memoryview(raw.numpy()), read.scale_begin)
        finally:
            os.close(scale_fd)
        base = raw.view(TORCH_DTYPES[read.scale_dtype]).reshape(read.scale_shape).to(self.device, copy=True)
        scales = Scales(read, base)
        if tensor.dtype == tensor.src_dtype:  # requantized
            if tensor.scales_follow and tensor.name not in self.largest:
                scales.streamed = []
            else:
                dtype = TORCH_DTYPES[read.scale_dtype]
                scales.stored, scales.factor = scales_for(self.largest_of(fd, tensor, scales), read.format, dtype)
        return scales

    def largest_of(self, fd: int, tensor: TensorPlan, scales: Scales) -> torch.Tensor:
        """The largest magnitudes of merged weight ``tensor`` per new scale, merging it once
        from ``fd`` without writing (its scales precede it in the file); kept until the shard
        is written."""
        if tensor.name not in self.largest:
            whole = self.whole_factors(tensor)
            parts = []
            blocks = row_blocks(tensor)
            for block, source in zip(blocks, self._blocks(fd, tensor, blocks), strict=True):
                value = self._merged_value(source, tensor, block, whole, scales)
                self._check_merged(value, source, tensor, block, whole, scales)
                parts.append(largest(value, scales.read.format))
            self.largest[tensor.name] = combine(parts, scales.read.format)
        return self.largest[tensor.name]

    def write_scale(self, fd: int, tensor: TensorPlan) -> None:
        """Write the new scales of the merged weight ``tensor.scale_of``, which ``fd`` holds:
        a new scale always lies in its weight's shard."""
        assert tensor.scale_of is not None
        weight = self.weights[tensor.scale_of]
        if weight.quant is not None and weight.quant.format.packing:
            self.packed.write_companion(fd, tensor)
            return
        scales = self.scales(fd, weight)
        assert scales is not None and scales.stored is not None
        output = self.sink.acquire()
        stored = output.tensor(TORCH_DTYPES[tensor.dtype], tensor.shape)
        stored.copy_(scales.stored.reshape(tensor.shape))
        self.sink.write(memoryview(stored.view(torch.uint8).numpy()).cast("B"), output)

    def whole_factors(self, tensor: TensorPlan) -> list[list[torch.Tensor | None] | None]:
        """The factors of each op read once for the whole tensor; None where they are read per
        block (replacement tensors, as large as the base tensor)."""
        blocked = 0 < tensor.block_rows < (tensor.shape[0] if tensor.shape else 1)
        ops = [None if op.kind == "replace" and blocked else op for op in tensor.ops]
        return self._factors(self.whole, ops, None)

    def write_tensor(self, src: int, tensor: TensorPlan) -> None:
        """Write a tensor that needs its own reads: a quantized weight or its new scales."""
        if tensor.scale_of:
            self.write_scale(src, tensor)
        else:
            for block in self.merge(src, tensor):
                self.sink.write(*block)

    def merge_block(
        self,
        source: torch.Tensor,
        tensor: TensorPlan,
        block: Block,
        whole: list[list[torch.Tensor | None] | None],
        scales: Scales | None = None,
    ) -> tuple[memoryview, Buffer]:
        """Block ``block`` of ``tensor`` merged from ``source``, its base bytes."""
        if scales is not None and _columns(tensor):
            return self._requantized(source, tensor, block, whole, scales, None)
        value = self._merged_value(source, tensor, block, whole, scales)
        if scales is not None and scales.requantized:
            return self._requantized(source, tensor, block, whole, scales, value)
        data, output, rounded = self.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])
        if not all_finite(rounded):
            base = self._base_value(source, block, scales)
            self.non_finite(tensor, base, rounded, lambda: self.merge_cause(tensor, value, whole))
        if self.still_unchanged(tensor, block.first):
            if scales is None:
                same = _same_bytes(rounded, source.reshape(block.shape).to(rounded.dtype))
            else:
                same = self._same_as_dequantized(rounded, source, block, tensor, scales)
            self.note_unchanged(tensor, same)
        return data, output

    def _requantized(
        self,
        source: torch.Tensor,
        tensor: TensorPlan,
        block: Block,
        whole: list[list[torch.Tensor | None] | None],
        scales: Scales,
        value: torch.Tensor | None,
    ) -> tuple[memoryview, Buffer]:
        """Block ``block`` of a requantized weight: ``value``, the merged block, or None to
        merge it piece by piece of its columns (see ``_columns``), so that no float32 copy of
        the whole block is held. Each piece is requantized with the new scales (found from it
        where they are streamed) and measured: the squared norms of its update, of what
        survived and of the error are added to ``self.requantized``."""
        fmt = scales.read.format
        output = self.sink.acquire()
        host = output.tensor(TORCH_DTYPES[tensor.dtype], block.shape)
        target = host if self.rounded is None else self.rounded.tensor(host.dtype, block.shape)
        base = source.reshape(block.shape)
        new: tuple[torch.Tensor, torch.Tensor] | None = None  # the block's new scales, where known
        if value is not None:
            self._check_merged(value, source, tensor, block, whole, scales)
            new = self._block_scales(scales, block, value)
        elif scales.streamed is None:
            new = self._block_scales(scales, block, None)
        norms = self.requantized.setdefault(tensor.name, [0.0, 0.0, 0.0])
        largest_values = []
        same = self.still_unchanged(tensor, block.first)
        width = self._piece_shape(tensor, block)[-1]
        for first in range(0, block.shape[-1], width):
            columns = (first, min(first + width, block.shape[-1]))
            if value is None:
                merged, was = self._merged_piece(base, tensor, block, whole, scales, columns)
                if not all_finite(merged):
                    self.non_finite(tensor, was, merged, lambda piece=merged: self.merge_cause(tensor, piece, whole))
            else:
                merged, was = value[..., columns[0] : columns[1]], self._base_piece(base, block, scales, columns)
            if new is None:  # streamed, piece by piece: whole scale blocks wide
                largest_values.append(largest(merged, fmt))
                stored, factor = scales_for(largest_values[-1], fmt, TORCH_DTYPES[scales.read.scale_dtype])
            else:
                stored, factor = (_scale_columns(s, fmt, columns) for s in new)
            piece = target[..., columns[0] : columns[1]]
            for index, square in enumerate(self._measure_piece(merged, was, piece, stored, factor, fmt)):
                norms[index] += square
            same = same and torch.equal(piece.view(torch.uint8), base[..., columns[0] : columns[1]].view(torch.uint8))
        if largest_values:
            assert scales.streamed is not None
            scales.streamed.append(torch.cat(largest_values, dim=-1))
        self.check_requantized(tensor)
        if self.rounded is not None:
            self.place.download(host, target, output)
        if self.still_unchanged(tensor, block.first):
            self.note_unchanged(tensor, same)
        return memoryview(host.view(torch.uint8).numpy()).cast("B"), output

    def _block_scales(
        self, scales: Scales, block: Block, value: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new stored scales and factors of ``block``'s rows: found from ``value``, the
        merged block, where they are streamed, else those found before."""
        if scales.streamed is not None:
            assert value is not None
            scales.streamed.append(largest(value, scales.read.format))
            return scales_for(scales.streamed[-1], scales.read.format, TORCH_DTYPES[scales.read.scale_dtype])
        assert scales.stored is not None and scales.factor is not None
        return scales.rows(scales.stored, block), scales.rows(scales.factor, block)

    def still_unchanged(self, tensor: TensorPlan, first: int) -> bool:
        """Whether a merged tensor may still equal the base at its block beginning at row
        ``first``: once a block differs, no more compares."""
        return bool(tensor.ops) and (first == 0 or tensor.name in self.unchanged)

    def note_unchanged(self, tensor: TensorPlan, same: bool) -> None:
        if same:
            self.unchanged.add(tensor.name)
        else:
            self.unchanged.discard(tensor.name)

    def _base_piece(self, base: torch.Tensor, block: Block, scales: Scales, columns: tuple[int, int]) -> torch.Tensor:
        """Columns ``columns`` of the base's FP8 ``block`` (``base``), dequantized into a piece."""
        fmt = scales.read.format
        shape = (*block.shape[:-1], columns[1] - columns[0])
        codes = self.codes.tensor(torch.uint8, shape).copy_(base[..., columns[0] : columns[1]].view(torch.uint8))
        base_scales = _scale_columns(scales.rows(scales.base, block), fmt, columns)
        was = self.pieces[0].tensor(torch.float32, shape)
        return dequantize_into(
            was, codes.view(torch.float8_e4m3fn), base_scales, fmt, self._scratch(), scales.offset(block)
        )

    def _merged_piece(
        self,
        base: torch.Tensor,
        tensor: TensorPlan,
        block: Block,
        whole: list[list[torch.Tensor | None] | None],
        scales: Scales,
        columns: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``columns`` of a block: the merged float32 value, and the base's."""
        was = self._base_piece(base, block, scales, columns)
        value = self.pieces[3].tensor(torch.float32, tuple(was.shape)).copy_(was)
        for op, factors in zip(tensor.ops, whole, strict=True):
            assert factors is not None
            apply_lora_columns(value, op, factors, block.span, columns)
        return value, was

    def _measure_piece(
        self,
        value: torch.Tensor,
        was: torch.Tensor,
        quantized: torch.Tensor,
        stored: torch.Tensor,
        factor: torch.Tensor,
        fmt: QuantFormat,
    ) -> tuple[float, float, float]:
        """Requantize the merged piece ``value`` (scaled in place) into ``quantized``; the
        squared norms of its update dW, of Q(W + dW) - W and of Q(W + dW) - (W + dW)."""
        shape = tuple(value.shape)
        update = torch.sub(value, was, out=self.pieces[1].tensor(torch.float32, shape))
        quantize_into(quantized, value, factor, fmt)
        codes = self.codes.tensor(torch.uint8, shape).copy_(quantized.view(torch.uint8))
        now = dequantize_into(
            self.pieces[2].tensor(torch.float32, shape), codes.view(torch.float8_e4m3fn), stored, fmt, self._scratch()
        )
        kept = now.sub_(was).view(-1)
        squares = (_square(update.view(-1)), _square(kept))
        return squares[0], squares[1], _square(kept.sub_(update.view(-1)))

    def check_requantized(self, tensor: TensorPlan) -> None:
        """No NaN written by requantizing but the base's own."""
        norms = self.requantized.get(tensor.name, [])
        if not all(math.isfinite(square) for square in norms) and tensor.name not in self.kept_non_finite:
            raise NonFiniteError(
                "requantizing wrote NaN where the merge has none (a scale out of its dtype's range?)",
                tensor=tensor.name,
                hint="write a 16-bit output with --dtype bfloat16",
            )

    def _same_as_dequantized(
        self, rounded: torch.Tensor, source: torch.Tensor, block: Block, tensor: TensorPlan, scales: Scales
    ) -> bool:
        """Whether ``rounded``, a merged block, equals the base's FP8 values dequantized and
        rounded alike, compared piece by piece."""
        base = source.reshape(block.shape)
        width = self._piece_shape(tensor, block)[-1]
        for first in range(0, block.shape[-1], width):
            columns = (first, min(first + width, block.shape[-1]))
            was = self._base_piece(base, block, scales, columns)
            if not torch.equal(rounded[..., columns[0] : columns[1]], was.to(rounded.dtype)):
                return False
        return True

    def _merged_value(
        self,
        source: torch.Tensor,
        tensor: TensorPlan,
        block: Block,
        whole: list[list[torch.Tensor | None] | None],
        scales: Scales | None,
    ) -> torch.Tensor:
        """The float32 value of ``block``: the base's (dequantized where quantized), every op
        applied."""
        value = self.work.tensor(torch.float32, block.shape)
        if scales is None:
            value.copy_(source.reshape(block.shape))
        else:
            quantized = source.reshape(block.shape)
            rows, offset = scales.rows(scales.base, block), scales.offset(block)
            dequantize_into(value, quantized, rows, scales.read.format, self._scratch(), offset)
        if any(factors is None for factors in whole):  # replacement tensors, read block by block
            missing = [op if factors is None else None for op, factors in zip(tensor.ops, whole, strict=True)]
            own = self._factors(self.block, missing, block.span)
            whole = [factors if factors is not None else mine for factors, mine in zip(whole, own, strict=True)]
        for op, factors in zip(tensor.ops, whole, strict=True):
            assert factors is not None
            value = apply_op(value, op, factors, block.span)
        return value

    def _piece_shape(self, tensor: TensorPlan, block: Block) -> tuple[int, ...]:
        """The shape of the pieces a quantized block is worked on in: about WIDEN_CHUNK
        elements, whole scale blocks wide."""
        assert tensor.quant is not None
        fmt = tensor.quant.format
        step = fmt.block[1] if fmt.strategy == "block" and fmt.block else 1
        *lead, cols = block.shape
        rows = numel(tuple(lead))
        return (*lead, min(cols, max(step, WIDEN_CHUNK // max(rows, 1) // step * step)))

    def _scratch(self) -> torch.Tensor:
        """Room to widen FP8 values (see ``widen_into``)."""
        return self.widen.tensor(torch.int16, (2 * WIDEN_CHUNK,))

    def _check_merged(
        self,
        value: torch.Tensor,
        source: torch.Tensor,
        tensor: TensorPlan,
        block: Block,
        whole: list[list[torch.Tensor | None] | None],
        scales: Scales,
    ) -> None:
        """A merged float32 block about to be requantized holds no NaN or Inf but the base's."""
        if not all_finite(value):
            base = self._base_value(source, block, scales)
            self.non_finite(tensor, base, value, lambda: self.merge_cause(tensor, value, whole))

    def _base_value(self, source: torch.Tensor, block: Block, scales: Scales | None) -> torch.Tensor:
        """The base's values of ``block`` as numbers (dequantized into the difference buffer)."""
        if scales is None:
            return source.reshape(block.shape)
        base = self.difference.tensor(torch.float32, block.shape)
        quantized = source.reshape(block.shape)
        rows, offset = scales.rows(scales.base, block), scales.offset(block)
        return dequantize_into(base, quantized, rows, scales.read.format, self._scratch(), offset)

    def block_factors(self, ops: list[MergeOp | None], rows: tuple[int, int]) -> list[list[torch.Tensor | None] | None]:
        """The factors of ``ops`` read for rows ``rows`` only (replacement tensors)."""
        return self._factors(self.block, ops, rows)

    def _factors(
        self, arena: _Arena, ops: list[MergeOp | None], rows: tuple[int, int] | None
    ) -> list[list[torch.Tensor | None] | None]:
        """In float32 on the device, in ``arena``: the factors of each op (None for None)."""
        keys = [(self.adapters[op.adapter], key) for op in ops if op is not None for key in op.keys if key]
        arena.reset(_Arena.room([reader.shape(key, rows) for reader, key in keys]))
        result: list[list[torch.Tensor | None] | None] = []
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

    def rounded_bytes(self, value: torch.Tensor, dtype: torch.dtype) -> tuple[memoryview, Buffer, torch.Tensor]:
        """``value`` rounded once to ``dtype``, in host memory from the sink's pool, and the
        rounded values where they were computed."""
        output = self.sink.acquire()
        host = output.tensor(dtype, tuple(value.shape))
        if self.rounded is None:
            host.copy_(value)
        else:
            rounded = self.rounded.tensor(dtype, tuple(value.shape))
            rounded.copy_(value)
            self.place.download(host, rounded, output)
        return memoryview(host.view(torch.uint8).numpy()).cast("B"), output, host if self.rounded is None else rounded

    def non_finite(
        self, tensor: TensorPlan, base: torch.Tensor, output: torch.Tensor, cause: Callable[[], str]
    ) -> None:
        """``output`` holds NaN or Inf: kept where the base held them too, else a
        NonFiniteError naming the tensor, the count and ``cause()``."""
        bad = ~torch.isfinite(output)
        new = int((bad & torch.isfinite(base.to(output.device))).sum())
        if new:
            raise NonFiniteError(
                f"{new} values would be NaN or Inf in the output ({cause()})",
                tensor=tensor.name,
                hint="nothing of this shard was kept",
            )
        self.kept_non_finite.add(tensor.name)

    def merge_cause(
        self, tensor: TensorPlan, value: torch.Tensor, whole: list[list[torch.Tensor | None] | None]
    ) -> str:
        if all_finite(value):
            return _out_of_range(tensor)
        culprits = sorted(
            {
                op.adapter
                for op, factors in zip(tensor.ops, whole, strict=True)
                if any(factor is not None and not all_finite(factor) for factor in factors or ())
            }
        )
        if culprits:
            return f"non-finite values in adapter {', '.join(map(str, culprits))}: a diverged training run?"
        return "the merge overflowed float32: the adapter's update is far larger than the weights"

    def convert(self, src: int, tensor: TensorPlan) -> None:
        """Copy a tensor that only changes dtype, through one bounded buffer."""
        itemsize = ITEMSIZE[tensor.src_dtype]
        step = COPY_CHUNK_BYTES // itemsize * itemsize
        for begin in range(tensor.src_begin, tensor.src_end, step):
            self.convert_chunk(self.read(src, tensor, begin, min(begin + step, tensor.src_end)), tensor)

    def convert_chunk(self, chunk: torch.Tensor, tensor: TensorPlan) -> None:
        """Write ``chunk``, values of ``tensor`` in their source dtype, in the output dtype."""
        output = self.sink.acquire()
        converted = output.tensor(TORCH_DTYPES[tensor.dtype], tuple(chunk.shape))
        converted.copy_(chunk)
        if not all_finite(converted):
            self.non_finite(tensor, chunk, converted, lambda: _out_of_range(tensor))
        self.sink.write(memoryview(converted.view(torch.uint8).numpy()).cast("B"), output)

    def write_shard(
        self, shard: ShardPlan, folder: Path, progress: tqdm, stop: StopRequest, attempt: str = ""
    ) -> journals.ShardRecord:
        """Write one shard as ``NAME.tmp`` (``NAME.ATTEMPT.tmp``) and fsync it; a failure
        removes the temp file."""
        final = folder / shard.name
        tmp = outdir.tmp_path(final, attempt)
        header = shard.header_bytes()
        try:
            with ExitStack() as stack:
                src = open_input(shard.source)
                stack.callback(os.close, src)
                dst, direct = open_output(tmp)
                stack.callback(os.close, dst)
                stack.callback(self.sink.discard)  # first: the sink may still use both files
                progress.set_postfix_str(shard.name, refresh=False)
                self.begin_shard(folder)
                self.sink.start(dst, direct)
                self.sink.write(memoryview(header))
                progress.update(len(header))
                for tensor in shard.tensors:
                    stop.check()
                    if tensor.ops or tensor.quant or tensor.scale_of:
                        with self.naming(tensor):
                            self.write_tensor(src, tensor)
                    elif tensor.dtype == tensor.src_dtype:
                        self.sink.copy(src, tensor.src_begin, tensor.src_end - tensor.src_begin)
                    else:
                        self.convert(src, tensor)
                    progress.update(tensor.end - tensor.begin)
                written = self.sink.digest()
                os.fsync(dst)
                # The bytes are on disk: hand their cache pages back now, so later shards
                # reuse them instead of growing the page cache by the size of the model.
                os.posix_fadvise(dst, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(final)  # writes through a descriptor name no file
            if isinstance(exc, NonFiniteError) and exc.file is None:
                exc.file = str(final)
            raise
        return self.record(shard, written, header)

    @contextmanager
    def naming(self, tensor: TensorPlan) -> Iterator[None]:
        """A device's failure while ``tensor`` is merged (out of memory in one of torch's
        temporaries or a grown buffer, a CUDA library's error): one line naming the tensor, the
        device and the way out."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError, by its older name
            raise self.place.out_of_memory(exc, tensor.name) from None
        except DeviceError as exc:  # a buffer grown for this tensor
            exc.tensor = exc.tensor or tensor.name
            raise
        except _ACCELERATOR_ERROR as exc:  # a CUDA library's failure (cuBLAS, say)
            raise self.place.failed(exc, tensor.name) from None

    def record(self, shard: ShardPlan, written: Written, header: bytes) -> journals.ShardRecord:
        """The journal's record of ``shard``, as ``written``."""
        names = [tensor.name for tensor in shard.tensors]
        return journals.ShardRecord(
            written.size,
            written.xxh3_128,
            hashlib.sha256(header).hexdigest(),
            merged=tuple(tensor.name for tensor in shard.tensors if tensor.ops),
            converted=tuple(t.name for t in shard.tensors if not t.ops and t.dtype != t.src_dtype),
            unchanged=tuple(name for name in names if name in self.unchanged),
            non_finite_kept=tuple(name for name in names if name in self.kept_non_finite),
            sha256=written.sha256,
            # a weight whose NaN or Inf came from the base has no figures: reported apart
            requantized=tuple(
                (name, *self.requantized[name])
                for name in names
                if name in self.requantized and all(map(math.isfinite, self.requantized[name]))
            ),
            device=self.place.name,
        )


# What torch raises for a failed CUDA call since 2.8 (a RuntimeError before, left as it is).
_ACCELERATOR_ERROR: type[BaseException] | tuple[()] = getattr(torch, "AcceleratorError", ())


def _read_ahead(tensor: TensorPlan) -> bool:
    """Whether ``tensor``'s blocks are read through the merger's ``reads`` (onto the device):
    every merged or dequantized tensor but a packed weight, which reads its own rows."""
    packed = tensor.quant is not None and bool(tensor.quant.format.packing)
    return bool(tensor.ops or tensor.quant) and not packed and not tensor.scale_of


def _pread(fd: int, begin: int, raw: torch.Tensor) -> None:
    pread_into(fd, memoryview(raw.numpy()), begin)


def _zero(raw: torch.Tensor) -> None:
    raw.zero_()


def _columns(tensor: TensorPlan) -> bool:
    """Whether quantized weight ``tensor`` is requantized piece by piece of columns, never
    held as whole rows in float32: every op is plain LoRA, and its new scales are found one
    scale block at a time as it is written (block scales that follow it). A requantized
    block has whole scale blocks of rows (128 rows of a 28672-wide weight are 14.7 MB of
    float32); a dequantized one needs none, and is merged in blocks of rows as usual."""
    if tensor.quant is None or tensor.dtype != tensor.src_dtype or not by_columns(tensor.ops):
        return False
    return tensor.scales_follow and tensor.quant.format.strategy == "block"


def _scale_columns(scales: torch.Tensor, fmt: QuantFormat, columns: tuple[int, int]) -> torch.Tensor:
    """The columns of ``scales`` (rows of a scale grid) that cover ``columns`` of the weight."""
    span = scale_columns(fmt, *columns)
    return scales if span is None else scales[..., span[0] : span[1]]


def _square(values: torch.Tensor) -> float:
    """The squared norm of ``values`` (a flat float32 tensor)."""
    return float(torch.dot(values, values))


def _same_bytes(output: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether the bytes of ``output`` are those of ``base`` (same device and dtype), compared
    as the widest integers that divide them: no temporary, about 10 GB/s."""
    ours = output.contiguous().view(-1).view(torch.uint8)
    theirs = base.contiguous().view(-1).view(torch.uint8)
    if ours.numel() != theirs.numel():
        return False
    wide = next(
        dtype for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) if ours.numel() % dtype.itemsize == 0
    )
    return torch.equal(ours.view(wide), theirs.view(wide))


def _out_of_range(tensor: TensorPlan) -> str:
    return f"out of range for {tensor.dtype}: choose --dtype bfloat16 or float32"


def open_adapters(plan: Plan, stack: ExitStack) -> list[AdapterReader]:
    readers = []
    for adapter in plan.adapters:
        reader = AdapterReader(adapter.weights_file)
        stack.callback(reader.close)
        readers.append(reader)
    return readers
