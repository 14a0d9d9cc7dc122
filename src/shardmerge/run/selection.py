"""Exact order statistics of a tensor's magnitudes without holding the tensor: the cut after
its k largest, found from blocks of it fed in a few passes (a radix selection over float32
bit patterns), in memory of a block and two histograms.

The magnitudes are ranked from the largest; equal magnitudes rank by position, the earlier
(row-major, in the stored tensor) first. So "the k largest" is always exactly k elements,
whatever the ties, and the same whichever blocks the tensor is fed in.

A non-negative float32's bit pattern, read as an integer, orders as its value does. The first
pass counts the top 16 bits of every magnitude (32768 bins: the sign bit is clear) and finds
the bin the k-th largest falls in; the second counts the low 16 bits of the magnitudes in
that bin, which gives the k-th largest value exactly and how many magnitudes equal it. Only
where the cut falls among equal non-zero magnitudes, and keeps only some of them, a third
pass finds the position of the last one kept. Tied zeros need none: a zero kept or dropped is
the same zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .buffers import Buffer

_HIGH_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit clear)
_LOW_BINS = 1 << 16
_NONE_BEFORE = 0x7F800001  # above every finite float's and infinity's bits (a cut before all)

# Each pass's blocks: their flat offset in the tensor, and their magnitudes' bit patterns as
# int32 (see ``magnitude_bits``), computed afresh for each pass.
Blocks = Callable[[], Iterable[tuple[int, torch.Tensor]]]


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``values``' magnitudes (float32, made absolute in place), as int32."""
    return values.abs_().view(torch.int32)


@dataclass(frozen=True)
class Cut:
    """The boundary after the ``rank`` largest magnitudes: every magnitude whose bits exceed
    ``bits`` is before it, and of the ``equal`` magnitudes with those bits the first
    ``quota``, those at flat positions up to ``last`` (-1: all of them, or none is needed)."""

    rank: int
    bits: int = -1  # -1 with rank 0: nothing is before the cut
    quota: int = 0
    equal: int = 0
    last: int = -1

    def before(self, bits: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Which of a block's magnitudes (``bits``, see ``magnitude_bits``; the block starts
        at flat position ``offset``) rank before the cut, into ``out`` (bool, the block's
        shape)."""
        if self.rank == 0:
            return out.zero_()
        if self.last < 0 or self.last >= offset + bits.numel():
            return torch.ge(bits, self.bits, out=out)
        torch.gt(bits, self.bits, out=out)
        if self.last >= offset:  # the equal magnitudes up to ``last`` too: a prefix of the block
            prefix = self.last - offset + 1
            out.view(-1)[:prefix] |= bits.reshape(-1)[:prefix] == self.bits
        return out

    def lowest(self, offset: int, count: int) -> int | None:
        """The lowest bits before the cut, where the ``count`` magnitudes of the block at flat
        position ``offset`` are before it exactly when their bits are at least that (a
        number above every float's where none is); None where equal magnitudes in the block
        are before it by position."""
        if self.rank == 0:
            return _NONE_BEFORE
        if self.last < 0 or self.last >= offset + count:
            return self.bits
        return self.bits + 1 if self.last < offset else None


def find_cuts(blocks: Blocks, ranks: Sequence[int], count: int, room: Buffer) -> list[Cut]:
    """The cuts after the ``ranks`` largest of a tensor's ``count`` magnitudes, fed by ``blocks``
    in two passes (three where a cut keeps only some of the equal magnitudes at it); ``room``
    holds a block's digits (int32)."""
    if not any(0 < rank < count for rank in ranks):
        return [_whole(rank, count) for rank in ranks]
    (high,) = _histograms(blocks, [lambda bits: bits.bitwise_right_shift_(16)], _HIGH_BINS)
    above_high = np.cumsum(high[::-1])  # magnitudes in bins from the top down to each bin
    starts = {}
    for rank in ranks:
        if 0 < rank < count:
            index = int(np.searchsorted(above_high, rank))
            starts[rank] = (_HIGH_BINS - 1 - index, int(above_high[index] - high[_HIGH_BINS - 1 - index]))
    tops = sorted({top for top, _ in starts.values()})

    def low(bits: torch.Tensor, top: int) -> torch.Tensor:
        # The low 16 bits of the magnitudes in bin ``top``, plus one; 0 and LOW_BINS + 1 for
        # those below and above it (counted, then dropped).
        digits = room.tensor(torch.int32, tuple(bits.shape))
        return torch.sub(bits, (top << 16) - 1, out=digits).clamp_(0, _LOW_BINS + 1)

    digits = [partial(low, top=top) for top in tops]
    counts = _histograms(blocks, digits, _LOW_BINS + 2)
    lows = {top: found[1:-1] for top, found in zip(tops, counts, strict=True)}
    cuts = {}
    for rank, (top, greater) in starts.items():
        low = lows[top]
        above_low = np.cumsum(low[::-1])
        index = int(np.searchsorted(above_low, rank - greater))
        bin_ = _LOW_BINS - 1 - index
        equal = int(low[bin_])
        greater += int(above_low[index]) - equal
        cuts[rank] = Cut(rank, (top << 16) | bin_, rank - greater, equal)
    _place_ties(blocks, cuts)
    return [cuts.get(rank) or _whole(rank, count) for rank in ranks]


def _whole(rank: int, count: int) -> Cut:
    """The cut before every magnitude (rank 0) or after every one (rank ``count``)."""
    return Cut(0) if rank <= 0 else Cut(count, 0, count, count)


def _histograms(blocks: Blocks, digits: list[Callable[[torch.Tensor], torch.Tensor]], bins: int) -> list[np.ndarray]:
    """Counts of each of ``digits`` of every magnitude (``bins`` values), in one pass."""
    totals: list[torch.Tensor] = []
    for _, bits in blocks():
        counts = [torch.bincount(digit(bits).reshape(-1), minlength=bins) for digit in digits]
        totals = counts if not totals else [total.add_(count) for total, count in zip(totals, counts, strict=True)]
    assert totals, "a tensor has at least one block"
    return [total.cpu().numpy() for total in totals]


def _place_ties(blocks: Blocks, cuts: dict[int, Cut]) -> None:
    """Find, in one more pass, the position of the last equal magnitude before each cut that
    keeps only some of those equal to it (non-zero ones: tied zeros need no position)."""
    pending = {rank: cut for rank, cut in cuts.items() if cut.quota < cut.equal and cut.bits > 0}
    if not pending:
        return
    seen = dict.fromkeys(pending, 0)
    for offset, bits in blocks():
        for rank, cut in list(pending.items()):
            equal = (bits == cut.bits).reshape(-1)
            here = int(equal.sum())
            if seen[rank] + here >= cut.quota:
                position = int(torch.nonzero(equal)[cut.quota - seen[rank] - 1])
                cuts[rank] = Cut(cut.rank, cut.bits, cut.quota, cut.equal, offset + position)
                del pending[rank]
            else:
                seen[rank] += here
        if not pending:
            return
    raise AssertionError("a pass computed other magnitudes than the one before it")
