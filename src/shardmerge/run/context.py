"""What every merger of one job shares: where the arithmetic runs and how base blocks get
there, the float32 value being merged, rounding it once into the sink's buffers, the NaN
policy, and the tallies the journal records (unchanged tensors, non-finite values kept from
the base, what requantizing kept of each update).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import NonFiniteError
from ..formats.dtypes import TORCH_DTYPES
from ..planning.model import TensorPlan
from .blocks import Block
from .buffers import Buffer
from .device import Device
from .factors import Factors
from .kernels import all_finite
from .sink import ShardSink


class MergeContext:
    """The shared state of one job's mergers."""

    def __init__(self, place: Device, *, sha256: bool) -> None:
        self.place = place  # where the arithmetic runs, and how bytes get there and back
        self.device = place.torch
        memory = place.memory
        self.read_buffer = Buffer()  # converted tensors' chunks and packed weights' rows
        self.reads = place.reads(self.read_buffer)  # merged blocks, on the device
        self.work = Buffer(memory)  # the float32 value being merged
        self.rounded = Buffer(memory) if place.staged else None
        # Three output buffers: one is written, one hashed, while the next block fills the third.
        # ``sha256``: the shards are published, and the Hub names them by their sha256.
        # On the host, the sink gathers in the caller's thread, and rounds straight into its
        # staging buffers (``round_into_sink``); a device's downloads need its gatherer thread.
        self.sink = ShardSink([Buffer(place.pinned) for _ in range(3)], sha256=sha256, inline=not place.staged)
        # Tensors holding NaN or Inf that the base already held, kept as they were.
        self.kept_non_finite: set[str] = set()
        # Merged tensors whose output is the base's own values (an update of zero).
        self.unchanged: set[str] = set()
        # Requantized weights: squared norms of the update, what survived, the rounding error.
        self.requantized: dict[str, list[float]] = {}

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

    def round_into_sink(
        self, value: torch.Tensor, source: torch.Tensor, tensor: TensorPlan, block: Block, whole: Factors
    ) -> None:
        """``value``, block ``block`` of float tensor ``tensor`` merged from ``source``,
        rounded once straight into the sink's staging buffers (no copy of the rounded bytes),
        piece by piece of the staging buffers it spans; each piece checked as
        ``rounded_bytes``'s output is: for NaN or Inf (the block rounded again to say where,
        only then), and against the base's bytes while the tensor may be unchanged."""
        dtype = TORCH_DTYPES[tensor.dtype]
        flat, base = value.view(-1), source.reshape(-1)
        compare = self.still_unchanged(tensor, block.first)
        checks = [True, compare]  # every value finite so far; the base's bytes so far

        def put(offset: int, room: memoryview) -> None:
            first = offset // dtype.itemsize
            out = torch.frombuffer(room, dtype=dtype)
            out.copy_(flat[first : first + out.numel()])
            checks[0] = checks[0] and all_finite(out)
            checks[1] = checks[1] and same_bytes(out, base[first : first + out.numel()].to(dtype))

        self.sink.fill(flat.numel() * dtype.itemsize, put)
        if not checks[0]:
            rounded = value.to(dtype)
            self.non_finite(
                tensor, source.reshape(block.shape), rounded, lambda: self.merge_cause(tensor, value, whole)
            )
        if compare:
            self.note_unchanged(tensor, checks[1])

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

    def merge_cause(self, tensor: TensorPlan, value: torch.Tensor, whole: Factors) -> str:
        """Why a merged value holds NaN or Inf that its base does not."""
        if all_finite(value):
            return out_of_range(tensor)
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

    def still_unchanged(self, tensor: TensorPlan, first: int) -> bool:
        """Whether a merged tensor may still equal the base at its block beginning at row
        ``first``: once a block differs, no more compares."""
        return bool(tensor.ops) and (first == 0 or tensor.name in self.unchanged)

    def note_unchanged(self, tensor: TensorPlan, same: bool) -> None:
        if same:
            self.unchanged.add(tensor.name)
        else:
            self.unchanged.discard(tensor.name)

    def measure(self, tensor: TensorPlan, update: torch.Tensor, kept: torch.Tensor) -> None:
        """Add the squared norms of a requantized piece's ``update`` (dW), of what survived
        (``kept``: Q(W + dW) - W, overwritten) and of the error, Q(W + dW) - (W + dW), to its
        weight's figures."""
        norms = self.requantized.setdefault(tensor.name, [0.0, 0.0, 0.0])
        flat, kept = update.reshape(-1), kept.view(-1)
        norms[0] += _square(flat)
        norms[1] += _square(kept)
        norms[2] += _square(kept.sub_(flat))

    def check_requantized(self, tensor: TensorPlan) -> None:
        """No NaN written by requantizing but the base's own."""
        norms = self.requantized.get(tensor.name, [])
        if not all(math.isfinite(square) for square in norms) and tensor.name not in self.kept_non_finite:
            raise NonFiniteError(
                "requantizing wrote NaN where the merge has none (a scale out of its dtype's range?)",
                tensor=tensor.name,
                hint="write a 16-bit output with --dtype bfloat16",
            )


def out_of_range(tensor: TensorPlan) -> str:
    return f"out of range for {tensor.dtype}: choose --dtype bfloat16 or float32"


def _square(values: torch.Tensor) -> float:
    """The squared norm of ``values`` (a flat float32 tensor)."""
    return float(torch.dot(values, values))


def same_bytes(output: torch.Tensor, base: torch.Tensor) -> bool:
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
