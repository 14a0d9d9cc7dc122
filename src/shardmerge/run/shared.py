"""One read of the base, several outputs: a shard written for every job of a shared-base pass.

Jobs that merge into the same base with the same dtype and device lay out their shards alike:
the same files, the same tensors at the same source offsets. Each tensor is read once, in
segments (the merge blocks the plans fixed, or copy chunks), and every job takes what it
needs from the segment: its merge, its dtype conversion, or the bytes as they are, written
from the one buffer by every job's sink. A job that fails is dropped from the pass with its
temp file; the others go on.
"""

from __future__ import annotations

import os
import queue
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ShardmergeError
from ..formats.confined import open_input
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import open_output, pread_into
from ..formats.safetensors import ITEMSIZE
from ..output import outdir
from ..output.journal import ShardRecord
from ..planning.model import Action, ShardPlan, TensorPlan
from ..tuning import COPY_CHUNK_BYTES
from .blocks import Block, row_blocks
from .buffers import Buffer, Memory
from .merger import TensorMerger
from .shard_writer import record
from .sink import SharedBlock
from .stop import StopRequest

_POOL = 3  # segment buffers: one being read and merged, two still being written


@dataclass
class Output:
    """One job's copy of the shard: where it goes, and how it ended."""

    merger: TensorMerger
    shard: ShardPlan
    folder: Path
    attempt: str = ""  # names this writer's temp file (cluster tasks)
    dst: int = -1
    header: bytes = b""
    record: ShardRecord | None = None
    error: BaseException | None = None

    @property
    def tmp(self) -> Path:
        return outdir.tmp_path(self.folder / self.shard.name, self.attempt)


class SegmentReader:
    """Reads segments of base tensors into a small pool of reused host buffers."""

    def __init__(self, memory: Memory) -> None:
        self.pool: queue.Queue[Buffer] = queue.Queue()
        for _ in range(_POOL):
            self.pool.put(Buffer(memory))

    def read(self, fd: int, begin: int, end: int) -> tuple[torch.Tensor, object]:
        buffer = self.pool.get()
        raw = buffer.take(end - begin)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw, buffer


def write_together(outputs: list[Output], reader: SegmentReader, progress: tqdm, stop: StopRequest) -> None:
    """Write every output's copy of one base shard, reading the base once. Sets each output's
    ``record``, or its ``error`` (its temp file then removed)."""
    try:
        with ExitStack() as stack:
            src = open_input(outputs[0].shard.source)
            stack.callback(os.close, src)
            progress.set_postfix_str(f"{outputs[0].shard.name} x{len(outputs)}", refresh=False)
            for output in outputs:
                _begin(output)
            for index in range(len(outputs[0].shard.tensors)):
                stop.check()
                live = [output for output in outputs if output.error is None]
                if not live:
                    break
                _tensor(src, [(output, output.shard.tensors[index]) for output in live], reader)
                progress.update(sum(out.shard.tensors[index].end - out.shard.tensors[index].begin for out in live))
            for output in outputs:
                if output.error is None:
                    _end(output)
    except BaseException:
        for output in outputs:
            if output.error is None and output.dst >= 0:
                _fail(output, None)
        raise


def _begin(output: Output) -> None:
    try:
        output.dst, direct = open_output(output.tmp)
        output.merger.begin_shard(output.tmp.parent)
        output.merger.sink.start(output.dst, direct)
        output.header = output.shard.header_bytes()
        output.merger.sink.write(memoryview(output.header))
    except Exception as exc:
        _fail(output, exc)


def _end(output: Output) -> None:
    try:
        written = output.merger.sink.digest()
        os.fsync(output.dst)
        os.posix_fadvise(output.dst, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(output.dst)
        output.dst = -1
        output.record = record(output.merger, output.shard, written, output.header)
    except Exception as exc:
        _fail(output, exc)


def _fail(output: Output, exc: BaseException | None) -> None:
    output.error = exc
    output.merger.sink.discard()
    if output.dst >= 0:
        os.close(output.dst)
        output.dst = -1
    output.tmp.unlink(missing_ok=True)
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(output.folder / output.shard.name)
    if isinstance(exc, ShardmergeError) and exc.file is None:
        exc.file = str(output.folder / output.shard.name)


def _own_reads(tensor: TensorPlan) -> bool:
    """Whether ``tensor`` is read on its own, not from the shared segments."""
    return tensor.action in (Action.DEQUANTIZE, Action.REQUANTIZE, Action.RESCALE) or bool(tensor.base_rows)


def _tensor(src: int, jobs: list[tuple[Output, TensorPlan]], reader: SegmentReader) -> None:
    # Quantized weights and their new scales need reads of their own (the scales, a first
    # pass over a requantized weight), and a resized tensor none; every other tensor shares
    # the segments read here.
    for output, tensor in jobs:
        if output.error is None and _own_reads(tensor):
            try:
                with output.merger.naming(tensor):
                    output.merger.write_tensor(src, tensor)
            except Exception as exc:
                _fail(output, exc)
    jobs = [(output, tensor) for output, tensor in jobs if not _own_reads(tensor)]
    if not jobs:
        return
    wholes, blocks = {}, {}
    for output, tensor in jobs:
        if tensor.ops:
            blocks[id(output)] = row_blocks(tensor)
            try:
                with output.merger.naming(tensor):
                    wholes[id(output)] = output.merger.whole_factors(tensor)
            except Exception as exc:
                _fail(output, exc)
    for begin, end in _segments([tensor for _, tensor in jobs]):
        raw, buffer = reader.read(src, begin, end)
        verbatim = [(o, t) for o, t in jobs if o.error is None and t.action is Action.COPY]
        shared = SharedBlock(buffer, reader.pool, len(verbatim) + 1)
        for output, tensor in jobs:
            if output.error is not None:
                continue
            try:
                if tensor.ops:
                    with output.merger.naming(tensor):
                        _merge(output, tensor, raw, begin, end, blocks[id(output)], wholes[id(output)])
                elif tensor.action is Action.COPY:
                    try:
                        output.merger.sink.write(memoryview(raw.numpy()).cast("B"), shared)
                    except BaseException:
                        shared.release()
                        raise
                else:
                    _convert(output, tensor, raw)
            except Exception as exc:
                _fail(output, exc)
        shared.release()


def _merge(
    output: Output,
    tensor: TensorPlan,
    raw: torch.Tensor,
    begin: int,
    end: int,
    blocks: list[Block],
    whole: list[list[torch.Tensor | None] | None],
) -> None:
    """The blocks of ``tensor`` that segment ``raw`` (bytes ``begin`` to ``end``) holds, merged."""
    for block in blocks:
        if begin <= block.begin and block.end <= end:
            source = output.merger.upload(_typed(raw, block.begin - begin, block.end - begin, tensor))
            output.merger.sink.write(*output.merger.merge_block(source, tensor, block, whole))


def _convert(output: Output, tensor: TensorPlan, raw: torch.Tensor) -> None:
    itemsize = ITEMSIZE[tensor.src_dtype]
    step = COPY_CHUNK_BYTES // itemsize * itemsize
    for begin in range(0, raw.numel(), step):
        output.merger.convert_chunk(_typed(raw, begin, min(begin + step, raw.numel()), tensor), tensor)


def _typed(raw: torch.Tensor, begin: int, end: int, tensor: TensorPlan) -> torch.Tensor:
    return raw[begin:end].view(TORCH_DTYPES[tensor.src_dtype])


def _segments(tensors: list[TensorPlan]) -> list[tuple[int, int]]:
    """Byte ranges to read the tensor in: the merge blocks when every merging job has the same
    ones, the whole tensor when they differ, copy chunks when no job merges it."""
    first = tensors[0]
    merging = [tensor for tensor in tensors if tensor.ops]
    if merging:
        if all(tensor.block_rows == merging[0].block_rows for tensor in merging):
            return [(block.begin, block.end) for block in row_blocks(merging[0])]
        return [(first.src_begin, first.src_end)]
    itemsize = ITEMSIZE[first.src_dtype]
    step = COPY_CHUNK_BYTES // itemsize * itemsize
    return [(begin, min(begin + step, first.src_end)) for begin in range(first.src_begin, first.src_end, step)]
