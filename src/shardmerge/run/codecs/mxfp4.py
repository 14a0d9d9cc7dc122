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
from .base import RowReader, register, signed_magnitude

# E2M1 magnitudes by code. The midpoints between neighbours (0.25, 0.75, 1.25, 1.75, 2.5,
# 3.5, 5) are all quarters, so the code of a magnitude m is that of floor(4 m), exactly (a tie
# rounds up): _CODES[i] for i = floor(4 m), up to 24 (6 and above).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_SIGNED = E2M1 + tuple(-v for v in E2M1)  # codes 8 to 15: the sign bit set
_CODES = tuple(sum(i >= 4 * mid for mid in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)) for i in range(25))
# 2^(s - 127) for every scale byte s, exact.
_POWERS = tuple(math.ldexp(1.0, s - 127) for s in range(256))


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On ``device``: the two values of every byte (float32 pairs seen as float64 words), the
    power of every scale byte, and the code of every quarter (see ``_CODES``)."""
    if device not in _TABLES:
        pairs = torch.tensor([(E2M1_SIGNED[c & 15], E2M1_SIGNED[c >> 4]) for c in range(256)], dtype=torch.float32)
        _TABLES[device] = (
            pairs.view(torch.float64).view(-1).to(device),
            torch.tensor(_POWERS, dtype=torch.float32, device=device),
            torch.tensor(_CODES, dtype=torch.uint8, device=device),
        )
    return _TABLES[device]


def mxfp4_values(
    out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``out`` (float32 [rows, 32 * n]) = the values of ``blocks`` (uint8 [rows, 16 * n]) with
    ``scales`` (uint8 [rows, n]), exactly. ``scratch``: room (uint8) for 2 bytes a value."""
    pairs, powers, _ = _tables(out.device)
    count = blocks.numel()
    if scratch is None:
        scratch = torch.empty(4 * count, dtype=torch.uint8, device=out.device)
    index = scratch[: 4 * count].view(torch.int32).view(blocks.shape).copy_(blocks)
    # a byte's two values at once: each pair of float32 read and written as one 8-byte word
    torch.index_select(pairs, 0, index.view(-1), out=out.view(-1).view(torch.float64))
    powers = powers[scales.int()]
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
    table = _tables(value.device)[2]
    torch.index_select(table, 0, quarters.view(-1), out=codes.view(-1))
    codes.bitwise_or_(signs.view(torch.uint8).bitwise_left_shift_(3))
    pairs = codes.view(*blocks.shape, 2)
    pairs[..., 1].bitwise_left_shift_(4)
    torch.bitwise_or(pairs[..., 0], pairs[..., 1], out=blocks)


class Mxfp4Kernel:
    name = "mxfp4"

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
        ours, theirs = (signed_magnitude(_nibbles(values), 8) for values in (found, expected))
        return bool((ours - theirs).abs().max() <= 1)


def _nibbles(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of ``values``, in order (the even element in the low nibble)."""
    data = values.contiguous().view(torch.uint8)
    return torch.stack((data & 15, data >> 4), dim=-1).view(-1)


KERNEL = register(Mxfp4Kernel())
