"""Merging a packed weight (several values to a stored element: MXFP4, packed integers):
read and dequantize a block of rows in float32, apply every op, then round once to the
output dtype, or requantize once as the format's reference quantizer does. The arithmetic is
the codec's kernel (``run/codecs``); this driver reads, merges and writes.

A packed weight is worked on one matrix (one expert) at a time, in blocks of its rows in the
orientation it is computed in: the stored one when it is requantized (its new companions,
scales and zero points, are those of the same rows, kept until their tensors are written),
the model's when it is dequantized. A transposed expert is read whole (its packed bytes) and
dequantized a scale block of stored columns at a time, each piece the next rows of the
model's parameter.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import torch

from ..formats.confined import open_input
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import pread_into
from ..planning.model import QuantRead, Stored, TensorPlan
from .buffers import Buffer
from .codecs.base import PackedKernel, PackedReader, reader_of
from .context import MergeContext
from .factors import AdapterFactors, Factors
from .kernels import all_finite


class PackedMerger:
    """The packed weights of one job, with buffers of their own."""

    def __init__(self, context: MergeContext, factors: AdapterFactors, weights: dict[str, TensorPlan]) -> None:
        self.context = context
        self.factors = factors
        self.weights = weights  # the requantized weights by name, for their companions
        self.device = context.device
        memory = context.place.memory
        self.companions: list[Buffer] = []  # a block's companions as stored, one buffer each
        self.was = Buffer(memory)  # the base's values
        self.update = Buffer(memory)
        self.unpack = Buffer(memory)  # room to unpack and round: 6 bytes a value
        self.packed = Buffer(memory)  # a requantized block's codes, where the device is not the host
        self.scratch = Buffer()  # a requantized block computed only for its companions
        # New companions of requantized weights until they are written, block by block in an
        # unnamed file (``spill``, opened when first needed) in the folder of the shard being
        # written (``folder``; a 128-expert tensor's scales are 66 MB): by weight name and
        # companion, their pieces there (offset, bytes); and the weights whose are written.
        self.folder: Path | None = None
        self.spill: BinaryIO | None = None
        self.new: dict[str, dict[int, list[tuple[int, int]]]] = {}
        self.written: set[str] = set()
        # The merged weights' largest magnitudes where a scale covers a whole weight (or the
        # weights that share it), found in a first pass and kept until the shard ends (a
        # weight merged twice, once for its companions, needs it twice).
        self.largest: dict[tuple[str, ...], torch.Tensor] = {}

    def needs(self, tensor: TensorPlan) -> tuple[int, int, int]:
        """Bytes of source, float32 work and output a block of ``tensor`` needs at most."""
        _, _, _, source, count = tensor.packed_block()
        if tensor.requantized:
            return source, 4 * count, source
        return source, 4 * count, count * TORCH_DTYPES[tensor.dtype].itemsize

    def reserve(self, tensors: list[TensorPlan]) -> None:
        for tensor in tensors:
            read = tensor.quant
            assert read is not None
            source, work, _ = self.needs(tensor)
            self.was.take(work)
            if tensor.requantized:  # the update, for the report
                self.update.take(work)
                self.packed.take(source if self.context.place.staged else 0)
            self.unpack.take(6 * work // 4)  # see _room
            experts, rows, _ = read.matrices
            height = min(rows, tensor.block_rows)
            self.companions += [Buffer() for _ in range(len(read.companions) - len(self.companions))]
            for index, companion in enumerate(read.companions):
                # the scales of a whole matrix (a transposed one is read whole); the others'
                # rows covering a block's, one more where they start mid-row
                lines = _lines(companion)
                if index:
                    lines = min(lines, -(-height * lines // rows) + 1)
                self.companions[index].take(lines * _row_bytes(companion, experts))

    def merge(self, fd: int, tensor: TensorPlan, *, write: bool = True) -> Iterator[tuple[memoryview, Buffer]]:
        """The output bytes of packed weight ``tensor`` read from ``fd``, block by block."""
        read = tensor.quant
        assert read is not None
        weight = _Weight(fd, tensor, self.factors.whole(tensor), reader_of(read.format))
        experts, _, _ = read.matrices
        rows, _, flipped, _, _ = tensor.packed_block()
        step = max(1, tensor.block_rows)
        collect = (
            self.folder is not None
            and tensor.requantized
            and tensor.name not in self.new
            and tensor.name not in self.written
        )
        if collect:
            self.new[tensor.name] = defaultdict(list)
        with _Files(read, self.companions, self.device) as files:
            if tensor.requantized and weight.writer.whole_scale:
                key = tuple(member.weight.name for member in read.shares) or (tensor.name,)
                if key not in self.largest:
                    self.largest[key] = self._largest(weight, files)
                weight.largest = self.largest[key]
            for expert in range(experts):
                stored = self._read_expert(weight, files, expert) if flipped else None
                for first in range(0, rows, step):
                    span = (first, min(rows, first + step))
                    if tensor.requantized:
                        yield from self._requantized(weight, files, expert, span, write, collect)
                    else:
                        yield self._dequantized(weight, files, expert, span, stored)
        if tensor.requantized:
            self.context.check_requantized(tensor)

    def write_companion(self, fd: int, tensor: TensorPlan) -> None:
        """Write a new companion of the requantized weight ``tensor.scale_of`` (merging it
        once first, without writing it, where its companions precede it)."""
        assert tensor.scale_of is not None
        weight = self.weights[tensor.scale_of]
        if weight.name not in self.new:
            for _ in self.merge(fd, weight, write=False):
                pass
        assert weight.quant is not None
        index = [companion.name for companion in weight.quant.companions].index(tensor.name)
        kept = self.new[weight.name]
        assert self.spill is not None
        for offset, size in kept.pop(index):  # block by block: their rows follow one another
            self.context.sink.copy(self.spill.fileno(), offset, size)
        if not kept:  # every new companion of the weight is written
            del self.new[weight.name]
            self.written.add(weight.name)

    def begin_shard(self, folder: Path | None) -> None:
        """A new shard begins, written into ``folder`` (None: no new companions are kept)."""
        self.close()
        self.new.clear()
        self.written.clear()
        self.largest.clear()
        self.folder = folder

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None

    def _keep(self, weight: str, index: int, rows: torch.Tensor) -> None:
        """Append the new rows of companion ``index`` of ``weight`` to the spill file."""
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(dir=self.folder)  # noqa: SIM115 (open until the shard ends)
        data = rows.cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        offset = self.spill.seek(0, os.SEEK_END)
        self.spill.write(data)
        self.spill.flush()
        self.new[weight][index].append((offset, len(data)))

    def _room(self, values: int) -> torch.Tensor:
        """Room to unpack or round ``values`` values (6 bytes each at most)."""
        return self.unpack.take(6 * values)

    def _rows(self, weight: _Weight, expert: int, span: tuple[int, int]) -> torch.Tensor:
        """Stored rows ``span`` of one expert's packed values, as stored."""
        tensor, read = weight.tensor, weight.read
        experts, rows, _ = read.matrices
        row_bytes = (tensor.src_end - tensor.src_begin) // (experts * rows)
        begin = tensor.src_begin + (expert * rows + span[0]) * row_bytes
        raw = self.context.read_buffer.take((span[1] - span[0]) * row_bytes)
        pread_into(weight.fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype]).view(span[1] - span[0], -1).to(self.device)

    def _companions(
        self, weight: _Weight, files: _Files, expert: int, span: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        """The companions of one expert's stored rows ``span``, as the kernel takes them."""
        read = weight.read

        def rows(index: int, lines: tuple[int, int] | None) -> torch.Tensor:
            return files.rows(index, expert, lines)

        return tuple(weight.kernel.companion_rows(read.format, i, span, rows) for i in range(len(read.companions)))

    def _read_expert(
        self, weight: _Weight, files: _Files, expert: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One expert's packed values and companions, whole."""
        whole = (0, weight.read.matrices[1])
        return self._rows(weight, expert, whole), self._companions(weight, files, expert, whole)

    def _base(
        self, weight: _Weight, files: _Files, expert: int, span: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The base's float32 values of stored rows ``span`` (in the ``was`` buffer), and what
        they were read from: the packed values, then their companions."""
        read = weight.read
        out = self.was.tensor(torch.float32, (span[1] - span[0], read.matrices[2]))
        packed = self._rows(weight, expert, span)
        companions = self._companions(weight, files, expert, span)
        base = weight.kernel.dequantize(read.format, out, packed, companions, self._room(out.numel()))
        return base, (packed, *companions)

    def _dequantized(
        self,
        weight: _Weight,
        files: _Files,
        expert: int,
        span: tuple[int, int],
        stored: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None,
    ) -> tuple[memoryview, Buffer]:
        """Rows ``span`` of one expert, in the model's orientation, merged and rounded to the
        output dtype; ``stored``: the expert's packed values and companions where that
        orientation is the transpose of theirs."""
        tensor, whole, context = weight.tensor, weight.whole, self.context
        rows, cols, _, _, _ = tensor.packed_block()
        value = context.work.tensor(torch.float32, (span[1] - span[0], cols))
        if stored is None:
            base, _ = self._base(weight, files, expert, span)
        else:  # stored columns ``span`` of a transposed expert: the model's rows
            piece = self.was.tensor(torch.float32, (cols, span[1] - span[0]))
            packed, companions = _columns(weight.read, stored, span)
            base = weight.kernel.dequantize(weight.read.format, piece, packed, companions, self._room(piece.numel())).T
        value.copy_(base)
        value = self.factors.apply(value, tensor, whole, span, (expert, False))
        data, output, rounded = context.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])
        if not all_finite(rounded):
            context.non_finite(tensor, base, rounded, lambda: context.merge_cause(tensor, value, whole))
        if context.still_unchanged(tensor, expert * rows + span[0]):
            context.note_unchanged(tensor, torch.equal(rounded, base.to(rounded.dtype)))
        return data, output

    def _largest(self, weight: _Weight, files: _Files) -> torch.Tensor:
        """The largest magnitude of the merged weight, or of every weight it must share its
        scale of the whole weight with (each merged if it has ops), merging each once without
        writing; the weight's own factors read again after the others'."""
        shares = weight.read.shares
        if not shares:
            return self._largest_of(weight, files)
        largest = torch.zeros((), device=self.device)
        for member in shares:
            plan = self.weights[member.weight.name]
            assert plan.quant is not None
            tensor = dataclasses.replace(plan, quant=dataclasses.replace(plan.quant, companions=member.companions))
            fd = open_input(member.weight.source)
            try:
                other = _Weight(fd, tensor, self.factors.whole(tensor), weight.kernel)
                with _Files(other.read, self.companions, self.device) as theirs:
                    largest = torch.maximum(largest, self._largest_of(other, theirs))
            finally:
                os.close(fd)
        weight.whole = self.factors.whole(weight.tensor)
        return largest

    def _largest_of(self, weight: _Weight, files: _Files) -> torch.Tensor:
        """The largest magnitude of the merged weight, merging it once without writing."""
        experts, rows, _ = weight.read.matrices
        step = max(1, weight.tensor.block_rows)
        largest = torch.zeros((), device=self.device)
        for expert in range(experts):
            for first in range(0, rows, step):
                _, value, _ = self._merged(weight, files, expert, (first, min(rows, first + step)))
                largest = torch.maximum(largest, torch.maximum(value.amax(), value.amin().neg()))
        return largest

    def _requantized(
        self, weight: _Weight, files: _Files, expert: int, span: tuple[int, int], write: bool, collect: bool
    ) -> Iterator[tuple[memoryview, Buffer]]:
        """Stored rows ``span`` of one expert merged and requantized (nothing yielded unless
        ``write``); with ``collect``, their new companions kept for their tensors; measured
        where written and merged (a weight requantized only for the scale it shares with a
        merged one has no update to measure)."""
        tensor, read, context = weight.tensor, weight.read, self.context
        was, value, source = self._merged(weight, files, expert, span)
        measured = write and bool(tensor.ops)
        update = torch.sub(value, was, out=self.update.tensor(torch.float32, tuple(was.shape))) if measured else None
        output = context.sink.acquire() if write else None
        host = (output or self.scratch).tensor(TORCH_DTYPES[tensor.src_dtype], tuple(source[0].shape))
        staged = context.place.staged
        packed = self.packed.tensor(host.dtype, tuple(host.shape)) if staged else host
        scale_dtype = TORCH_DTYPES[read.scale.dtype]
        room = self._room(value.numel())
        fresh = weight.writer.quantize(read.format, value, packed, scale_dtype, room, weight.largest)
        if update is not None:
            now = weight.kernel.dequantize(read.format, value, packed, fresh, self._room(value.numel()))
            context.measure(tensor, update, now.sub_(was))
        if staged and output is not None:
            context.place.download(host, packed, output)
        if collect:
            for index, rows in enumerate(weight.writer.written(read.format, fresh)):
                if not (self.new[tensor.name][index] and math.prod(read.companions[index].shape) == 1):  # once
                    self._keep(tensor.name, index, rows)
        if not write:
            return
        assert output is not None
        if context.still_unchanged(tensor, expert * read.matrices[1] + span[0]):
            pairs = zip((packed, *fresh), source, strict=True)
            same = all(torch.equal(mine.flatten(), theirs.flatten()) for mine, theirs in pairs)
            context.note_unchanged(tensor, same)
        yield memoryview(host.view(torch.uint8).numpy()).cast("B"), output

    def _merged(
        self, weight: _Weight, files: _Files, expert: int, span: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Stored rows ``span`` of one expert: the base's float32 values, the merged values
        (in the work buffer, checked finite but for the base's own NaN and Inf), and what they
        were read from."""
        tensor, whole, context = weight.tensor, weight.whole, self.context
        was, source = self._base(weight, files, expert, span)
        value = context.work.tensor(torch.float32, tuple(was.shape)).copy_(was)
        value = self.factors.apply(value, tensor, whole, span, (expert, weight.read.transposed))
        if not all_finite(value):
            context.non_finite(tensor, was, value, lambda: context.merge_cause(tensor, value, whole))
        return was, value, source


@dataclass
class _Weight:
    """A packed weight being merged: its source file, its plan, the factors of its ops read
    once, its codec's arithmetic, and where a scale covers the whole weight, the merged
    weight's largest magnitude."""

    fd: int
    tensor: TensorPlan
    whole: Factors
    kernel: PackedReader
    largest: torch.Tensor | None = None

    @property
    def writer(self) -> PackedKernel:
        """The kernel of a requantized weight (its codec writes: the planner says so)."""
        return cast(PackedKernel, self.kernel)

    @property
    def read(self) -> QuantRead:
        assert self.tensor.quant is not None
        return self.tensor.quant


def _lines(companion: Stored) -> int:
    """The rows of a companion (of one expert's matrix where it has experts): a vector's
    elements are its rows, one number is one row."""
    shape = companion.shape
    return shape[-2] if len(shape) > 1 else shape[0] if shape else 1


def _row_bytes(companion: Stored, experts: int) -> int:
    """Bytes of one row of a companion (see ``_lines``)."""
    lines = _lines(companion)
    return (companion.end - companion.begin) // (experts * lines if len(companion.shape) > 2 else lines)


def _columns(
    read: QuantRead, stored: tuple[torch.Tensor, tuple[torch.Tensor, ...]], span: tuple[int, int]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Stored columns ``span`` (whole scale blocks) of an expert's packed values and companions."""
    fmt = read.format
    packed, companions = stored
    per = packed.element_size() * 8 // fmt.bits  # values a stored element holds
    group = fmt.block[1] if fmt.block else read.matrices[2]
    narrow = packed[:, span[0] // per : span[1] // per]
    return narrow, tuple(c[:, span[0] // group : -(-span[1] // group)] for c in companions)


class _Files:
    """The companion files of a packed weight, open while it is merged."""

    def __init__(self, read: QuantRead, buffers: list[Buffer], device: torch.device) -> None:
        self.read = read
        buffers += [Buffer() for _ in range(len(read.companions) - len(buffers))]  # one a companion
        self.buffers = buffers
        self.device = device
        self.fds: list[int] = []

    def __enter__(self) -> _Files:
        for companion in self.read.companions:
            self.fds.append(open_input(companion.source))
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self.fds:
            os.close(fd)

    def rows(self, index: int, expert: int, lines: tuple[int, int] | None) -> torch.Tensor:
        """Rows ``lines`` of companion ``index`` (of ``expert``'s matrix; None: all), as stored."""
        companion = self.read.companions[index]
        if lines is None:
            lines = (0, _lines(companion))
        experts = self.read.matrices[0]
        row_bytes = _row_bytes(companion, experts)
        first = (expert * _lines(companion) if len(companion.shape) > 2 else 0) + lines[0]
        raw = self.buffers[index].take((lines[1] - lines[0]) * row_bytes)
        pread_into(self.fds[index], memoryview(raw.numpy()), companion.begin + first * row_bytes)
        return raw.view(TORCH_DTYPES[companion.dtype]).view(lines[1] - lines[0], -1).to(self.device)
