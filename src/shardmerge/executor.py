"""Carry out a Plan: shard by shard, tensor by tensor, nothing re-decided.

Memory holds one merged tensor (in float32) and its adapter factors at a time; untouched
tensors are copied by the kernel or converted through one bounded buffer. Each shard is
streamed into ``NAME.tmp`` behind a header computed from the plan, then fsynced and renamed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import outdir
from .errors import DeviceError, JobConfigError, OutputError
from .kernels import TORCH_DTYPES, apply_op
from .plan_data import Plan, ShardPlan, TensorPlan
from .planner import COPY_CHUNK_BYTES
from .st_io import INDEX_NAME, ITEMSIZE, copy_range, pread_into, read_checkpoint_header, render_index, write_all


@dataclass(frozen=True)
class MergeReport:
    output: str
    shards: int
    tensors_merged: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    device: str


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


class _Staging:
    """A reusable host buffer (pinned when feeding a GPU), grown to the largest request."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.buffer.numel():
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self.buffer[:nbytes]


class _AdapterReader:
    """Reads adapter tensors with pread, not mmap: pages of a mapped file stay resident and
    count against memory, so a large adapter would grow the footprint as the merge went on."""

    def __init__(self, path: str) -> None:
        self.tensors = read_checkpoint_header(Path(path)).tensors
        self.fd = os.open(path, os.O_RDONLY)

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        pread_into(self.fd, memoryview(raw.numpy()), info.begin)
        return raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        os.close(self.fd)


class _Executor:
    def __init__(self, device: torch.device, progress: tqdm, adapters: list[_AdapterReader]) -> None:
        self.device = device
        self.progress = progress
        self.adapters = adapters
        cuda = device.type == "cuda"
        self.read_buffer = _Staging(pinned=cuda)
        self.write_buffer = _Staging(pinned=cuda)

    def write_shard(self, shard: ShardPlan, folder: Path) -> None:
        final = folder / shard.name
        tmp = outdir.tmp_path(final)
        src = os.open(shard.source, os.O_RDONLY)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                self.progress.set_postfix_str(shard.name, refresh=False)
                write_all(dst, shard.header_bytes())
                self.progress.update(shard.header_size)
                for tensor in shard.tensors:
                    if tensor.ops:
                        write_all(dst, self.merge(src, tensor))
                    elif tensor.dtype == tensor.src_dtype:
                        copy_range(src, dst, tensor.src_begin, tensor.src_end - tensor.src_begin)
                    else:
                        self.convert(src, dst, tensor)
                    self.progress.update(tensor.end - tensor.begin)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        outdir.commit(tmp, final)

    def read(self, fd: int, tensor: TensorPlan, begin: int, end: int) -> torch.Tensor:
        raw = self.read_buffer.take(end - begin)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype])

    def merge(self, fd: int, tensor: TensorPlan) -> memoryview:
        source = self.read(fd, tensor, tensor.src_begin, tensor.src_end).reshape(tensor.shape)
        value = source.to(self.device, non_blocking=True).to(torch.float32)
        for op in tensor.ops:
            handle = self.adapters[op.adapter]
            factors = [handle.get_tensor(key).to(self.device, torch.float32) if key else None for key in op.keys]
            value = apply_op(value, op, factors)
        rounded = value.to(TORCH_DTYPES[tensor.dtype])
        if self.device.type == "cuda":
            host = self.write_buffer.take(tensor.end - tensor.begin).view(rounded.dtype).reshape(tensor.shape)
            host.copy_(rounded, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            rounded = host
        return memoryview(rounded.contiguous().view(torch.uint8).numpy())

    def convert(self, src: int, dst: int, tensor: TensorPlan) -> None:
        """Copy a tensor that only changes dtype, through one bounded buffer."""
        itemsize = ITEMSIZE[tensor.src_dtype]
        step = COPY_CHUNK_BYTES // itemsize * itemsize
        target = TORCH_DTYPES[tensor.dtype]
        for begin in range(tensor.src_begin, tensor.src_end, step):
            chunk = self.read(src, tensor, begin, min(begin + step, tensor.src_end))
            write_all(dst, memoryview(chunk.to(target).view(torch.uint8).numpy()))


def execute(plan: Plan, *, quiet: bool = False) -> MergeReport:
    """Write the merged model described by ``plan`` into ``plan.output``."""
    if not plan.output:
        raise JobConfigError("no output folder given", hint="pass -o OUT, or set output: in the job")
    started = time.monotonic()
    device = resolve_device(plan.device)
    folder = Path(plan.output)
    inputs = [Path(plan.base), *(Path(adapter.path) for adapter in plan.adapters)]
    try:
        outdir.claim(folder, plan.fingerprint, inputs)
        with ExitStack() as stack:
            adapters = []
            for adapter in plan.adapters:
                reader = _AdapterReader(adapter.weights_file)
                stack.callback(reader.close)
                adapters.append(reader)
            progress = stack.enter_context(
                tqdm(
                    total=plan.total_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="merging",
                    disable=quiet,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            )
            executor = _Executor(device, progress, adapters)
            for shard in plan.shards:
                executor.write_shard(shard, folder)
        _finish(plan, folder)
    except OSError as exc:
        raise OutputError(
            f"I/O error: {exc.strerror or exc}", file=exc.filename or folder, hint="check free space and permissions"
        ) from exc
    merged = sum(shard.merged for shard in plan.shards)
    return MergeReport(
        output=str(folder),
        shards=len(plan.shards),
        tensors_merged=merged,
        tensors_copied=sum(len(shard.tensors) for shard in plan.shards) - merged,
        bytes_written=plan.total_bytes,
        seconds=time.monotonic() - started,
        device=str(device),
    )


def _finish(plan: Plan, folder: Path) -> None:
    """Non-weight files of the base, then the index, last, so its presence means done."""
    for name in plan.extra_files:
        source = Path(name)
        final = folder / source.name
        if source.name == "config.json" and plan.config is not None:
            outdir.write_bytes_atomic(final, (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode())
        else:
            outdir.copy_atomic(source, final)
    weight_map = {tensor.name: shard.name for shard in plan.shards for tensor in shard.tensors}
    outdir.write_bytes_atomic(folder / INDEX_NAME, render_index(plan.tensor_bytes, weight_map, plan.index_metadata))
