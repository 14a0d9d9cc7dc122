"""Carry out a Plan: shard by shard, tensor by tensor, nothing re-decided.

Memory holds one block of rows of a merged tensor (in float32, or the whole tensor where an
op needs it) and its adapter factors at a time, in reused buffers; untouched tensors are
copied by the kernel or converted through one bounded buffer. Each shard is streamed into
``NAME.tmp`` behind a header computed from the plan, written and hashed by the sink's
threads while the next block is merged, then fsynced, renamed and recorded in the journal.
Shards the journal already holds are checked and skipped, so the same job run again resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import card, outdir
from . import journal as journals
from .errors import DeviceError, JobConfigError, OutputError, ShardmergeError
from .fetch import Fetcher, fetcher_for
from .hub import Publisher, PushTarget
from .kernels import TORCH_DTYPES, apply_op
from .plan_data import MergeOp, Plan, ShardPlan, TensorPlan
from .planner import COPY_CHUNK_BYTES
from .shared import Output, SegmentReader, write_together
from .sink import ShardSink
from .st_io import INDEX_NAME, ITEMSIZE, numel, pread_into, read_checkpoint_header, render_index

# errno values that mean "no room": a full disk, a quota, or a file size limit.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class MergeReport:
    output: str
    shards: int
    shards_skipped: int
    tensors_merged: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    device: str
    commit: str | None = None  # the Hub commit, when published
    url: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available", hint="use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
                hint="use --device cuda:0 or auto",
            )
    return device


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
    """The blocks of rows ``tensor`` is merged in, as the plan fixed them."""
    rows = tensor.shape[0] if tensor.shape else 1
    step = max(1, tensor.block_rows or rows)
    row_bytes = (tensor.src_end - tensor.src_begin) // max(rows, 1)
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


class _Buffer:
    """A reusable buffer, grown to the largest request and never shrunk. Fresh tensors per
    weight would cost more than the merge: the allocator returns large blocks to the kernel,
    and faulting them in again runs at a fraction of memory speed."""

    def __init__(self, device: torch.device, pinned: bool = False) -> None:
        self.device = device
        self.pinned = pinned
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.buffer.numel():
            self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=self.pinned)
        return self.buffer[:nbytes]

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for dim in shape:
            count *= dim
        return self.take(count * dtype.itemsize).view(dtype).reshape(shape)


class _Arena:
    """Tensors carved one after another from one reused buffer, all given back at once: the
    float32 adapter factors of one tensor (or block), replaced by the next one's. Fresh
    tensors instead would leave the allocator's heap fragmented, and resident memory would
    grow with the number of tensors merged."""

    _ALIGN = 64

    def __init__(self, device: torch.device) -> None:
        self.buffer = _Buffer(device)
        self.used = 0

    def reset(self, nbytes: int) -> None:
        """Start over, with room for ``nbytes`` (padding included)."""
        self.buffer.take(nbytes)
        self.used = 0

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for dim in shape:
            count *= dim
        begin = self.used
        self.used = begin + -(-count * 4 // self._ALIGN) * self._ALIGN
        return self.buffer.buffer[begin : begin + count * 4].view(torch.float32).reshape(shape)

    @classmethod
    def room(cls, shapes: list[tuple[int, ...]]) -> int:
        total = 0
        for shape in shapes:
            count = 1
            for dim in shape:
                count *= dim
            total += -(-count * 4 // cls._ALIGN) * cls._ALIGN
        return total


class AdapterReader:
    """Reads adapter tensors with pread, not mmap: pages of a mapped file stay resident and
    count against memory, so a large adapter would grow the footprint as the merge went on."""

    def __init__(self, path: str) -> None:
        self.tensors = read_checkpoint_header(Path(path)).tensors
        self.fd = os.open(path, os.O_RDONLY)

    def shape(self, key: str, rows: tuple[int, int] | None = None) -> tuple[int, ...]:
        shape = self.tensors[key].shape
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    def get_tensor(self, key: str, rows: tuple[int, int] | None, into: _Buffer) -> torch.Tensor:
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


class _StopRequest:
    """Ctrl-C and SIGTERM during a merge: noted, and acted on between tensors, so the tensor in
    hand is finished and then discarded with its temp file, and a shard is never in place
    without its journal entry. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _note(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


class TensorMerger:
    """Computes merged tensors: read the base tensor, apply every op in float32, round once."""

    def __init__(self, device: torch.device, adapters: list[AdapterReader]) -> None:
        self.device = device
        self.adapters = adapters
        cuda = device.type == "cuda"
        host = torch.device("cpu")
        self.read_buffer = _Buffer(host, pinned=cuda)
        self.work = _Buffer(device)  # the float32 value being merged
        self.rounded = _Buffer(device) if cuda else None
        self.staging = _Buffer(host)  # adapter tensors as stored, on their way to float32
        self.whole = _Arena(device)  # the factors read once per tensor
        self.block = _Arena(device)  # the factors read per block (replacement tensors)
        # Three output buffers: one is written, one hashed, while the next block fills the third.
        self.sink = ShardSink([_Buffer(host, pinned=cuda) for _ in range(3)])

    def close(self) -> None:
        self.sink.close()

    def reserve(self, shards: tuple[ShardPlan, ...]) -> None:
        """Size every reused buffer for the largest block of ``shards`` at once. Grown as the
        merge went, each would be freed and allocated again larger; the freed blocks stay in
        the allocator's heap, and resident memory would depend on the order of tensor sizes."""
        needs = [self._needs(tensor) for shard in shards for tensor in shard.tensors]
        source, work, output, staging, whole, block = (max((need[i] for need in needs), default=0) for i in range(6))
        self.read_buffer.take(source)
        self.work.take(work)
        self.staging.take(staging)
        self.whole.reset(whole)
        self.block.reset(block)
        self.sink.reserve(output)

    def _needs(self, tensor: TensorPlan) -> tuple[int, int, int, int, int, int]:
        """Bytes ``tensor`` needs in each buffer: source, work, output, staging, and the two
        factor arenas (whole tensor, per block)."""
        if not tensor.ops:
            if tensor.dtype == tensor.src_dtype:
                return (0, 0, 0, 0, 0, 0)
            chunk = min(COPY_CHUNK_BYTES, tensor.src_end - tensor.src_begin)
            return (chunk, 0, chunk // ITEMSIZE[tensor.src_dtype] * ITEMSIZE[tensor.dtype], 0, 0, 0)
        blocks = row_blocks(tensor)
        count = max(numel(block.shape) for block in blocks)
        blocked = 0 < tensor.block_rows < (tensor.shape[0] if tensor.shape else 1)
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
        source = max(block.end - block.begin for block in blocks)
        return (source, 4 * count, count * ITEMSIZE[tensor.dtype], staging, rooms[0], rooms[1])

    def read(self, fd: int, tensor: TensorPlan, begin: int, end: int) -> torch.Tensor:
        raw = self.read_buffer.take(end - begin)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype])

    def merge(self, fd: int, tensor: TensorPlan) -> Iterator[tuple[memoryview, _Buffer]]:
        """The output bytes of ``tensor``, read from the source file ``fd``, block by block:
        blocks of rows where every op allows it, else the whole tensor. Each block comes in a
        buffer of the sink's pool that goes back to it once written and hashed."""
        whole = self.whole_factors(tensor)
        for block in row_blocks(tensor):
            source = self.read(fd, tensor, block.begin, block.end)
            yield self.merge_block(source, tensor, block, whole)

    def whole_factors(self, tensor: TensorPlan) -> list[list[torch.Tensor | None] | None]:
        """The factors of each op read once for the whole tensor; None where they are read per
        block (replacement tensors, as large as the base tensor)."""
        blocked = 0 < tensor.block_rows < (tensor.shape[0] if tensor.shape else 1)
        ops = [None if op.kind == "replace" and blocked else op for op in tensor.ops]
        return self._factors(self.whole, ops, None)

    def merge_block(
        self, source: torch.Tensor, tensor: TensorPlan, block: Block, whole: list[list[torch.Tensor | None] | None]
    ) -> tuple[memoryview, _Buffer]:
        """Block ``block`` of ``tensor`` merged from ``source``, its base bytes."""
        value = self.work.tensor(torch.float32, block.shape)
        value.copy_(source.reshape(block.shape), non_blocking=True)
        per_block = self._factors(
            self.block, [op if w is None else None for op, w in zip(tensor.ops, whole, strict=True)], block.span
        )
        for op, factors, own in zip(tensor.ops, whole, per_block, strict=True):
            value = apply_op(value, op, factors if factors is not None else own, block.span)  # type: ignore[arg-type]
        return self.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])

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

    def rounded_bytes(self, value: torch.Tensor, dtype: torch.dtype) -> tuple[memoryview, _Buffer]:
        """``value`` rounded once to ``dtype``, in host memory from the sink's pool."""
        output = self.sink.acquire()
        host = output.tensor(dtype, tuple(value.shape))
        if self.rounded is None:
            host.copy_(value)
        else:
            rounded = self.rounded.tensor(dtype, tuple(value.shape))
            rounded.copy_(value)
            host.copy_(rounded, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return memoryview(host.view(torch.uint8).numpy()).cast("B"), output

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
        self.sink.write(memoryview(converted.view(torch.uint8).numpy()).cast("B"), output)

    def write_shard(self, shard: ShardPlan, folder: Path, progress: tqdm, stop: _StopRequest) -> journals.ShardRecord:
        """Write one shard as ``NAME.tmp`` and fsync it; a failure removes the temp file."""
        final = folder / shard.name
        tmp = outdir.tmp_path(final)
        header = shard.header_bytes()
        try:
            with ExitStack() as stack:
                src = os.open(shard.source, os.O_RDONLY)
                stack.callback(os.close, src)
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                stack.callback(os.close, dst)
                stack.callback(self.sink.discard)  # first: the sink may still use both files
                progress.set_postfix_str(shard.name, refresh=False)
                self.sink.start(dst)
                self.sink.write(memoryview(header))
                progress.update(len(header))
                for tensor in shard.tensors:
                    stop.check()
                    if tensor.ops:
                        for block in self.merge(src, tensor):
                            self.sink.write(*block)
                    elif tensor.dtype == tensor.src_dtype:
                        self.sink.copy(src, tensor.src_begin, tensor.src_end - tensor.src_begin)
                    else:
                        self.convert(src, tensor)
                    progress.update(tensor.end - tensor.begin)
                digest, size = self.sink.digest()
                os.fsync(dst)
                # The bytes are on disk: hand their cache pages back now, so later shards
                # reuse them instead of growing the page cache by the size of the model.
                os.posix_fadvise(dst, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(final)  # writes through a descriptor name no file
            raise
        merged = tuple(tensor.name for tensor in shard.tensors if tensor.ops)
        return journals.ShardRecord(size, digest, hashlib.sha256(header).hexdigest(), merged)


def open_adapters(plan: Plan, stack: ExitStack) -> list[AdapterReader]:
    readers = []
    for adapter in plan.adapters:
        reader = AdapterReader(adapter.weights_file)
        stack.callback(reader.close)
        readers.append(reader)
    return readers


@dataclass
class Job:
    """One job of a pass: its plan, where to publish it, and how it is going."""

    plan: Plan
    push: PushTarget | None = None
    stack: ExitStack = field(default_factory=ExitStack)
    journal: journals.Journal | None = None
    publisher: Publisher | None = None
    merger: TensorMerger | None = None
    todo: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    error: BaseException | None = None
    commit: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.plan.output or "")


def execute(
    plan: Plan,
    *,
    quiet: bool = False,
    restart: bool = False,
    verify_resume: bool = False,
    push: PushTarget | None = None,
) -> MergeReport:
    """Write the merged model described by ``plan`` into ``plan.output``, resuming an earlier
    run of the same job there. ``verify_resume`` re-hashes the shards it would skip. With
    ``push``, each shard is uploaded as soon as it is in place, and committed at the end."""
    (result,) = run_pass([Job(plan, push)], quiet=quiet, restart=restart, verify_resume=verify_resume)
    if isinstance(result, BaseException):
        raise result
    return result


def run_pass(
    jobs: list[Job],
    *,
    quiet: bool = False,
    restart: bool = False,
    verify_resume: bool = False,
) -> list[MergeReport | BaseException]:
    """Merge several jobs on one base in one pass over it: each base shard is read once and
    written to every job that still needs it. The jobs' plans must lay the shards out alike
    (same base, dtype and device). A job that fails is dropped, with its error in the
    result, and the others go on. A Hub base's shards are downloaded as the pass reaches them."""
    try:
        device = resolve_device(jobs[0].plan.device)
    except DeviceError as exc:
        return [exc for _ in jobs]
    try:
        with ExitStack() as stack:
            for job in jobs:
                stack.callback(job.stack.close)
                _attempt(job, lambda job=job: _open(job, device, restart, verify_resume, quiet))
            live = [job for job in jobs if job.error is None]
            if device.type == "cpu":
                # The writer and hasher threads need a core; the merge's products are small
                # (rank r) and its conversions memory-bound, so one torch thread loses nothing.
                stack.callback(torch.set_num_threads, torch.get_num_threads())
                torch.set_num_threads(1)
            progress = stack.enter_context(_progress(live, quiet or not live))
            stop = stack.enter_context(_StopRequest())
            reader = SegmentReader(pinned=device.type == "cuda")
            fetcher = fetcher_for(live) if live else Fetcher()
            stack.callback(fetcher.close)
            shards = jobs[0].plan.shards
            for index, base_shard in enumerate(shards):
                wanting = [job for job in jobs if job.error is None and base_shard.name in job.todo]
                if not wanting:
                    continue
                for job in wanting:
                    if job.publisher is not None:
                        _attempt(job, lambda job=job: job.publisher.wait_for_room(stop.check))  # type: ignore[union-attr]
                fetcher.fetch(base_shard)
                _write([job for job in wanting if job.error is None], index, reader, progress, stop)
                fetcher.done(base_shard)
            for job in jobs:
                if job.error is None:
                    _attempt(job, lambda job=job: _close(job, stop))
    except (OSError, ShardmergeError) as exc:  # reading or fetching the base: every job stops
        for job in jobs:
            if job.error is None:
                job.error = _io_error(exc, job) if isinstance(exc, OSError) else exc
    return [job.error if job.error is not None else _report(job, device) for job in jobs]


def _attempt(job: Job, action: Callable[[], object]) -> None:
    """Run one step of ``job``; a failure ends the job (not the pass) and is kept for its report."""
    try:
        action()
    except OSError as exc:
        job.error = _io_error(exc, job)
    except Exception as exc:
        job.error = exc


def _open(job: Job, device: torch.device, restart: bool, verify_resume: bool, quiet: bool) -> None:
    plan = job.plan
    if not plan.output:
        raise JobConfigError("no output folder given", hint="pass -o OUT, or set output: in the job")
    inputs = [Path(plan.base), *(Path(adapter.path) for adapter in plan.adapters)]
    journal = job.journal = journals.claim(job.folder, plan, inputs, restart=restart, device=str(device))
    if job.push is None:
        journal.set_target(None)
    else:
        job.publisher = Publisher(job.push, job.folder, _commit_message(plan), quiet=quiet)
        job.stack.callback(job.publisher.close)
        job.publisher.open(journal)
    todo = [shard for shard in plan.shards if not journal.finished(shard, rehash=verify_resume)]
    job.todo = {shard.name for shard in todo}
    needed = [shard.size for shard in todo]
    if job.push is not None and job.push.delete_after_upload:
        needed = sorted(needed)[-2:]  # the disk holds one shard uploading, one being written
    _check_free_space(job.folder, sum(needed))
    job.merger = TensorMerger(device, open_adapters(plan, job.stack))
    job.stack.callback(job.merger.close)
    job.merger.reserve(tuple(shard for shard in plan.shards if shard.name in job.todo))
    if job.publisher is not None:
        for shard in plan.shards:
            if shard.name not in job.todo:
                job.publisher.submit(shard.name)  # finished by an earlier run, maybe not uploaded


def _write(jobs: list[Job], index: int, reader: SegmentReader, progress: tqdm, stop: _StopRequest) -> None:
    """Shard ``index`` of every job in ``jobs``: by itself for one job (untouched tensors copied
    by the kernel), else from one read of the base."""
    if len(jobs) == 1:
        job = jobs[0]
        shard = job.plan.shards[index]
        assert job.merger is not None
        _attempt(job, lambda: _record(job, shard, job.merger.write_shard(shard, job.folder, progress, stop)))  # type: ignore[union-attr]
        return
    outputs = [Output(job.merger, job.plan.shards[index], job.folder) for job in jobs]  # type: ignore[arg-type]
    write_together(outputs, reader, progress, stop)
    for job, output in zip(jobs, outputs, strict=True):
        if output.error is not None:
            job.error = _io_error(output.error, job) if isinstance(output.error, OSError) else output.error
        elif output.record is not None:
            _attempt(job, lambda job=job, output=output: _record(job, output.shard, output.record))  # type: ignore[arg-type]


def _record(job: Job, shard: ShardPlan, record: journals.ShardRecord) -> None:
    """A shard is written: rename it into place, record it, hand it to the uploader."""
    assert job.journal is not None
    outdir.commit(outdir.tmp_path(job.folder / shard.name), job.folder / shard.name)
    job.journal.record(shard.name, record)
    job.todo.discard(shard.name)
    job.written.add(shard.name)
    if job.publisher is not None:
        job.publisher.submit(shard.name)


def _close(job: Job, stop: _StopRequest) -> None:
    assert job.journal is not None
    _finish(job.plan, job.folder)
    job.journal.complete = True
    job.journal.save()
    if job.publisher is not None:
        job.commit = job.publisher.finish(stop.check)


def _progress(jobs: list[Job], quiet: bool) -> tqdm:
    total = sum(job.plan.total_bytes for job in jobs)
    left = sum(shard.size for job in jobs for shard in job.plan.shards if shard.name in job.todo)
    return tqdm(
        total=total,
        initial=total - left,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _report(job: Job, device: torch.device) -> MergeReport:
    plan = job.plan
    merged = sum(shard.merged for shard in plan.shards)
    written = [shard for shard in plan.shards if shard.name in job.written]
    return MergeReport(
        output=str(job.folder),
        shards=len(plan.shards),
        shards_skipped=len(plan.shards) - len(written),
        tensors_merged=merged,
        tensors_copied=sum(len(shard.tensors) for shard in plan.shards) - merged,
        bytes_written=sum(shard.size for shard in written),
        seconds=time.monotonic() - job.started,
        device=str(device),
        commit=job.commit,
        url=job.publisher.url if job.publisher is not None else None,
    )


def _commit_message(plan: Plan) -> str:
    count = len(plan.adapters)
    return f"Merge {count} adapter{'s' if count != 1 else ''} into {Path(plan.base).name} with shardmerge"


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutputError(
            f"not enough free space: the merge writes {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free",
            file=folder,
            hint="free some space or choose another output folder",
        )


def _io_error(exc: OSError, job: Job) -> OutputError:
    where = exc.filename or job.folder
    if exc.errno in _NO_SPACE:
        left = sum(shard.size for shard in job.plan.shards if shard.name in job.todo) / 2**30
        return OutputError(
            f"out of space ({exc.strerror}) with up to {left:.2f} GiB still to write",
            file=where,
            hint="free some space, then run the same command again: finished shards are kept",
        )
    return OutputError(f"I/O error: {exc.strerror or exc}", file=where, hint="check the disk and permissions")


def _finish(plan: Plan, folder: Path) -> None:
    """Non-weight files of the base, the model card, then the index, last, so its presence
    means done. The card replaces the base's README: it describes the merged model."""
    base_card = None
    for name in plan.extra_files:
        source = Path(name)
        final = folder / source.name
        if source.name == card.CARD_NAME:
            base_card = source
        elif source.name == "config.json" and plan.config is not None:
            outdir.write_bytes_atomic(final, (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode())
        else:
            outdir.copy_atomic(source, final)
    outdir.write_bytes_atomic(folder / card.CARD_NAME, card.render(plan, base_card))
    weight_map = {tensor.name: shard.name for shard in plan.shards for tensor in shard.tensors}
    outdir.write_bytes_atomic(folder / INDEX_NAME, render_index(plan.tensor_bytes, weight_map, plan.index_metadata))
