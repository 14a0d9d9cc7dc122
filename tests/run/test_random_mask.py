"""DARE's masks: the same whatever blocks a tensor is drawn in, independent between adapters
and tensors, and keeping the density asked for."""

from __future__ import annotations

import itertools

import numpy as np

from shardmerge.run.random_mask import keep_mask


def test_a_mask_drawn_in_blocks_is_the_mask_drawn_whole() -> None:
    whole = keep_mask(5, 0, "model.layers.0.mlp.down_proj.weight", 0, 10_000, 0.3)
    cuts = [0, 1, 2, 7, 15, 16, 17, 63, 64, 65, 1000, 4097, 9999, 10_000]
    name = "model.layers.0.mlp.down_proj.weight"
    pieces = [keep_mask(5, 0, name, begin, end - begin, 0.3) for begin, end in itertools.pairwise(cuts)]
    assert np.array_equal(np.concatenate(pieces), whole)


def test_adapters_and_tensors_draw_masks_of_their_own() -> None:
    count, density = 200_000, 0.3
    first = keep_mask(0, 0, "a.weight", 0, count, density)
    second = keep_mask(0, 1, "a.weight", 0, count, density)
    other = keep_mask(0, 0, "b.weight", 0, count, density)
    reseeded = keep_mask(1, 0, "a.weight", 0, count, density)
    for mask in (first, second, other, reseeded):
        assert abs(mask.mean() - density) < 0.005
    for mask in (second, other, reseeded):
        assert abs((first & mask).mean() - density**2) < 0.005  # independent, not the same
    assert keep_mask(0, 0, "a.weight", 0, count, 1.0).all()
