"""The streamed selection of a tensor's k largest magnitudes against torch on the whole tensor:
the threshold against ``torch.kthvalue``, the elements kept against a stable sort (equal
magnitudes ranked by position), fed in many blocks of uneven size."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shardmerge.run.buffers import Buffer
from shardmerge.run.selection import Cut, find_cuts, magnitude_bits


class Fed:
    """A tensor fed in blocks of ``rows`` rows, as a merge's passes feed it; counts the passes."""

    def __init__(self, tensor: torch.Tensor, rows: int) -> None:
        self.tensor, self.rows, self.passes = tensor, rows, 0

    def __call__(self) -> Iterator[tuple[int, torch.Tensor]]:
        self.passes += 1
        width = self.tensor[0].numel()
        for first in range(0, self.tensor.shape[0], self.rows):
            yield first * width, magnitude_bits(self.tensor[first : first + self.rows].clone())


def _kept(tensor: torch.Tensor, cut: Cut, rows: int) -> torch.Tensor:
    width = tensor[0].numel()
    return torch.cat(
        [
            cut.before(
                magnitude_bits(tensor[first : first + rows].clone()),
                first * width,
                torch.empty(tensor[first : first + rows].shape, dtype=torch.bool),
            ).reshape(-1)
            for first in range(0, tensor.shape[0], rows)
        ]
    )


def _value(cut: Cut) -> float:
    """The magnitude at the cut: the float32 of its bits."""
    return torch.tensor([cut.bits], dtype=torch.int32).view(torch.float32).item()


def _largest(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest magnitudes, equal ones by position: a stable sort of the whole tensor."""
    order = torch.sort(-tensor.abs().reshape(-1), stable=True).indices
    kept = torch.zeros(tensor.numel(), dtype=torch.bool)
    kept[order[:k]] = True
    return kept


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_the_threshold_is_kthvalue_and_the_kept_are_the_k_largest(rows: int) -> None:
    tensor = torch.randn(300, 37, generator=torch.Generator().manual_seed(rows))
    fed = Fed(tensor, rows)
    count = tensor.numel()
    ranks = [1, 5, count // 3, count // 2, count - 1]
    cuts = find_cuts(fed, ranks, count, Buffer())
    assert fed.passes == 2
    for rank, cut in zip(ranks, cuts, strict=True):
        assert _value(cut) == torch.kthvalue(tensor.abs().reshape(-1), count - rank + 1).values.item()
        assert torch.equal(_kept(tensor, cut, rows), _largest(tensor, rank))


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_ties_at_the_threshold_keep_the_earliest(rows: int) -> None:
    # Few distinct magnitudes, both signs: every cut falls among many equal ones.
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randint(1, 6, (40, 25), generator=generator).float() * 0.375
    tensor *= torch.randint(0, 2, tensor.shape, generator=generator).float() * 2 - 1
    fed = Fed(tensor, rows)
    count = tensor.numel()
    ranks = [1, 17, 333, count // 2, 777, count - 2]
    cuts = find_cuts(fed, ranks, count, Buffer())
    assert fed.passes == 3  # the third places the last of the equal magnitudes kept
    for rank, cut in zip(ranks, cuts, strict=True):
        assert _value(cut) == torch.kthvalue(tensor.abs().reshape(-1), count - rank + 1).values.item()
        assert cut.quota < cut.equal
        kept = _kept(tensor, cut, rows)
        assert int(kept.sum()) == rank
        assert torch.equal(kept, _largest(tensor, rank))


def test_tied_zeros_are_kept_whole_and_change_nothing() -> None:
    tensor = torch.randn(50, 20, generator=torch.Generator().manual_seed(4))
    tensor[10:30] = 0.0
    tensor[12, 3] = -0.0
    fed = Fed(tensor, 8)
    count = tensor.numel()
    rank = count - 100  # among the 400 zeros
    (cut,) = find_cuts(fed, [rank], count, Buffer())
    assert fed.passes == 2 and _value(cut) == 0.0
    kept = _kept(tensor, cut, 8)
    assert torch.equal(kept, _largest(tensor, rank) | (tensor.reshape(-1) == 0))
    flat = tensor.reshape(-1)
    assert torch.equal(torch.where(kept, flat, 0.0), torch.where(_largest(tensor, rank), flat, 0.0))


def test_no_cut_inside_needs_no_pass() -> None:
    tensor = torch.randn(4, 4)
    fed = Fed(tensor, 2)
    nothing, everything = find_cuts(fed, [0, 16], 16, Buffer())
    assert fed.passes == 0
    assert not _kept(tensor, nothing, 2).any()
    assert _kept(tensor, everything, 2).all()
