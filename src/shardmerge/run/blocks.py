"""The blocks of rows a tensor is merged in, as the plan fixed them, and reading their base
bytes onto the device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from ..formats.dtypes import TORCH_DTYPES
from ..formats.fileio import pread_into
from ..planning.model import TensorPlan
from .device import Fill, Reads


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
    """The blocks of rows ``tensor`` is merged in, as the plan fixed them. Those of a fused
    expert tensor merged by expert rows (``TensorPlan.expert_rows``) count rows of all its
    experts' matrices in turn, each block within one expert."""
    if tensor.expert_rows:
        return _expert_blocks(tensor)
    rows = tensor.shape[0] if tensor.shape else 1
    step = max(1, tensor.block_rows or rows)
    row_bytes = (tensor.src_end - tensor.src_begin) // max(tensor.base_rows or rows, 1)
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


def _expert_blocks(tensor: TensorPlan) -> list[Block]:
    experts, rows, cols = tensor.shape
    step = max(1, tensor.block_rows)
    row_bytes = (tensor.src_end - tensor.src_begin) // (experts * rows)
    blocks = []
    for expert in range(experts):
        for first in range(expert * rows, (expert + 1) * rows, step):
            last = min((expert + 1) * rows, first + step)
            begin = tensor.src_begin + first * row_bytes
            blocks.append(
                Block(first, last, (first, last), (last - first, cols), begin, begin + (last - first) * row_bytes)
            )
    return blocks


def read_blocks(reads: Reads, fd: int, tensor: TensorPlan, blocks: list[Block]) -> Iterator[torch.Tensor]:
    """The base's bytes of each of ``blocks`` of ``tensor`` (read from ``fd``) on the device,
    as its source dtype, through ``reads``; zeros for a resized tensor, whose replacement
    (the adapter's whole tensor, at weight 1) makes the base's values irrelevant."""
    fills: list[tuple[int, Fill]] = [
        (block.end - block.begin, _zero if tensor.base_rows else partial(_pread, fd, block.begin)) for block in blocks
    ]
    for raw in reads.blocks(fills):
        yield raw.view(TORCH_DTYPES[tensor.src_dtype])


def _pread(fd: int, begin: int, raw: torch.Tensor) -> None:
    pread_into(fd, memoryview(raw.numpy()), begin)


def _zero(raw: torch.Tensor) -> None:
    raw.zero_()
