"""Merging a weight whose scales lie on a grid over its values, one stored value an element
(FP8 today): read the base block and its scales, dequantize in float32, apply every op, then
round once to the output dtype, or requantize once with new scales as the format's
reference quantizer does.

A requantized block has whole scale blocks of rows, and its new scales come from the merged
values: found before the weight is written where they precede it in the shard (the weight is
merged once more, unwritten), or block by block as it is written where they follow it.
Merged blocks are requantized and measured piece by piece of columns (about WIDEN_CHUNK
values, whole scale blocks wide).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..codecs.base import QuantFormat
from ..formats.confined import open_input
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import pread_into
from ..formats.safetensors import numel
from ..planning.model import QuantRead, TensorPlan
from ..tuning import WIDEN_CHUNK
from .blocks import Block, read_blocks, row_blocks
from .buffers import HOST, Buffer
from .codecs import kernel_of
from .codecs.fp8 import (
    KERNEL,
    combine,
    dequantize_into,
    largest,
    quantize_into,
    scale_columns,
    scale_rows,
    scales_for,
)
from .context import MergeContext
from .factors import AdapterFactors, Factors
from .kernels import all_finite, apply_lora_columns, by_columns


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
    def format(self) -> QuantFormat:
        return self.read.format

    @property
    def requantized(self) -> bool:
        return self.factor is not None or self.streamed is not None

    def rows(self, scales: torch.Tensor, block: Block) -> torch.Tensor:
        span = scale_rows(self.format, block.first, block.last) if block.span else None
        return scales if span is None else scales[..., span[0] : span[1], :]

    def offset(self, block: Block) -> int:
        """Where ``block`` begins within its first scale row's block of rows."""
        return block.first % self.format.row_step() if block.span else 0


@dataclass(frozen=True)
class Step:
    """One block of a tensor being merged: the tensor, the block, its base bytes (on the
    device, in the source dtype, shaped as the block), the factors read once for the tensor,
    and its scales (None: a float tensor)."""

    tensor: TensorPlan
    block: Block
    source: torch.Tensor
    whole: Factors
    scales: Scales | None = None


class GridMerger:
    """The gridded quantized weights of one job, with buffers of their own."""

    def __init__(self, context: MergeContext, factors: AdapterFactors) -> None:
        self.context = context
        self.factors = factors
        memory = context.place.memory
        # The base scales as read, room to widen FP8 values, the pieces a requantized block is
        # measured in (its codes, three float32 values), the base's values where a block
        # holds NaN or Inf, and the largest magnitudes of merged weights (by name, for their
        # new scales) until the shard is written.
        self.scale_buffer = Buffer(HOST)
        self.widen = Buffer(memory)
        self.codes = Buffer(memory)
        self.pieces = [Buffer(memory) for _ in range(4)]
        self.difference = Buffer(memory)
        self.largest: dict[str, torch.Tensor] = {}

    def begin_shard(self) -> None:
        """Drop what was kept for the last shard's scales."""
        self.largest.clear()

    def reserve(self, quantized: list[TensorPlan]) -> None:
        """Size the buffers for the gridded weights ``quantized``."""
        self.scale_buffer.take(max((t.quant.scale.end - t.quant.scale.begin for t in quantized if t.quant), default=0))
        self.widen.take(4 * WIDEN_CHUNK if quantized else 0)
        merged = [t for t in quantized if t.ops]
        piece = max((numel(_piece_shape(t, b)) for t in merged for b in row_blocks(t)[:1]), default=0)
        self.codes.take(piece)
        for buffer in self.pieces:
            buffer.take(4 * piece)

    def scales(self, fd: int, tensor: TensorPlan) -> Scales:
        """The scales of quantized weight ``tensor``, read from ``fd``: the base's, and the new
        ones if it is requantized."""
        read = tensor.quant
        assert read is not None and kernel_of(read.format) is KERNEL, "only FP8 is merged on its grid here"
        raw = self.scale_buffer.take(read.scale.end - read.scale.begin)
        scale_fd = open_input(read.scale.source)
        try:
            pread_into(scale_fd, memoryview(raw.numpy()), read.scale.begin)
        finally:
            os.close(scale_fd)
        dtype = TORCH_DTYPES[read.scale.dtype]
        base = raw.view(dtype).reshape(read.scale.shape).to(self.context.device, copy=True)
        scales = Scales(read, base)
        if tensor.requantized:
            if tensor.scales_follow and tensor.name not in self.largest:
                scales.streamed = []
            else:
                scales.stored, scales.factor = scales_for(self._largest_of(fd, tensor, scales), read.format, dtype)
        return scales

    def finish(self, tensor: TensorPlan, scales: Scales) -> None:
        """``tensor`` is written: keep its streamed largest magnitudes for its new scales."""
        if scales.streamed is not None:
            self.largest[tensor.name] = combine(scales.streamed, scales.format)

    def write_scale(self, fd: int, tensor: TensorPlan, weight: TensorPlan) -> None:
        """Write the new scales of the merged ``weight``, which ``fd`` holds."""
        scales = self.scales(fd, weight)
        assert scales.stored is not None
        sink = self.context.sink
        output = sink.acquire()
        stored = output.tensor(TORCH_DTYPES[tensor.dtype], tensor.shape)
        stored.copy_(scales.stored.reshape(tensor.shape))
        sink.write(memoryview(stored.view(torch.uint8).numpy()).cast("B"), output)

    def merge_block(self, step: Step) -> tuple[memoryview, Buffer]:
        """Block ``step.block`` of a quantized weight: requantized, or dequantized and rounded
        to the output dtype."""
        scales, tensor = step.scales, step.tensor
        assert scales is not None
        if _columns(tensor):
            return self._requantized(step, None)
        value = self.value(step)
        if scales.requantized:
            return self._requantized(step, value)
        context = self.context
        data, output, rounded = context.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])
        if not all_finite(rounded):
            base = self._base_value(step)
            context.non_finite(tensor, base, rounded, lambda: context.merge_cause(tensor, value, step.whole))
        if context.still_unchanged(tensor, step.block.first):
            context.note_unchanged(tensor, self._same_as_dequantized(rounded, step))
        return data, output

    def value(self, step: Step) -> torch.Tensor:
        """The float32 value of the block: the base's dequantized, every op applied."""
        scales, block = step.scales, step.block
        assert scales is not None
        value = self.context.work.tensor(torch.float32, block.shape)
        rows, offset = scales.rows(scales.base, block), scales.offset(block)
        dequantize_into(value, step.source, rows, scales.format, self._scratch(), offset)
        return self.factors.apply(value, step.tensor, step.whole, block.span)

    def _largest_of(self, fd: int, tensor: TensorPlan, scales: Scales) -> torch.Tensor:
        """The largest magnitudes of merged weight ``tensor`` per new scale, merging it once
        from ``fd`` without writing (its scales precede it in the file); kept until the shard
        is written."""
        if tensor.name not in self.largest:
            whole = self.factors.whole(tensor)
            parts = []
            blocks = row_blocks(tensor)
            for block, source in zip(blocks, read_blocks(self.context.reads, fd, tensor, blocks), strict=True):
                step = Step(tensor, block, source.reshape(block.shape), whole, scales)
                value = self.value(step)
                self._check_merged(value, step)
                parts.append(largest(value, scales.format))
            self.largest[tensor.name] = combine(parts, scales.format)
        return self.largest[tensor.name]

    def _requantized(self, step: Step, value: torch.Tensor | None) -> tuple[memoryview, Buffer]:
        """The block requantized: ``value``, the merged block, or None to merge it piece by
        piece of its columns (see ``_columns``), so that no float32 copy of the whole block is
        held. Each piece is requantized with the new scales (found from it where they are
        streamed) and measured."""
        tensor, block, scales, context = step.tensor, step.block, step.scales, self.context
        assert scales is not None
        fmt = scales.format
        output = context.sink.acquire()
        host = output.tensor(TORCH_DTYPES[tensor.dtype], block.shape)
        target = host if context.rounded is None else context.rounded.tensor(host.dtype, block.shape)
        new: tuple[torch.Tensor, torch.Tensor] | None = None  # the block's new scales, where known
        if value is not None:
            self._check_merged(value, step)
            new = self._block_scales(scales, block, value)
        elif scales.streamed is None:
            new = self._block_scales(scales, block, None)
        context.requantized.setdefault(tensor.name, [0.0, 0.0, 0.0])  # figures even with no columns
        largest_values = []
        same = context.still_unchanged(tensor, block.first)
        width = _piece_shape(tensor, block)[-1]
        for first in range(0, block.shape[-1], width):
            columns = (first, min(first + width, block.shape[-1]))
            if value is None:
                merged, was = self._merged_piece(step, columns)
                if not all_finite(merged):
                    context.non_finite(
                        tensor, was, merged, lambda piece=merged: context.merge_cause(tensor, piece, step.whole)
                    )
            else:
                merged, was = value[..., columns[0] : columns[1]], self._base_piece(step, columns)
            if new is None:  # streamed, piece by piece: whole scale blocks wide
                largest_values.append(largest(merged, fmt))
                stored, factor = scales_for(largest_values[-1], fmt, TORCH_DTYPES[scales.read.scale.dtype])
            else:
                stored, factor = (_scale_columns(s, fmt, columns) for s in new)
            piece = target[..., columns[0] : columns[1]]
            self._measure_piece(tensor, merged, was, piece, stored, factor, fmt)
            base = step.source[..., columns[0] : columns[1]]
            same = same and torch.equal(piece.view(torch.uint8), base.view(torch.uint8))
        if largest_values:
            assert scales.streamed is not None
            scales.streamed.append(torch.cat(largest_values, dim=-1))
        context.check_requantized(tensor)
        if context.rounded is not None:
            context.place.download(host, target, output)
        if context.still_unchanged(tensor, block.first):
            context.note_unchanged(tensor, same)
        return memoryview(host.view(torch.uint8).numpy()).cast("B"), output

    def _block_scales(
        self, scales: Scales, block: Block, value: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new stored scales and factors of ``block``'s rows: found from ``value``, the
        merged block, where they are streamed, else those found before."""
        if scales.streamed is not None:
            assert value is not None
            scales.streamed.append(largest(value, scales.format))
            return scales_for(scales.streamed[-1], scales.format, TORCH_DTYPES[scales.read.scale.dtype])
        assert scales.stored is not None and scales.factor is not None
        return scales.rows(scales.stored, block), scales.rows(scales.factor, block)

    def _base_piece(self, step: Step, columns: tuple[int, int]) -> torch.Tensor:
        """Columns ``columns`` of the base's block, dequantized into a piece."""
        scales, block = step.scales, step.block
        assert scales is not None
        fmt = scales.format
        shape = (*block.shape[:-1], columns[1] - columns[0])
        codes = self.codes.tensor(torch.uint8, shape).copy_(step.source[..., columns[0] : columns[1]].view(torch.uint8))
        base_scales = _scale_columns(scales.rows(scales.base, block), fmt, columns)
        was = self.pieces[0].tensor(torch.float32, shape)
        return dequantize_into(
            was, codes.view(torch.float8_e4m3fn), base_scales, fmt, self._scratch(), scales.offset(block)
        )

    def _merged_piece(self, step: Step, columns: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``columns`` of the block: the merged float32 value, and the base's."""
        was = self._base_piece(step, columns)
        value = self.pieces[3].tensor(torch.float32, tuple(was.shape)).copy_(was)
        for op, factors in zip(step.tensor.ops, step.whole, strict=True):
            assert factors is not None
            apply_lora_columns(value, op, factors, step.block.span, columns)
        return value, was

    def _measure_piece(
        self,
        tensor: TensorPlan,
        value: torch.Tensor,
        was: torch.Tensor,
        quantized: torch.Tensor,
        stored: torch.Tensor,
        factor: torch.Tensor,
        fmt: QuantFormat,
    ) -> None:
        """Requantize the merged piece ``value`` (scaled in place) into ``quantized``, and
        measure it (see ``MergeContext.measure``)."""
        shape = tuple(value.shape)
        update = torch.sub(value, was, out=self.pieces[1].tensor(torch.float32, shape))
        quantize_into(quantized, value, factor, fmt)
        codes = self.codes.tensor(torch.uint8, shape).copy_(quantized.view(torch.uint8))
        now = dequantize_into(
            self.pieces[2].tensor(torch.float32, shape), codes.view(torch.float8_e4m3fn), stored, fmt, self._scratch()
        )
        self.context.measure(tensor, update, now.sub_(was))

    def _same_as_dequantized(self, rounded: torch.Tensor, step: Step) -> bool:
        """Whether ``rounded``, a merged block, equals the base's values dequantized and
        rounded alike, compared piece by piece."""
        width = _piece_shape(step.tensor, step.block)[-1]
        for first in range(0, step.block.shape[-1], width):
            columns = (first, min(first + width, step.block.shape[-1]))
            was = self._base_piece(step, columns)
            if not torch.equal(rounded[..., columns[0] : columns[1]], was.to(rounded.dtype)):
                return False
        return True

    def _check_merged(self, value: torch.Tensor, step: Step) -> None:
        """A merged float32 block about to be requantized holds no NaN or Inf but the base's."""
        if not all_finite(value):
            context = self.context
            base = self._base_value(step)
            context.non_finite(step.tensor, base, value, lambda: context.merge_cause(step.tensor, value, step.whole))

    def _base_value(self, step: Step) -> torch.Tensor:
        """The base's values of the block as numbers (dequantized into the difference buffer)."""
        scales, block = step.scales, step.block
        assert scales is not None
        base = self.difference.tensor(torch.float32, block.shape)
        rows, offset = scales.rows(scales.base, block), scales.offset(block)
        return dequantize_into(base, step.source, rows, scales.format, self._scratch(), offset)

    def _scratch(self) -> torch.Tensor:
        """Room to widen FP8 values (see ``widen_into``)."""
        return self.widen.tensor(torch.int16, (2 * WIDEN_CHUNK,))


def needs_work(tensor: TensorPlan) -> bool:
    """Whether ``tensor``'s blocks are held whole in float32 (not merged piece by piece)."""
    return not _columns(tensor)


def _piece_shape(tensor: TensorPlan, block: Block) -> tuple[int, ...]:
    """The shape of the pieces a quantized block is worked on in: about WIDEN_CHUNK
    elements, whole scale blocks wide."""
    assert tensor.quant is not None
    fmt = tensor.quant.format
    step = fmt.block[1] if fmt.strategy == "block" and fmt.block else 1
    *lead, cols = block.shape
    rows = numel(tuple(lead))
    return (*lead, min(cols, max(step, WIDEN_CHUNK // max(rows, 1) // step * step)))


def _columns(tensor: TensorPlan) -> bool:
    """Whether quantized weight ``tensor`` is requantized piece by piece of columns, never
    held as whole rows in float32: every op is plain LoRA, and its new scales are found one
    scale block at a time as it is written (block scales that follow it). A requantized
    block has whole scale blocks of rows (128 rows of a 28672-wide weight are 14.7 MB of
    float32); a dequantized one needs none, and is merged in blocks of rows as usual."""
    if tensor.quant is None or not tensor.requantized or not by_columns(tensor.ops):
        return False
    return tensor.scales_follow and tensor.quant.format.strategy == "block"


def _scale_columns(scales: torch.Tensor, fmt: QuantFormat, columns: tuple[int, int]) -> torch.Tensor:
    """The columns of ``scales`` (rows of a scale grid) that cover ``columns`` of the weight."""
    span = scale_columns(fmt, *columns)
    return scales if span is None else scales[..., span[0] : span[1]]
