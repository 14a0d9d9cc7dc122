"""NVFP4 arithmetic (compressed-tensors ``nvfp4-pack-quantized``): W = q * (s / g), q an E2M1
value, s the FP8-E4M3 scale of its group of 16 values, g the weight's global scale, the
division and the product each rounded in float32, as compressed-tensors dequantizes.

Its quantizer (``generate_gparam``, ``calculate_qparams``, then the NVFP4 compressor): with
A the largest magnitude of the whole weight, g = (1 / A) * 2688 in float32 (the way torch
computes ``2688 / A``; 1 where that is not finite); a group's scale is s = g * (a / 6) for
a its largest magnitude, rounded to FP8-E4M3 (0.125 where that is 0); q = W / (s / g)
clamped to [-6, 6] and rounded to the nearest E2M1 value, halfway cases to the even code
(0.25 to 0, 0.75 to 1, 1.25 to 1, 1.75 to 2, 2.5 to 2, 3.5 to 4, 5 to 4), negative below 0
(so -0.1 gives -0, and -0 gives +0).
"""

from __future__ import annotations

import torch

from ...codecs.base import QuantFormat
from ...codecs.nvfp4 import GROUP
from . import e2m1
from .base import RowReader, register

SCALE_OF_FP4 = 448.0 * 6.0  # the largest FP8-E4M3 scale times the largest E2M1 value
ZERO_SCALE = 0.125  # compressed-tensors' stand-in for a group scale that rounds to 0
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
# The code of a magnitude m by k = floor(4 m) + ceil(4 m): k / 8 is m where 4 m is whole (a
# tie), and lies between the same midpoints as m where it is not.
_CODES = tuple(sum(k / 8 >= mid if up else k / 8 > mid for mid, up in _MIDPOINTS) for k in range(49))
_TABLES: dict[torch.device, torch.Tensor] = {}


def nvfp4_values(
    out: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    scale_of_scales: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` (float32 [rows, 16 * n]) = the values of ``packed`` (uint8 [rows, 8 * n]) with
    ``scales`` (FP8 [rows, n]) and the global scale, exactly. ``scratch``: room (uint8) for 2
    bytes a value."""
    e2m1.byte_values(out, packed, scratch)
    factors = torch.div(scales.float(), scale_of_scales.float().reshape(()))
    out.view(*scales.shape, GROUP).mul_(factors.unsqueeze(-1))
    return out


def global_scale(largest: torch.Tensor) -> torch.Tensor:
    """The global scale (float32 [1]) of a weight whose largest magnitude is ``largest``."""
    tiny = torch.finfo(torch.float32).tiny
    scale = largest.float().clamp(min=tiny).reciprocal().mul_(SCALE_OF_FP4)  # as Python's 2688 / A computes it
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def nvfp4_quantize(
    value: torch.Tensor, packed: torch.Tensor, scale_of_scales: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``value`` (float32 [rows, 16 * n]) quantized into ``packed`` (uint8 [rows, 8 * n]) with
    the global scale ``scale_of_scales`` as compressed-tensors does; ``value`` is overwritten.
    The group scales (float32 [rows, n], each an FP8 value). ``scratch``: room (uint8) for 6
    bytes a value."""
    count = value.numel()
    if scratch is None:
        scratch = torch.empty(6 * count, dtype=torch.uint8, device=value.device)
    keys = scratch[: 4 * count].view(torch.int32).view(value.shape)
    signs = scratch[4 * count : 5 * count].view(torch.bool).view(value.shape)
    codes = scratch[5 * count : 6 * count].view(value.shape)
    groups = value.view(value.shape[0], -1, GROUP)
    largest = torch.maximum(groups.amax(-1), groups.amin(-1).neg_())
    scales = largest.div_(6.0).mul_(scale_of_scales).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    scales = torch.where(scales == 0, ZERO_SCALE, scales)
    groups.div_((scales / scale_of_scales).unsqueeze(-1)).clamp_(-6.0, 6.0)
    torch.lt(value, 0.0, out=signs)
    quarters = value.abs_().mul_(4.0)
    keys.copy_(quarters)  # floor: a magnitude is never negative
    whole = codes.view(torch.bool)
    torch.gt(quarters, keys, out=whole)  # ceil = floor + 1 where 4 m is not whole
    keys.mul_(2).add_(whole)
    if value.device not in _TABLES:
        _TABLES[value.device] = torch.tensor(_CODES, dtype=torch.uint8, device=value.device)
    torch.index_select(_TABLES[value.device], 0, keys.view(-1), out=codes.view(-1))
    codes.bitwise_or_(signs.view(torch.uint8).bitwise_left_shift_(3))
    e2m1.pack(codes, packed)
    return scales


class Nvfp4Kernel:
    name = "nvfp4"
    whole_scale = True

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return nvfp4_values(out, stored.view(torch.uint8), companions[0], companions[1], room)

    def quantize(
        self,
        fmt: QuantFormat,
        value: torch.Tensor,
        stored: torch.Tensor,
        scale_dtype: torch.dtype,
        room: torch.Tensor | None = None,
        largest: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if largest is None:
            largest = torch.maximum(value.amax(), value.amin().neg())
        scale_of_scales = global_scale(largest)
        scales = nvfp4_quantize(value, stored.view(torch.uint8), scale_of_scales, room)
        return scales.to(scale_dtype), scale_of_scales

    def written(self, fmt: QuantFormat, companions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return companions

    def companion_rows(self, fmt: QuantFormat, index: int, span: tuple[int, int], read: RowReader) -> torch.Tensor:
        return read(index, span if index == 0 else None)

    def within_one_step(self, fmt: QuantFormat, found: torch.Tensor, expected: torch.Tensor) -> bool:
        return e2m1.within_one_step(found, expected)


KERNEL = register(Nvfp4Kernel())
