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
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import card, outdir
from . import journal as journals
from .errors import DeviceError, JobConfigError, OutputError
from .hub import PushTarget
from .kernels import TORCH_DTYPES, apply_op
from .plan_data import MergeOp, Plan, ShardPlan, TensorPlan
from .planner import COPY_CHUNK_BYTES
from .sink import ShardSink
from .st_io import INDEX_NAME, ITEMSIZE, pread_into, read_checkpoint_header, render_index

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


class AdapterReader:
    """Reads adapter tensors with pread, not mmap: pages of a mapped file stay resident and
    count against memory, so a large adapter would grow the footprint as the merge went on."""

    def __init__(self, path: str) -> None:
        self.tensors = read_checkpoint_header(Path(path)).tensors
        self.fd = os.open(path, os.O_RDONLY)

    def get_tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key``, or only rows ``rows`` of it."""
        info = self.tensors[key]
        shape = info.shape
        begin, end = info.begin, info.end
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        raw = torch.empty(end - begin, dtype=torch.uint8)
        pread_into(self.fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[info.dtype]).reshape(shape)

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
        # Three output buffers: one is written, one hashed, while the next block fills the third.
        self.sink = ShardSink([_Buffer(host, pinned=cuda) for _ in range(3)])

    def close(self) -> None:
        self.sink.close()

    def read(self, fd: int, tensor: TensorPlan, begin: int, end: int) -> torch.Tensor:
        raw = self.read_buffer.take(end - begin)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype])

    def merge(self, fd: int, tensor: TensorPlan) -> Iterator[tuple[memoryview, _Buffer]]:
        """The output bytes of ``tensor``, read from the source file ``fd``, block by block:
        blocks of rows where every op allows it, else the whole tensor. Each block comes in a
        buffer of the sink's pool that goes back to it once written and hashed."""
        rows = tensor.shape[0] if tensor.shape else 1
        step = max(1, tensor.block_rows or rows)
        # Replacement tensors are as large as the base tensor: read them block by block too.
        whole = [None if op.kind == "replace" and step < rows else self.factors(op) for op in tensor.ops]
        row_bytes = (tensor.src_end - tensor.src_begin) // max(rows, 1)
        for first in range(0, max(rows, 1), step):
            last = min(rows, first + step)
            span = (first, last) if step < rows else None
            shape = (last - first, *tensor.shape[1:]) if tensor.shape else ()
            begin = tensor.src_begin + first * row_bytes
            end = begin + (last - first) * row_bytes if tensor.shape else tensor.src_end
            source = self.read(fd, tensor, begin, end)
            value = self.work.tensor(torch.float32, shape)
            value.copy_(source.reshape(shape), non_blocking=True)
            for op, factors in zip(tensor.ops, whole, strict=True):
                value = apply_op(value, op, factors if factors is not None else self.factors(op, span), span)
            yield self.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])

    def factors(self, op: MergeOp, rows: tuple[int, int] | None = None) -> list[torch.Tensor | None]:
        handle = self.adapters[op.adapter]
        return [handle.get_tensor(key, rows).to(self.device, torch.float32) if key else None for key in op.keys]

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
        target = TORCH_DTYPES[tensor.dtype]
        for begin in range(tensor.src_begin, tensor.src_end, step):
            chunk = self.read(src, tensor, begin, min(begin + step, tensor.src_end))
            output = self.sink.acquire()
            converted = output.tensor(target, tuple(chunk.shape))
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
    if not plan.output:
        raise JobConfigError("no output folder given", hint="pass -o OUT, or set output: in the job")
    started = time.monotonic()
    device = resolve_device(plan.device)
    folder = Path(plan.output)
    inputs = [Path(plan.base), *(Path(adapter.path) for adapter in plan.adapters)]
    todo: list[ShardPlan] = []
    commit = None
    try:
        journal = journals.claim(folder, plan, inputs, restart=restart, device=str(device))
        with ExitStack() as stack:
            publisher = None
            if push is None:
                journal.set_target(None)
            else:
                from .hub import Publisher

                publisher = Publisher(push, folder, _commit_message(plan), quiet=quiet)
                stack.callback(publisher.close)
                publisher.open(journal)
            todo = [shard for shard in plan.shards if not journal.finished(shard, rehash=verify_resume)]
            needed = [shard.size for shard in todo]
            if push is not None and push.delete_after_upload:
                needed = sorted(needed)[-2:]  # the disk holds one shard uploading, one being written
            _check_free_space(folder, sum(needed))
            if device.type == "cpu":
                # The writer and hasher threads need a core; the merge's products are small
                # (rank r) and its conversions memory-bound, so one torch thread loses nothing.
                stack.callback(torch.set_num_threads, torch.get_num_threads())
                torch.set_num_threads(1)
            merger = TensorMerger(device, open_adapters(plan, stack))
            stack.callback(merger.close)
            progress = stack.enter_context(
                tqdm(
                    total=plan.total_bytes,
                    initial=plan.total_bytes - sum(shard.size for shard in todo),
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="merging",
                    disable=quiet,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            )
            stop = stack.enter_context(_StopRequest())
            if publisher is not None:
                pending = {shard.name for shard in todo}
                for shard in plan.shards:
                    if shard.name not in pending:
                        publisher.submit(shard.name)  # finished by an earlier run, maybe not uploaded
            for shard in todo:
                if publisher is not None:
                    publisher.wait_for_room(stop.check)
                record = merger.write_shard(shard, folder, progress, stop)
                outdir.commit(outdir.tmp_path(folder / shard.name), folder / shard.name)
                journal.record(shard.name, record)
                if publisher is not None:
                    publisher.submit(shard.name)
            _finish(plan, folder)
            journal.complete = True
            journal.save()
            if publisher is not None:
                commit = publisher.finish(stop.check)
    except OSError as exc:
        raise _io_error(exc, folder, todo) from exc
    merged = sum(shard.merged for shard in plan.shards)
    return MergeReport(
        output=str(folder),
        shards=len(plan.shards),
        shards_skipped=len(plan.shards) - len(todo),
        tensors_merged=merged,
        tensors_copied=sum(len(shard.tensors) for shard in plan.shards) - merged,
        bytes_written=sum(shard.size for shard in todo),
        seconds=time.monotonic() - started,
        device=str(device),
        commit=commit,
        url=publisher.url if publisher is not None else None,
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


def _io_error(exc: OSError, folder: Path, todo: list[ShardPlan]) -> OutputError:
    where = exc.filename or folder
    if exc.errno in _NO_SPACE:
        left = sum(shard.size for shard in todo) / 2**30
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
