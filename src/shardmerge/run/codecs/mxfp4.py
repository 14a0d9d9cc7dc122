"""MXFP4 arithmetic (gpt-oss): a byte holds two E2M1 values (the even element in the low
nibble), 32 values share a scale byte s standing for 2^(s - 127). The reference quantizer
(OpenAI's ``triton_kernels``, the one gpt-oss was published with) takes a block's largest
magnitude a, divides it by 6 in float32 and rounds that up to a power of two (0 stays 0:
scale byte 0, values 0); it multiplies each value by the reciprocal and rounds it to the
nearest E2M1 magnitude, halfway cases away from zero, with the value's sign (so -0.1 gives
-0) and 6 at most.
"""

from __future__ import annotations

import math

import torch

from ...codecs.base import QuantFormat
from ...codecs.mxfp4 import BLOCK
from . import e2m1
from .base import RowReader, register

# The midpoints between E2M1 magnitudes (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) are all
# quarters, so the code of a magnitude m is that of floor(4 m), exactly (a tie rounds up):
# _CODES[i] for i = floor(4 m), up to 24 (6 and above).
_CODES = tuple(sum(i >= 4 * mid for mid in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)) for i in range(25))
# 2^(s - 127) for every scale byte s, exact.
_POWERS = tuple(math.ldexp(1.0, s - 127) for s in range(256))


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """On ``device``: the power of every scale byte, and the code of every quarter (see
    ``_CODES``)."""
    if device not in _TABLES:
        _TABLES[device] = (
            torch.tensor(_POWERS, dtype=torch.float32, device=device),
            torch.tensor(_CODES, dtype=torch.uint8, device=device),
        )
    return _TABLES[device]


def mxfp4_values(
    out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``out`` (float32 [rows, 32 * n]) = the values of ``blocks`` (uint8 [rows, 16 * n]) with
    ``scales`` (uint8 [rows, n]), exactly. ``scratch``: room (uint8) for 2 bytes a value."""
    e2m1.byte_values(out, blocks, scratch)
    powers = _tables(out.device)[0][scales.int()]
    out.view(*scales.shape, 32).mul_(powers.unsqueeze(-1))
    return out


def mxfp4_quantize(
    value: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, scratch: torch.Tensor | None = None
) -> None:
    """``value`` (float32 [rows, 32 * n]) quantized into ``blocks`` (uint8 [rows, 16 * n]) and
    ``scales`` (uint8 [rows, n]) as the reference quantizer does; ``value`` is overwritten.
    ``scratch``: room (uint8) for 6 bytes a value."""
    count = value.numel()
    if scratch is None:
        scratch = torch.empty(6 * count, dtype=torch.uint8, device=value.device)
    quarters = scratch[: 4 * count].view(torch.int32).view(value.shape)
    signs = scratch[4 * count : 5 * count].view(torch.bool).view(value.shape)
    codes = scratch[5 * count : 6 * count].view(value.shape)
    groups = value.view(*scales.shape, 32)
    largest = torch.maximum(groups.amax(-1), groups.amin(-1).neg_())
    bits = ((largest / 6.0).view(torch.int32) + 0x7FFFFF).bitwise_and_(0x7F800000)
    scales.copy_(bits >> 23)
    rounded = bits.view(torch.float32)
    groups.mul_(torch.where(rounded > 0, 1.0 / rounded, 0.0).unsqueeze(-1))
    torch.signbit(value, out=signs)
    quarters.copy_(value.abs_().mul_(4.0).clamp_(max=24.0))  # floor: a magnitude is never negative
    table = _tables(value.device)[1]
    torch.index_select(table, 0, quarters.view(-1), out=codes.view(-1))
    codes.bitwise_or_(signs.view(torch.uint8).bitwise_left_shift_(3))
    e2m1.pack(codes, blocks)


class Mxfp4Kernel:
    name = "mxfp4"
    whole_scale = False

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return mxfp4_values(out, stored.view(torch.uint8), companions[0], room)

    def quantize(
        self,
        fmt: QuantFormat,
        value: torch.Tensor,
        stored: torch.Tensor,
        scale_dtype: torch.dtype,
        room: torch.Tensor | None = None,
        largest: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        rows, cols = value.shape
        scales = torch.empty(rows, cols // BLOCK, dtype=torch.uint8, device=value.device)
        mxfp4_quantize(value, stored.view(torch.uint8), scales, room)
        return (scales,)

    def written(self, fmt: QuantFormat, companions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return companions

    def companion_rows(self, fmt: QuantFormat, index: int, span: tuple[int, int], read: RowReader) -> torch.Tensor:
        return read(index, span)

    def within_one_step(self, fmt: QuantFormat, found: torch.Tensor, expected: torch.Tensor) -> bool:
        return e2m1.within_one_step(found, expected)


KERNEL = register(Mxfp4Kernel())
