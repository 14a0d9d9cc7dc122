"""Merging one job's tensors: ``TensorMerger`` reads the base block, applies every op in
float32 and rounds once; or hands a quantized weight to the driver of its kind (``gridded``
for scales on a grid, ``packed_merge`` for packed values), and converts tensors that only
change dtype.

Its parts: the context every merger shares (``context``: reads, rounding, NaN policy,
tallies), the adapter factors (``factors``), the blocks (``blocks``) and the two quantized
drivers; every reused buffer is sized from the plan before the first tensor. Shards are
written by ``shard_writer``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path

import torch

from ..errors import DeviceError
from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import pread_into
from ..formats.safetensors import ITEMSIZE, numel
from ..planning.model import Action, Plan, ShardPlan, TensorPlan
from ..tuning import COPY_CHUNK_BYTES
from .blocks import Block, read_blocks, row_blocks
from .buffers import Buffer
from .combine import CombiningFactors
from .context import MergeContext, out_of_range, same_bytes
from .device import Device
from .factors import AdapterFactors, AdapterReader, Factors
from .gridded import GridMerger, Scales, Step, needs_work
from .kernels import all_finite
from .packed_merge import PackedMerger
from .sink import ShardSink


@contextmanager
def lean_process(device: Device) -> Iterator[None]:
    """This process merges on ``device`` now (see ``Device.activate``): what the interpreter
    holds (torch's modules above all) is frozen, so that the cyclic collector need not walk
    it again at each collection the merge's small objects trigger (about a fifth of a second
    per GiB merged); where the arithmetic runs on the CPU, torch uses one thread. The sink's
    writer thread, its hashes and the kernel's I/O need a core; the merge's products are
    small (rank r) and its conversions memory-bound: a second torch thread gave the same wall
    time for 0.9 s more CPU per 2 GiB."""
    gc.freeze()
    threads = torch.get_num_threads()
    if device.torch.type == "cpu":
        torch.set_num_threads(1)
    try:
        # No autograd bookkeeping: every view a block takes (a dozen a block) would carry its
        # metadata, and every in-place op bump its version.
        with device.activate(), torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()


@dataclass(frozen=True)
class Needs:
    """Bytes one tensor needs at most in each reused buffer: its source block, the float32
    value, the output block, the adapter tensors as stored, and the two factor arenas (whole
    tensor, per block)."""

    source: int = 0
    work: int = 0
    output: int = 0
    staging: int = 0
    whole: int = 0
    block: int = 0

    @property
    def total(self) -> int:
        return sum(astuple(self))


class TensorMerger:
    """Computes one job's merged tensors: read the base tensor, apply every op in float32,
    round once (or requantize once, for a quantized weight written back in its format)."""

    def __init__(self, place: Device, plan: Plan, adapters: list[AdapterReader], *, sha256: bool = False) -> None:
        self.context = MergeContext(place, sha256=sha256)
        combine = plan.combine
        self.factors = (
            AdapterFactors(place.memory, adapters)
            if combine is None
            else CombiningFactors(place.memory, adapters, combine)
        )
        self.uploaded = Buffer(place.memory)  # a block read by a shared pass, on the device (grown there)
        # The merged quantized weights by name, for their new companions (written in their shard).
        weights = {t.name: t for shard in plan.shards for t in shard.tensors if t.quant and t.requantized}
        self.weights = weights
        self.grid = GridMerger(self.context, self.factors)
        self.packed = PackedMerger(self.context, self.factors, weights)

    @property
    def sink(self) -> ShardSink:
        return self.context.sink

    def begin_shard(self, folder: Path) -> None:
        """A new shard begins, written into ``folder``: drop what was kept for the last one's
        new companions."""
        self.grid.begin_shard()
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
                exc.tensor = max(zip(needs, tensors, strict=True), key=lambda pair: pair[0].total)[1].name
            raise

    def _reserve(self, tensors: list[TensorPlan], needs: list[Needs]) -> None:
        context = self.context
        self.packed.reserve([t for t in tensors if t.packed])
        most = Needs(*(max((astuple(need)[i] for need in needs), default=0) for i in range(6)))
        blocks = [need.source for need, t in zip(needs, tensors, strict=True) if _read_ahead(t)]
        others = max((need.source for need, t in zip(needs, tensors, strict=True) if not _read_ahead(t)), default=0)
        self.grid.reserve([t for t in tensors if t.quant and not t.packed])
        context.read_buffer.take(others if context.place.staged else most.source)
        context.reads.reserve(blocks)
        context.work.take(most.work)
        self.factors.reserve(most.staging, most.whole, most.block)
        if isinstance(self.factors, CombiningFactors):
            self.factors.reserve_combined(tensors)
        self.sink.reserve([need.output for need in needs])

    def _needs(self, tensor: TensorPlan) -> Needs:
        if tensor.action in (Action.COPY, Action.RESCALE):
            return Needs()
        if tensor.action is Action.CONVERT:
            chunk = min(COPY_CHUNK_BYTES, tensor.src_end - tensor.src_begin)
            return Needs(chunk, 0, chunk // ITEMSIZE[tensor.src_dtype] * ITEMSIZE[tensor.dtype])
        blocks = row_blocks(tensor)
        count = max(numel(block.shape) for block in blocks)
        if tensor.packed:  # spans of the factors' rows: at most a block of one matrix's
            blocks = [Block(0, tensor.block_rows, (0, tensor.block_rows), (), 0, 0)]
        factors = self.factors.needs(tensor, max(block.last - block.first for block in blocks))
        if tensor.packed:
            return Needs(*self.packed.needs(tensor), *factors)
        source = max(block.end - block.begin for block in blocks)
        work = 4 * count if needs_work(tensor) else 0
        return Needs(source, work, count * ITEMSIZE[tensor.dtype], *factors)

    def upload(self, source: torch.Tensor) -> torch.Tensor:
        """A block read by the shared pass (host memory), on the device."""
        return self.context.place.upload(source, self.uploaded)

    def whole_factors(self, tensor: TensorPlan) -> Factors:
        """The factors of ``tensor``'s ops read once (see ``AdapterFactors.whole``)."""
        return self.factors.whole(tensor)

    def merge(self, fd: int, tensor: TensorPlan, *, write: bool = False) -> Iterator[tuple[memoryview, Buffer]]:
        """The output bytes of ``tensor``, read from the source file ``fd``, block by block:
        blocks of rows where every op allows it, else the whole tensor. Each block comes in a
        buffer of the sink's pool that goes back to it once written and hashed. With
        ``write``, a float block the sink can take as it is rounded goes there directly
        instead (see ``MergeContext.round_into_sink``)."""
        if tensor.packed:
            yield from self.packed.merge(fd, tensor)
            return
        # first: finding new scales may merge the weight once
        scales = self.grid.scales(fd, tensor) if tensor.quant is not None else None
        whole = self.factors.whole(tensor)
        blocks = row_blocks(tensor)
        itemsize = TORCH_DTYPES[tensor.dtype].itemsize
        for block, source in zip(blocks, read_blocks(self.context.reads, fd, tensor, blocks), strict=True):
            if write and scales is None and self.sink.aligned(itemsize):
                self.context.round_into_sink(self._value(source, tensor, block, whole), source, tensor, block, whole)
            else:
                yield self.merge_block(source, tensor, block, whole, scales)
        if scales is not None:  # for the scales, written next
            self.grid.finish(tensor, scales)

    def merge_block(
        self, source: torch.Tensor, tensor: TensorPlan, block: Block, whole: Factors, scales: Scales | None = None
    ) -> tuple[memoryview, Buffer]:
        """Block ``block`` of ``tensor`` merged from ``source``, its base bytes."""
        step = Step(tensor, block, source.reshape(block.shape), whole, scales)
        if scales is not None:
            return self.grid.merge_block(step)
        context = self.context
        value = self._value(source, tensor, block, whole)
        data, output, rounded = context.rounded_bytes(value, TORCH_DTYPES[tensor.dtype])
        if not all_finite(rounded):
            context.non_finite(tensor, step.source, rounded, lambda: context.merge_cause(tensor, value, whole))
        if context.still_unchanged(tensor, block.first):
            context.note_unchanged(tensor, same_bytes(rounded, step.source.to(rounded.dtype)))
        return data, output

    def _value(self, source: torch.Tensor, tensor: TensorPlan, block: Block, whole: Factors) -> torch.Tensor:
        """The float32 value of a float tensor's block: its base values, every op applied."""
        value = self.context.work.tensor(torch.float32, block.shape).copy_(source.reshape(block.shape))
        return self.factors.apply(value, tensor, whole, block.span)

    def write_tensor(self, src: int, tensor: TensorPlan) -> None:
        """Write a computed tensor: merged, dequantized or requantized, or a new companion."""
        if tensor.action is not Action.RESCALE:
            for block in self.merge(src, tensor, write=True):
                self.sink.write(*block)
            return
        assert tensor.scale_of is not None
        weight = self.weights[tensor.scale_of]
        if weight.packed:
            self.packed.write_companion(src, tensor)
        else:
            self.grid.write_scale(src, tensor, weight)

    def read(self, fd: int, tensor: TensorPlan, begin: int, end: int) -> torch.Tensor:
        raw = self.context.read_buffer.take(end - begin)
        pread_into(fd, memoryview(raw.numpy()), begin)
        return raw.view(TORCH_DTYPES[tensor.src_dtype])

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
            self.context.non_finite(tensor, chunk, converted, lambda: out_of_range(tensor))
        self.sink.write(memoryview(converted.view(torch.uint8).numpy()).cast("B"), output)

    @contextmanager
    def naming(self, tensor: TensorPlan) -> Iterator[None]:
        """A device's failure while ``tensor`` is merged (out of memory in one of torch's
        temporaries or a grown buffer, a CUDA library's error): one line naming the tensor, the
        device and the way out."""
        place = self.context.place
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError, by its older name
            raise place.out_of_memory(exc, tensor.name) from None
        except DeviceError as exc:  # a buffer grown for this tensor
            exc.tensor = exc.tensor or tensor.name
            raise
        except _ACCELERATOR_ERROR as exc:  # a CUDA library's failure (cuBLAS, say)
            raise place.failed(exc, tensor.name) from None


# What torch raises for a failed CUDA call since 2.8 (a RuntimeError before, left as it is).
_ACCELERATOR_ERROR: type[BaseException] | tuple[()] = getattr(torch, "AcceleratorError", ())


def _read_ahead(tensor: TensorPlan) -> bool:
    """Whether ``tensor``'s blocks are read through the context's ``reads`` (onto the
    device): every merged or dequantized tensor but a packed weight, which reads its own rows."""
    return tensor.action in (Action.MERGE, Action.DEQUANTIZE, Action.REQUANTIZE) and not tensor.packed
