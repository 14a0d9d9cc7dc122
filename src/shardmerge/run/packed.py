"""Packed-format arithmetic: MXFP4 (gpt-oss) and compressed-tensors' packed integers, read
into float32 exactly and written back the way each format's reference quantizer writes them.

MXFP4: a byte holds two E2M1 values (the even element in the low nibble), 32 values share a
scale byte s standing for 2^(s - 127). The reference quantizer (OpenAI's ``triton_kernels``,
the one gpt-oss was published with) takes a block's largest magnitude a, divides it by 6 in
float32 and rounds that up to a power of two (0 stays 0: scale byte 0, values 0); it
multiplies each value by the reciprocal and rounds it to the nearest E2M1 magnitude, halfway
cases away from zero, with the value's sign (so -0.1 gives -0) and 6 at most.

Packed integers (compressed-tensors ``pack-quantized``): b-bit values offset by 2^(b-1),
element i of a row at bits i * b of its int32 words, little end first; W = (q - z) * scale per
group. Its quantizer (``calculate_qparams``, then ``quantize``): symmetric, scale =
max |W| / ((2^b - 1) / 2); asymmetric, with m = min(W, 0) and M = max(W, 0),
scale = (M - m) / (2^b - 1) and z = round(clamp(-2^(b-1) - m / scale)); a zero scale
becomes float32's epsilon; the scale is stored in the checkpoint's scale dtype and
q = clamp(round(W / stored + z)) with halfway cases to even.
"""

from __future__ import annotations

import math

import torch

from ..formats.quantization import QuantFormat
from .quant import nonzero

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
