"""``--combine``: several adapters' updates of a tensor combined as mergekit combines task
vectors (TIES, DARE, breadcrumbs), block by block, in memory of a block per adapter.

Adapter i's task vector is its update at weight 1, tau_i = s * B @ A computed exactly (the
sum of its ops on the tensor applied to zeros). Each is pruned, multiplied by its weight
w_i, and the weighted updates are summed where their sign agrees with the elected one (the
*_ties methods) and divided by the weights summed alike (``normalize``); the base's float32
value plus that sum is rounded once, by the caller.

Pruning needs numbers of the whole tensor, found before its first block is merged, in passes
over its blocks that compute each update afresh (cheap at low rank): the magnitudes at which
ties and breadcrumbs cut (``selection``), or the L1 norms of a DARE update before and after
its mask. The tensor's base values are read only by the last pass.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch

from ..errors import NonFiniteError
from ..formats.safetensors import numel
from ..planning.model import Combine, TensorPlan
from .blocks import row_blocks
from .buffers import Buffer, Memory
from .factors import AdapterFactors, AdapterReader, Factors
from .kernels import all_finite, apply_op
from .random_mask import keep_mask
from .selection import Cut, find_cuts, magnitude_bits

# Below this, an L1 norm of a DARE update is taken as zero and the update is not rescaled
# (mergekit's ``rescaled_masked_tensor``).
_NORM_EPSILON = 1e-7
# A sum of weights nearer zero than this divides as one, where no sign is elected (mergekit).
_DIVISOR_EPSILON = 1e-8
# The largest finite float32's bits: a cut above them drops nothing finite.
_LARGEST = 0x7F7FFFFF


def _float(bits: int) -> float:
    """The float32 whose bits are ``bits``."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]


@dataclass(frozen=True)
class Pruning:
    """How one adapter's update of one tensor is pruned: kept where it ranks before ``keep``
    and not before ``drop`` (ties, breadcrumbs), or where DARE's mask of density ``random``
    keeps it, then multiplied by ``factor``. Nothing pruned without ``keep`` or ``random``."""

    keep: Cut | None = None
    drop: Cut | None = None
    random: float | None = None
    factor: float = 1.0


class CombiningFactors(AdapterFactors):
    """The adapter factors of a job whose tensors are combined (see the module's docstring):
    ``whole`` also prunes each combined tensor's updates before its first block, ``apply``
    combines them."""

    def __init__(self, memory: Memory, adapters: list[AdapterReader], combine: Combine) -> None:
        super().__init__(memory, adapters)
        self.combine = combine
        self.updates = Buffer(memory)  # each adapter's update of the block, one after another
        self.sums = Buffer(memory)  # their sum, and the weights that agree with the elected sign
        self.scratch = Buffer(memory)  # a block's magnitudes' bits, or their digits
        self.masks = Buffer(memory)  # two masks of a block
        self.pruned: tuple[str, dict[int, Pruning]] | None = None  # the last tensor's

    def reserve_combined(self, tensors: list[TensorPlan]) -> None:
        """Room for the largest block of any of ``tensors`` that is combined."""
        largest = [
            (len({op.adapter for op in tensor.ops}), max(numel(block.shape) for block in row_blocks(tensor)))
            for tensor in tensors
            if tensor.combined
        ]
        self.updates.take(max((4 * adapters * count for adapters, count in largest), default=0))
        most = max((count for _, count in largest), default=0)
        self.sums.take(8 * most)
        self.scratch.take(4 * most)
        self.masks.take(2 * most)

    def whole(self, tensor: TensorPlan) -> Factors:
        factors = super().whole(tensor)
        if tensor.combined and (self.pruned is None or self.pruned[0] != tensor.name):
            self.pruned = (tensor.name, self._prune(tensor, factors))
        return factors

    def apply(
        self,
        value: torch.Tensor,
        tensor: TensorPlan,
        whole: Factors,
        rows: tuple[int, int] | None,
        expert: tuple[int, bool] | None = None,
    ) -> torch.Tensor:
        if not tensor.combined:
            return super().apply(value, tensor, whole, rows, expert)
        assert expert is None and self.pruned is not None and self.pruned[0] == tensor.name
        pruned = self.pruned[1]
        combine = self.combine
        offset = 0 if rows is None else rows[0] * (value.numel() // max(rows[1] - rows[0], 1))
        shape = tuple(value.shape)
        adapters = sorted(pruned)
        updates = self.updates.tensor(torch.float32, (len(adapters), *shape))
        for slot, adapter in enumerate(adapters):
            update = self._update(updates[slot], tensor, whole, adapter, rows)
            self._pruned(update, tensor.name, adapter, pruned[adapter], offset)
            update.mul_(combine.weights[adapter])
        mixed, agreeing = self.sums.tensor(torch.float32, (2, *shape))
        if combine.election is None:
            torch.sum(updates, dim=0, out=mixed)
            divisor = sum(combine.weights)
            if combine.normalize:
                mixed.div_(1.0 if abs(divisor) < _DIVISOR_EPSILON else divisor)
            return value.add_(mixed)
        elected = self.scratch.tensor(torch.float32, shape)
        self._elect(updates, mixed, elected)
        mixed.zero_()
        agreeing.zero_()
        for slot, adapter in enumerate(adapters):
            # The update where its sign is the elected one (a zero has none), in float32 ops
            # alone: u * e is |u| there, and not above zero elsewhere; times e again, u.
            agreed = updates[slot].mul_(elected).clamp_(min=0)
            mixed.addcmul_(agreed, elected)
            agreeing.add_(agreed.sign_(), alpha=combine.weights[adapter])
        if combine.normalize:  # where no update agrees, the divisor is 0: divide by 1 there
            none = torch.sign(agreeing, out=elected).abs_().neg_().add_(1.0)
            mixed.div_(agreeing.add_(none))
        return value.add_(mixed)

    def _elect(self, updates: torch.Tensor, votes: torch.Tensor, elected: torch.Tensor) -> None:
        """Into ``elected``: the elected sign of every element, +1 where the vote (in
        ``votes``) is at least 0, else -1. The vote is the weighted updates' sum, or their
        signs' (``count``). A vote of -0 is one of updates that are all zero, which agree with
        neither sign."""
        if self.combine.election == "count":
            votes.zero_()
            for update in updates:
                votes.add_(torch.sign(update, out=elected))
        else:
            torch.sum(updates, dim=0, out=votes)
        torch.copysign(torch.ones((), device=votes.device), votes, out=elected)

    def _update(
        self, into: torch.Tensor, tensor: TensorPlan, whole: Factors, adapter: int, rows: tuple[int, int] | None
    ) -> torch.Tensor:
        """Adapter ``adapter``'s update of rows ``rows`` of ``tensor`` at weight 1, in ``into``."""
        into.zero_()
        for op, factors in zip(tensor.ops, whole, strict=True):
            if op.adapter == adapter:
                assert factors is not None
                apply_op(into, replace(op, weight=1.0), factors, rows)
        return into

    def _pruned(self, update: torch.Tensor, name: str, adapter: int, pruning: Pruning, offset: int) -> None:
        """Adapter ``adapter``'s ``update`` of tensor ``name`` (its block starting at flat
        position ``offset``) pruned in place."""
        if pruning.random is not None:
            dropped = self._kept_randomly(update, adapter, name, offset, pruning.random).logical_not_()
            update.masked_fill_(dropped, 0.0)
        elif pruning.keep is not None:
            self._trimmed(update, pruning.keep, pruning.drop, offset)
        if pruning.factor != 1.0:
            update.mul_(pruning.factor)

    def _trimmed(self, update: torch.Tensor, keep: Cut, drop: Cut | None, offset: int) -> None:
        """``update`` kept where it ranks before ``keep`` and not before ``drop``. Where each
        cut is a plain threshold over the block (no equal magnitudes split by position in
        it), by float32 thresholds on the magnitudes; else through masks."""
        shape = tuple(update.shape)
        lowest = keep.lowest(offset, update.numel())
        highest = drop.lowest(offset, update.numel()) if drop is not None else None
        if lowest is not None and (drop is None or highest is not None):
            magnitudes = torch.abs(update, out=self.scratch.tensor(torch.float32, shape))
            if lowest > 0:  # kept: at least the lowest, so above the float just below it
                torch.nn.functional.threshold(magnitudes, _float(lowest - 1), 0.0, inplace=True)
            if highest is not None and highest <= _LARGEST:  # and below the highest dropped
                torch.nn.functional.threshold(magnitudes.neg_(), -_float(highest), 0.0, inplace=True).neg_()
            torch.copysign(magnitudes, update, out=update)
            return
        bits = magnitude_bits(self.scratch.tensor(torch.float32, shape).copy_(update))
        kept, dropped = self.masks.tensor(torch.bool, (2, *shape))
        keep.before(bits, offset, kept)
        if drop is not None:
            kept.logical_and_(drop.before(bits, offset, dropped).logical_not_())
        update.mul_(kept)

    def _kept_randomly(
        self, update: torch.Tensor, adapter: int, name: str, offset: int, density: float
    ) -> torch.Tensor:
        """DARE's mask of adapter ``adapter``'s update of a block of tensor ``name`` (see
        ``random_mask``), beside ``update``."""
        mask = keep_mask(self.combine.seed, adapter, name, offset, update.numel(), density)
        return torch.from_numpy(mask).to(update.device).reshape(update.shape)

    def _prune(self, tensor: TensorPlan, whole: Factors) -> dict[int, Pruning]:
        """How each adapter's update of ``tensor`` is pruned, found in passes over its blocks."""
        combine = self.combine
        count = numel(tensor.shape)
        pruned = {}
        for adapter in sorted({op.adapter for op in tensor.ops}):
            density = combine.densities[adapter]
            if combine.pruning is None or density >= 1:
                pruned[adapter] = Pruning()
            elif combine.pruning == "random":
                pruned[adapter] = self._dare(tensor, whole, adapter, density)
            else:
                blocks = partial(self._magnitudes, tensor, whole, adapter)
                if combine.pruning == "magnitude":
                    (keep,) = find_cuts(blocks, [max(1, int(density * count))], count, self.scratch)
                    pruned[adapter] = Pruning(keep)
                else:
                    # breadcrumbs: of the magnitudes in ascending order, the int(density * count)
                    # after the smallest count - kept - int(gamma * count) (none, at least)
                    kept = int(density * count)
                    bottom = max(0, count - kept - int(combine.gamma * count))
                    drop, keep = find_cuts(blocks, [count - bottom - kept, count - bottom], count, self.scratch)
                    pruned[adapter] = Pruning(keep, drop)
        return pruned

    def _blocks(self, tensor: TensorPlan, whole: Factors, adapter: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Each block's flat offset and adapter ``adapter``'s update of it, computed afresh."""
        width = numel(tensor.shape[1:]) if not tensor.expert_rows else tensor.shape[-1]
        for block in row_blocks(tensor):
            room = self.updates.tensor(torch.float32, block.shape)
            update = self._update(room, tensor, whole, adapter, block.span)
            if not all_finite(update):  # it would decide thresholds and norms, and vanish where pruned
                raise NonFiniteError(
                    f"adapter {adapter}'s update holds NaN or Inf",
                    file=self.adapters[adapter].path,
                    tensor=tensor.name,
                    hint="the adapter is damaged or its training diverged: leave it out",
                )
            yield block.first * width, update

    def _magnitudes(self, tensor: TensorPlan, whole: Factors, adapter: int) -> Iterator[tuple[int, torch.Tensor]]:
        for offset, update in self._blocks(tensor, whole, adapter):
            yield offset, magnitude_bits(update)

    def _dare(self, tensor: TensorPlan, whole: Factors, adapter: int, density: float) -> Pruning:
        """DARE's pruning of one update, rescaled as mergekit does: so that its L1 norm stays
        what it was (unless either norm is about zero), each block's sum added in float64."""
        before = after = 0.0
        for offset, update in self._blocks(tensor, whole, adapter):
            magnitudes = update.abs_()
            before += float(magnitudes.sum())
            dropped = self._kept_randomly(update, adapter, tensor.name, offset, density).logical_not_()
            after += float(magnitudes.masked_fill_(dropped, 0.0).sum())
        factor = 1.0 if before < _NORM_EPSILON or after < _NORM_EPSILON else before / after
        return Pruning(random=density, factor=factor)
