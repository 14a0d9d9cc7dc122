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

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch

from ..formats.safetensors import numel
from ..planning.model import Combine, TensorPlan
from .blocks import row_blocks
from .buffers import Buffer, Memory
from .factors import AdapterFactors, AdapterReader, Factors
from .kernels import apply_op
from .random_mask import keep_mask
from .selection import Cut, find_cuts, magnitude_bits

# Below this, an L1 norm of a DARE update is taken as zero and the update is not rescaled
# (mergekit's ``rescaled_masked_tensor``).
_NORM_EPSILON = 1e-7
# A sum of weights nearer zero than this divides as one, where no sign is elected (mergekit).
_DIVISOR_EPSILON = 1e-8


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
            self._pruned(update, tensor, pruned[adapter], offset)
            update.mul_(combine.weights[adapter])
        mixed, agreeing = self.sums.tensor(torch.float32, (2, *shape))
        if combine.election is None:
            torch.sum(updates, dim=0, out=mixed)
            divisor = sum(combine.weights)
            if combine.normalize:
                mixed.div_(1.0 if abs(divisor) < _DIVISOR_EPSILON else divisor)
            return value.add_(mixed)
        positive, agrees = self.masks.tensor(torch.bool, (2, *shape))
        self._elect(updates, mixed, positive)
        mixed.zero_()
        agreeing.zero_()
        for slot, adapter in enumerate(adapters):
            update = updates[slot]
            # agrees: its sign is the elected one (a zero has none)
            torch.gt(update, 0, out=agrees).eq_(positive).logical_and_(update != 0)
            mixed.add_(update.mul_(agrees))
            agreeing.add_(agrees, alpha=combine.weights[adapter])
        if combine.normalize:
            mixed.div_(agreeing.masked_fill_(agreeing == 0, 1.0))
        return value.add_(mixed)

    def _elect(self, updates: torch.Tensor, votes: torch.Tensor, positive: torch.Tensor) -> None:
        """Into ``positive``: where the elected sign is +1 (else -1), as the vote is at least 0
        (in ``votes``): the weighted updates' sum, or their signs' (``count``)."""
        if self.combine.election == "count":
            votes.zero_()
            for update in updates:
                votes.add_(update > 0).add_(update < 0, alpha=-1)
        else:
            torch.sum(updates, dim=0, out=votes)
        torch.ge(votes, 0, out=positive)

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

    def _pruned(self, update: torch.Tensor, tensor: TensorPlan, pruning: Pruning, offset: int) -> None:
        """``update`` (its block starting at flat position ``offset``) pruned in place."""
        if pruning.random is not None:
            update.mul_(self._kept_randomly(update, tensor.name, offset, pruning.random))
        elif pruning.keep is not None:
            shape = tuple(update.shape)
            bits = magnitude_bits(self.scratch.tensor(torch.float32, shape).copy_(update))
            kept, dropped = self.masks.tensor(torch.bool, (2, *shape))
            pruning.keep.before(bits, offset, kept)
            if pruning.drop is not None:
                kept.logical_and_(pruning.drop.before(bits, offset, dropped).logical_not_())
            update.mul_(kept)
        if pruning.factor != 1.0:
            update.mul_(pruning.factor)

    def _kept_randomly(self, update: torch.Tensor, name: str, offset: int, density: float) -> torch.Tensor:
        """DARE's mask of a block of tensor ``name`` (see ``random_mask``), beside ``update``."""
        mask = keep_mask(self.combine.seed, name, offset, update.numel(), density)
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
            yield block.first * width, self._update(room, tensor, whole, adapter, block.span)

    def _magnitudes(self, tensor: TensorPlan, whole: Factors, adapter: int) -> Iterator[tuple[int, torch.Tensor]]:
        for offset, update in self._blocks(tensor, whole, adapter):
            yield offset, magnitude_bits(update)

    def _dare(self, tensor: TensorPlan, whole: Factors, adapter: int, density: float) -> Pruning:
        """DARE's pruning of one update, rescaled as mergekit does: so that its L1 norm stays
        what it was (unless either norm is about zero), summed over the tensor in float64."""
        before = after = 0.0
        for offset, update in self._blocks(tensor, whole, adapter):
            magnitudes = update.abs_()
            before += float(magnitudes.sum(dtype=torch.float64))
            magnitudes.mul_(self._kept_randomly(update, tensor.name, offset, density))
            after += float(magnitudes.sum(dtype=torch.float64))
        factor = 1.0 if before < _NORM_EPSILON or after < _NORM_EPSILON else before / after
        return Pruning(random=density, factor=factor)
