"""Packed-integer arithmetic (compressed-tensors ``pack-quantized``): b-bit values offset by
2^(b-1), element i of a row at bits i * b of its int32 words, little end first;
W = (q - z) * scale per group. Its quantizer (``calculate_qparams``, then ``quantize``):
symmetric, scale = max |W| / ((2^b - 1) / 2); asymmetric, with m = min(W, 0) and
M = max(W, 0), scale = (M - m) / (2^b - 1) and z = round(clamp(-2^(b-1) - m / scale)); a
zero scale becomes float32's epsilon; the scale is stored in the checkpoint's scale dtype and
q = clamp(round(W / stored + z)) with halfway cases to even. Asymmetric zero points are
packed along the rows.
"""

from __future__ import annotations

import math

import torch

from ...codecs.base import QuantFormat
from .base import RowReader, nonzero, register


def int_values(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The signed values (int32 [rows, columns]) packed in ``packed`` (int32 [rows, words])."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts).bitwise_and_((1 << bits) - 1)
    return values.view(packed.shape[0], -1)[:, :columns] - (1 << (bits - 1))


def int_pack(values: torch.Tensor, bits: int, packed: torch.Tensor) -> torch.Tensor:
    """``values`` (signed, [rows, columns]) packed into ``packed`` (int32 [rows, words]), the
    words' unused high elements 0."""
    per = 32 // bits
    rows, columns = values.shape
    padded = torch.zeros(rows, packed.shape[1] * per, dtype=torch.int32, device=values.device)
    padded[:, :columns] = values
    padded[:, :columns] += 1 << (bits - 1)
    spread = padded.view(rows, -1, per) << torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
    packed.zero_()
    for index in range(per):
        packed.bitwise_or_(spread[..., index])
    return packed


def int_dequantize(
    out: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """``out`` (float32 [rows, columns]) = (values - zero) * scale, group by group."""
    groups = scale.shape[-1]
    out.copy_(values)
    grouped = out.view(out.shape[0], groups, -1)
    if zero is not None:
        grouped.sub_(zero.unsqueeze(-1))
    return grouped.mul_(scale.float().unsqueeze(-1)).view(out.shape)


def int_quantize(
    value: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``value`` (float32 [rows, columns]) quantized as compressed-tensors does: the signed
    values (int32), the scales as stored, and the zero points (asymmetric). ``value`` is
    scaled in place."""
    rows, columns = value.shape
    group = fmt.block[1] if fmt.block else columns
    grouped = value.view(rows, columns // group, group)
    high = grouped.amax(-1).clamp_(min=0.0)
    low = grouped.amin(-1).clamp_(max=0.0)
    top = float((1 << fmt.bits) - 1)
    qmin, qmax = -float(1 << (fmt.bits - 1)), float((1 << (fmt.bits - 1)) - 1)
    zero: torch.Tensor | None = None
    if fmt.symmetric:
        scale = torch.maximum(high, low.neg()) / (top / 2)
    else:
        scale = (high - low) / top
        zero = torch.where(scale > 0, (qmin - low / scale).clamp_(qmin, qmax).round_(), 0.0)
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    # A scale that rounds to 0 in a 16-bit scale dtype (a group of values below about 1e-7 with
    # float16 scales) would divide by zero: the smallest normal number of that dtype instead.
    stored = nonzero(scale.to(scale_dtype))
    grouped.div_(stored.float().unsqueeze(-1))
    if zero is not None:
        grouped.add_(zero.unsqueeze(-1))
    grouped.clamp_(qmin, qmax).round_()
    return value.to(torch.int32), stored, None if zero is None else zero.to(torch.int32)


def zero_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The zero points (int32 [rows, groups]) packed along the rows in ``packed`` (int32
    [words, groups])."""
    return int_values(packed.T.contiguous(), bits, rows).T


def pack_zero_rows(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points (int32 [rows, groups]) packed along the rows: int32 [words, groups]."""
    rows = zero.shape[0]
    packed = torch.empty(zero.shape[1], math.ceil(rows * bits / 32), dtype=torch.int32, device=zero.device)
    return int_pack(zero.T.contiguous(), bits, packed).T.contiguous()


class IntKernel:
    name = "int"
    whole_scale = False

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        zero = companions[1] if len(companions) > 1 else None
        return int_dequantize(out, int_values(stored, fmt.bits, out.shape[-1]), companions[0], zero)

    def quantize(
        self,
        fmt: QuantFormat,
        value: torch.Tensor,
        stored: torch.Tensor,
        scale_dtype: torch.dtype,
        room: torch.Tensor | None = None,
        largest: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        values, scales, zeros = int_quantize(value, fmt, scale_dtype)
        int_pack(values, fmt.bits, stored)
        return (scales,) if zeros is None else (scales, zeros)

    def written(self, fmt: QuantFormat, companions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(companions) == 1:
            return companions
        return companions[0], pack_zero_rows(companions[1], fmt.bits)

    def companion_rows(self, fmt: QuantFormat, index: int, span: tuple[int, int], read: RowReader) -> torch.Tensor:
        """The scales of rows ``span``, or their zero points, unpacked from the words that
        hold them."""
        if index == 0:
            return read(index, span)
        per = 32 // fmt.bits
        first, last = span[0] // per, -(-span[1] // per)
        words = read(index, (first, last)).view(torch.int32)
        skip = span[0] - first * per
        return zero_rows(words, fmt.bits, (last - first) * per)[skip : skip + span[1] - span[0]]

    def within_one_step(self, fmt: QuantFormat, found: torch.Tensor, expected: torch.Tensor) -> bool:
        ours, theirs = (_codes(values, fmt.bits) for values in (found, expected))
        return bool((ours - theirs).abs().max() <= 1)


def _codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-wide codes packed in ``values``, in order (element i at bits i * bits)."""
    data = values.contiguous().view(torch.uint8).to(torch.int16)
    return torch.stack((data & 15, data >> 4), dim=-1).view(-1) if bits == 4 else data


KERNEL = register(IntKernel())
