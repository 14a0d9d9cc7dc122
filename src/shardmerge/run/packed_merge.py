"""Merging a packed weight (MXFP4, packed integers): read and dequantize a block of rows in
float32, apply every op, then round once to the output dtype, or requantize once as the
format's reference quantizer does.

A packed weight is worked on one matrix (one expert) at a time, in blocks of its rows in the
orientation it is computed in: the stored one when it is requantized (its new scales and zero
points are those of the same rows, kept until their tensors are written), the model's when
it is dequantized. A transposed MXFP4 expert is read whole (its packed bytes: a sixteenth of
its float32 size) and dequantized 32 stored columns at a time, each piece the next rows of
the model's parameter.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from ..formats.confined import open_input
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import pread_into
from ..planning.model import MergeOp, QuantRead, TensorPlan
from .buffers import Buffer
from .device import Device
from .kernels import all_finite, apply_op, for_expert
from .packed import (
    int_dequantize,
    int_pack,
    int_quantize,
    int_values,
    mxfp4_quantize,
    mxfp4_values,
    pack_zero_rows,
    zero_rows,
)
from .sink import ShardSink

Factors = list[list[torch.Tensor | None] | None]


class Merger(Protocol):
    """What a packed weight's merge uses of the TensorMerger that owns it."""

    place: Device
    device: torch.device
    read_buffer: Buffer
    work: Buffer
    sink: ShardSink
    weights: dict[str, TensorPlan]
    requantized: dict[str, list[float]]

    def whole_factors(self, tensor: TensorPlan) -> Factors: ...
    def block_factors(self, ops: list[MergeOp | None], rows: tuple[int, int]) -> Factors: ...
    def rounded_bytes(self, value: torch.Tensor, dtype: torch.dtype) -> tuple[memoryview, Buffer, torch.Tensor]: ...
    def non_finite(
        self, tensor: TensorPlan, base: torch.Tensor, output: torch.Tensor, cause: Callable[[], str]
    ) -> None: ...
    def merge_cause(self, tensor: TensorPlan, value: torch.Tensor, whole: Factors) -> str: ...
    def still_unchanged(self, tensor: TensorPlan, first: int) -> bool: ...
    def note_unchanged(self, tensor: TensorPlan, same: bool) -> None: ...
    def check_requantized(self, tensor: TensorPlan) -> None: ...


class PackedMerger:
    """The packed weights of one TensorMerger, with buffers of their own."""

    def __init__(self, merger: Merger) -> None:
        self.merger = merger
        self.device = merger.device
        memory = merger.place.memory
        self.scales = Buffer()
        self.zeros = Buffer()
        self.was = Buffer(memory)  # the base's values
        self.update = Buffer(memory)
        self.unpack = Buffer(memory)  # room to unpack and round: 6 bytes a value
        self.packed = Buffer(memory)  # a requantized block's codes, where the device is not the host
        self.scratch = Buffer()  # a requantized block computed only for its scales
        # New scales and zero points of requantized weights until they are written, block by
        # block in an unnamed file (``spill``, opened when first needed) in the folder of the
        # shard being written (``folder``; a 128-expert tensor's are 66 MB): by weight name,
        # their pieces there (offset, bytes); and the weights whose new tensors are written.
        self.folder: Path | None = None
        self.spill: BinaryIO | None = None
        self.new: dict[str, dict[str, list[tuple[int, int]]]] = {}
        self.written: set[str] = set()

    def needs(self, tensor: TensorPlan) -> tuple[int, int, int]:
        """Bytes of source, float32 work and output a block of ``tensor`` needs at most."""
        _, _, _, source, count = tensor.packed_block()
        if tensor.dtype == tensor.src_dtype:
            return source, 4 * count, source
        return source, 4 * count, count * TORCH_DTYPES[tensor.dtype].itemsize

    def reserve(self, tensors: list[TensorPlan]) -> None:
        for tensor in tensors:
            assert tensor.quant is not None
            source, work, _ = self.needs(tensor)
            self.was.take(work)
            if tensor.dtype == tensor.src_dtype:  # requantized: the update, for the report
                self.update.take(work)
                self.packed.take(source if self.merger.place.staged else 0)
            self.unpack.take(6 * work // 4)  # see _room
            experts, rows, _ = tensor.quant.matrices
            self.scales.take((tensor.quant.scale_end - tensor.quant.scale_begin) // (experts * rows) * rows)
            zero = tensor.quant.zero
            if zero is not None:  # the words of a block's rows, one more where it starts mid-word
                words = -(-min(rows, tensor.block_rows) * tensor.quant.format.bits // 32) + 1
                self.zeros.take(min(words, zero.shape[0]) * (zero.end - zero.begin) // zero.shape[0])

    def merge(self, fd: int, tensor: TensorPlan, *, write: bool = True) -> Iterator[tuple[memoryview, Buffer]]:
        """The output bytes of packed weight ``tensor`` read from ``fd``, block by block."""
        read = tensor.quant
        assert read is not None
        whole = self.merger.whole_factors(tensor)
        experts, _, _ = read.matrices
        rows, _, flipped, _, _ = tensor.packed_block()
        step = max(1, tensor.block_rows)
        collect = (
            self.folder is not None
            and tensor.dtype == tensor.src_dtype
            and tensor.name not in self.new
            and tensor.name not in self.written
        )
        if collect:
            self.new[tensor.name] = defaultdict(list)
        with _Files(read) as files:
            weight = _Weight(fd, tensor, files, whole)
            for expert in range(experts):
                stored = self._read_expert(weight, expert) if flipped else None
                for first in range(0, rows, step):
                    span = (first, min(rows, first + step))
                    if tensor.dtype == tensor.src_dtype:
                        yield from self._requantized(weight, expert, span, write, collect)
                    else:
                        yield self._dequantized(weight, expert, span, stored)
        if tensor.dtype == tensor.src_dtype:
            self.merger.check_requantized(tensor)

    def write_companion(self, fd: int, tensor: TensorPlan) -> None:
        """Write the new scales or zero points of the requantized weight ``tensor.scale_of``
        (merging it once first, without writing it, where they precede it)."""
        assert tensor.scale_of is not None
        weight = self.merger.weights[tensor.scale_of]
        if weight.name not in self.new:
            for _ in self.merge(fd, weight, write=False):
                pass
        kind = "scale" if weight.quant is not None and tensor.name == weight.quant.scale else "zero"
        kept = self.new[weight.name]
        assert self.spill is not None
        for offset, size in kept.pop(kind):  # block by block: their rows follow one another
            self.merger.sink.copy(self.spill.fileno(), offset, size)
        if not kept:  # every new tensor of the weight is written
            del self.new[weight.name]
            self.written.add(weight.name)

    def begin_shard(self, folder: Path | None) -> None:
        """A new shard begins, written into ``folder`` (None: nothing is kept for new scales)."""
        self.close()
        self.new.clear()
        self.written.clear()
        self.folder = folder

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None

    def _keep(self, weight: str, kind: str, rows: torch.Tensor) -> None:
        """Append the new ``kind`` rows of ``weight`` to the spill file."""
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(dir=self.folder)  # noqa: SIM115 (open until the shard ends)
        data = rows.cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        offset = self.spill.seek(0, os.SEEK_END)
        self.spill.write(data)
        self.spill.flush()
        self.new[weight][kind].append((offset, len(data)))

    def _room(self, values: int) -> torch.Tensor:
        """Room to unpack or round ``values`` values (see ``mxfp4_quantize``)."""
        return self.unpack.take(6 * values)

    # --- reading ------------------------------------------------------------------------

    def _rows(self, fd: int, tensor: TensorPlan, expert: int, span: tuple[int, int]) -> torch.Tensor:
        """Stored rows ``span`` of one expert's packed values, as stored."""
        assert tensor.quant is not None
        experts, rows, _ = tensor.quant.matrices
        row_bytes = (tensor.src_end - tensor.src_begin) // (experts * rows)
        begin = tensor.src_begin + (expert * rows + span[0]) * row_bytes
        raw = self.merger.read_buffer.take((span[1] - span[0]) * row_bytes)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype]).view(span[1] - span[0], -1).to(self.device)

    def _read_expert(self, weight: _Weight, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's packed values and scales, whole."""
        whole = (0, weight.read.matrices[1])
        scales = weight.files.scale_rows(self.scales, expert, whole, self.device)
        return self._rows(weight.fd, weight.tensor, expert, whole), scales

    def _base(
        self, weight: _Weight, expert: int, span: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The base's float32 values of stored rows ``span`` (in the ``was`` buffer), and what
        they were read from: (packed values, scales[, zero points])."""
        read, files = weight.read, weight.files
        cols = read.matrices[2]
        out = self.was.tensor(torch.float32, (span[1] - span[0], cols))
        packed = self._rows(weight.fd, weight.tensor, expert, span)
        scales = files.scale_rows(self.scales, expert, span, self.device)
        if read.format.packing == "mxfp4":
            return mxfp4_values(out, packed.view(torch.uint8), scales, self._room(out.numel())), (packed, scales)
        values = int_values(packed, read.format.bits, cols)
        if read.zero is None:
            return int_dequantize(out, values, scales, None), (packed, scales)
        zeros = files.zero_rows(self.zeros, read.format.bits, span, self.device)
        return int_dequantize(out, values, scales, zeros), (packed, scales, zeros)

    # --- merging -------------------------------------------------------------------------

    def _apply(
        self, value: torch.Tensor, weight: _Weight, expert: int, span: tuple[int, int], stored: bool
    ) -> torch.Tensor:
        """Every op applied to ``value``, rows ``span`` of one expert, in the stored
        orientation (``stored``) or the model's."""
        tensor, whole = weight.tensor, weight.whole
        if any(factors is None for factors in whole):  # replacement tensors, read block by block
            missing = [op if factors is None else None for op, factors in zip(tensor.ops, whole, strict=True)]
            own = self.merger.block_factors(missing, span)
            whole = [factors if factors is not None else mine for factors, mine in zip(whole, own, strict=True)]
        for op, factors in zip(tensor.ops, whole, strict=True):
            assert factors is not None
            value = apply_op(value, for_expert(op, expert, stored and weight.read.transposed), factors, span)
        return value

    def _dequantized(
        self, weight: _Weight, expert: int, span: tuple[int, int], stored: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[memoryview, Buffer]:
        """Rows ``span`` of one expert, in the model's orientation, merged and rounded to the
        output dtype; ``stored``: the expert's packed values and scales where that orientation
        is the transpose of theirs."""
        tensor, whole = weight.tensor, weight.whole
        rows, cols, _, _, _ = tensor.packed_block()
        value = self.merger.work.tensor(torch.float32, (span[1] - span[0], cols))
        if stored is None:
            base, _ = self._base(weight, expert, span)
        else:  # stored columns ``span`` of a transposed expert: the model's rows
            blocks, scales = stored
            piece = self.was.tensor(torch.float32, (cols, span[1] - span[0]))
            base = mxfp4_values(
                piece,
                blocks.view(torch.uint8)[:, span[0] // 2 : span[1] // 2],
                scales[:, span[0] // 32 : -(-span[1] // 32)],
                self._room(piece.numel()),
            ).T
        value.copy_(base)
        value = self._apply(value, weight, expert, span, stored=False)
        data, output, rounded = self.merger.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])
        if not all_finite(rounded):
            self.merger.non_finite(tensor, base, rounded, lambda: self.merger.merge_cause(tensor, value, whole))
        if self.merger.still_unchanged(tensor, expert * rows + span[0]):
            self.merger.note_unchanged(tensor, torch.equal(rounded, base.to(rounded.dtype)))
        return data, output

    def _requantized(
        self, weight: _Weight, expert: int, span: tuple[int, int], write: bool, collect: bool
    ) -> Iterator[tuple[memoryview, Buffer]]:
        """Stored rows ``span`` of one expert merged and requantized (nothing yielded unless
        ``write``); with ``collect``, their new scales (and zero points) kept for their
        tensors; the squared norms of the update, of what survived and of the error added to
        the merger's report."""
        tensor, whole, read = weight.tensor, weight.whole, weight.read
        was, source = self._base(weight, expert, span)
        value = self.merger.work.tensor(torch.float32, tuple(was.shape)).copy_(was)
        value = self._apply(value, weight, expert, span, stored=True)
        if not all_finite(value):
            self.merger.non_finite(tensor, was, value, lambda: self.merger.merge_cause(tensor, value, whole))
        update = torch.sub(value, was, out=self.update.tensor(torch.float32, tuple(was.shape)))
        output = self.merger.sink.acquire() if write else None
        host = (output or self.scratch).tensor(TORCH_DTYPES[tensor.src_dtype], tuple(source[0].shape))
        staged = self.merger.place.staged
        packed = self.packed.tensor(host.dtype, tuple(host.shape)) if staged else host
        if read.format.packing == "mxfp4":
            scales = torch.empty_like(source[1])
            mxfp4_quantize(value, packed.view(torch.uint8), scales, self._room(value.numel()))
            now = mxfp4_values(value, packed.view(torch.uint8), scales, self._room(value.numel()))
            fresh: tuple[torch.Tensor, ...] = (scales,)
        else:
            values, scales, zeros = int_quantize(value, read.format, TORCH_DTYPES[read.scale_dtype])
            int_pack(values, read.format.bits, packed)
            now = int_dequantize(value, values, scales, zeros)
            fresh = (scales,) if zeros is None else (scales, zeros)
        if staged and output is not None:
            self.merger.place.download(host, packed, output)
        if collect:
            self._keep(tensor.name, "scale", scales)
            if len(fresh) > 1:
                self._keep(tensor.name, "zero", pack_zero_rows(fresh[1], read.format.bits))
        if not write:
            return
        assert output is not None
        kept = now.sub_(was).view(-1)
        norms = self.merger.requantized.setdefault(tensor.name, [0.0, 0.0, 0.0])
        flat = update.view(-1)
        norms[0] += float(torch.dot(flat, flat))
        norms[1] += float(torch.dot(kept, kept))
        kept.sub_(flat)
        norms[2] += float(torch.dot(kept, kept))
        rows = read.matrices[1]
        if self.merger.still_unchanged(tensor, expert * rows + span[0]):
            same = all(torch.equal(mine, theirs) for mine, theirs in zip((packed, *fresh), source, strict=True))
            self.merger.note_unchanged(tensor, same)
        yield memoryview(host.view(torch.uint8).numpy()).cast("B"), output


@dataclass(frozen=True)
class _Weight:
    """A packed weight being merged: its source file, its plan, its scale files and the
    factors of its ops read once."""

    fd: int
    tensor: TensorPlan
    files: _Files
    whole: Factors

    @property
    def read(self) -> QuantRead:
        assert self.tensor.quant is not None
        return self.tensor.quant


class _Files:
    """The scale (and zero-point) files of a packed weight, open while it is merged."""

    def __init__(self, read: QuantRead) -> None:
        self.read = read
        self.fds: list[int] = []

    def __enter__(self) -> _Files:
        self.scale_fd = self._open(self.read.scale_source)
        self.zero_fd = self._open(self.read.zero.source) if self.read.zero is not None else -1
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self.fds:
            os.close(fd)

    def _open(self, path: str) -> int:
        fd = open_input(path)
        self.fds.append(fd)
        return fd

    def scale_rows(self, into: Buffer, expert: int, span: tuple[int, int], device: torch.device) -> torch.Tensor:
        read = self.read
        experts, rows, _ = read.matrices
        row_bytes = (read.scale_end - read.scale_begin) // (experts * rows)
        raw = into.take((span[1] - span[0]) * row_bytes)
        pread_into(self.scale_fd, memoryview(raw.numpy()), read.scale_begin + (expert * rows + span[0]) * row_bytes)
        return raw.view(TORCH_DTYPES[read.scale_dtype]).view(span[1] - span[0], -1).to(device)

    def zero_rows(self, into: Buffer, bits: int, span: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Zero points of rows ``span``."""
        zero = self.read.zero
        assert zero is not None
        per = 32 // bits
        row_bytes = (zero.end - zero.begin) // zero.shape[0]
        first, last = span[0] // per, -(-span[1] // per)
        raw = into.take((last - first) * row_bytes)
        pread_into(self.zero_fd, memoryview(raw.numpy()), zero.begin + first * row_bytes)
        words = raw.view(torch.int32).view(last - first, -1).to(device)
        skip = span[0] - first * per
        return zero_rows(words, bits, (last - first) * per)[skip : skip + span[1] - span[0]]
