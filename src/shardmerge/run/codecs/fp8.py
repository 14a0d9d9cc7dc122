"""FP8 arithmetic (fine-grained and compressed-tensors): dequantize a block of rows to
float32, and quantize a merged block back the way the format's own reference quantizer does.

Scales are applied per scale block through views of the value, never expanded to the
value's size. A block of rows always starts at a multiple of the format's block height, so
its scales are whole rows of the scale grid.

Requantization, by format (W the merged float32 value, a the largest |W| of a block, row or
tensor):
- fine-grained FP8 (transformers' ``Fp8Quantize``): s = 448 / a (1 where a is 0), stored as
  ``weight_scale_inv`` = 1 / s in float32; q = clamp(W * s, -448, 448) rounded to nearest.
  With ``scale_fmt: ue8m0`` the stored scale is 1 / s rounded up to a power of two, and W is
  multiplied by its reciprocal. Where the checkpoint stores 16-bit scales, the stored value
  is 1 / s rounded to that dtype, and W is multiplied by the reciprocal of what is stored,
  so that dequantization reads back what was quantized.
- compressed-tensors (``calculate_qparams`` then ``quantize``): scale = a / 448 in float32
  (float32's epsilon where a is 0), rounded to the checkpoint's scale dtype;
  q = clamp(W / scale, -448, 448) rounded to nearest.
Partial edge blocks take their own largest value, as the scale grid's shape implies.
"""

from __future__ import annotations

import torch

from ...codecs.base import QuantFormat
from ...codecs.fp8 import COMPRESSED, FP8_MAX
from ...tuning import WIDEN_CHUNK
from .base import nonzero, register, signed_magnitude


def scale_rows(fmt: QuantFormat, first: int, last: int) -> tuple[int, int] | None:
    """The rows of the scale tensor that cover rows ``first`` to ``last`` of the weight, or
    None where one scale covers every row."""
    if fmt.strategy == "tensor":
        return None
    step = fmt.row_step()
    return first // step, -(-last // step)


def scale_columns(fmt: QuantFormat, first: int, last: int) -> tuple[int, int] | None:
    """The columns of the scale tensor that cover columns ``first`` (a multiple of the block
    width) to ``last`` of the weight, or None where every column shares its scales."""
    if fmt.strategy != "block" or fmt.block is None:
        return None
    return first // fmt.block[1], -(-last // fmt.block[1])


def dequantize_into(
    out: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    fmt: QuantFormat,
    scratch: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``out`` (float32, q's shape) = q * scale, each element multiplied once in float32.
    ``scale`` holds the scale rows covering q's rows, the first of which begins ``offset``
    rows before q's first; ``scratch`` (see ``widen_into``) is reused if given."""
    widen_into(out, q, scratch)
    return _per_scale(out, scale.float(), fmt, divide=False, offset=offset)


def widen_into(out: torch.Tensor, q: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (float32) = ``q`` (float8_e4m3fn), exactly, through ``scratch`` (int16, room
    for 2 * WIDEN_CHUNK). torch converts FP8 one element at a time (about 3 ns each on a CPU,
    the most expensive step of an FP8 merge); instead, the bits of an e4m3 number shifted into
    a float16's (sign to bit 15, exponent and mantissa up by 7) make the same number times
    2^-8, normal and subnormal alike, and float16 widens quickly. The NaN codes (S.1111.111)
    read as +-480 that way, a value no other code has: seen in the result, torch's own
    conversion is used instead."""
    if scratch is None:
        scratch = torch.empty(2 * WIDEN_CHUNK, dtype=torch.int16, device=q.device)
    flat_out, flat_q = out.view(-1), q.reshape(-1).view(torch.uint8)
    for begin in range(0, flat_q.numel(), WIDEN_CHUNK):
        codes = flat_q[begin : begin + WIDEN_CHUNK]
        bits, sign = scratch[: codes.numel()], scratch[WIDEN_CHUNK : WIDEN_CHUNK + codes.numel()]
        bits.copy_(codes).bitwise_left_shift_(7)  # the sign lands on bit 14
        torch.bitwise_and(bits, 0x4000, out=sign)
        bits.add_(sign)  # and moves to bit 15
        flat_out[begin : begin + codes.numel()].copy_(bits.view(torch.float16)).mul_(256.0)
    if out.numel():
        low, high = torch.aminmax(out)
        if float(high) > FP8_MAX or float(low) < -FP8_MAX:
            out.copy_(q)
    return out


def largest(value: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The largest magnitude of ``value`` (float32 rows) per scale: the grid rows covering
    them (block), one per row (channel), or one for all (tensor). NaN, which a merge keeps
    only where the base held it, does not count: it stays NaN, and its neighbours are
    scaled by their own largest value."""
    if not bool(torch.isfinite(value.sum())) and bool(torch.isnan(value).any()):
        value = torch.nan_to_num(value, nan=0.0)
    if fmt.strategy == "tensor":
        return torch.maximum(value.amax(), -value.amin()).reshape(1)
    if fmt.strategy == "channel":
        return torch.maximum(value.amax(-1), -value.amin(-1)).unsqueeze(-1)
    assert fmt.block is not None
    rows = value.shape[-2]
    per_column_block = []
    for part in _column_parts(value, fmt.block[1]):
        partial = part.dim() == value.dim()  # the partial last column block keeps its dim
        per_column_block.append(torch.maximum(part.amax(-1, keepdim=partial), -part.amin(-1, keepdim=partial)))
    by_columns = torch.cat(per_column_block, dim=-1) if len(per_column_block) > 1 else per_column_block[0]
    height = fmt.block[0]
    full, rest = divmod(rows, height)
    pieces = []
    if full:
        head = by_columns[..., : full * height, :].unflatten(-2, (full, height))
        pieces.append(head.amax(-2))
    if rest:
        pieces.append(by_columns[..., full * height :, :].amax(-2, keepdim=True))
    return torch.cat(pieces, dim=-2) if len(pieces) > 1 else pieces[0]


def combine(parts: list[torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """The largest magnitudes of a whole tensor from those of its blocks of rows."""
    if fmt.strategy == "tensor":
        return torch.stack(parts).amax(0)
    return torch.cat(parts, dim=-2)


def scales_for(largest_values: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """From the largest magnitudes: the scale tensor as stored (in ``dtype``), and the float32
    factor a value is multiplied by (fine-grained) or divided by (compressed-tensors) before
    rounding to FP8. Where the references' scale would round to 0 in ``dtype`` (a block of
    values below about 1e-5 with float16 scales), which would write NaN and 448 in place of
    its values, the smallest normal ``dtype`` number is stored instead."""
    amax = largest_values.float()
    if divides(fmt):
        scale = amax / FP8_MAX
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
        stored = nonzero(scale.to(dtype))
        return stored, stored.float()
    forward = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
    inverse = 1.0 / forward
    if fmt.ue8m0:
        inverse = torch.exp2(torch.ceil(torch.log2(inverse.clamp(min=torch.finfo(torch.float32).tiny))))
        return inverse.to(dtype), 1.0 / inverse
    stored = nonzero(inverse.to(dtype))
    if dtype == torch.float32 and bool(torch.isfinite(forward).all()):
        return stored, forward
    return stored, 1.0 / stored.float()


def quantize_into(out: torch.Tensor, value: torch.Tensor, factor: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``out`` (float8_e4m3fn) = ``value`` scaled by ``factor`` (the scale rows covering its
    rows), clamped to +-448 and rounded to nearest. ``value`` is scaled in place."""
    _per_scale(value, factor, fmt, divide=divides(fmt))
    return out.copy_(value.clamp_(-FP8_MAX, FP8_MAX))


def _per_scale(
    value: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, *, divide: bool, offset: int = 0
) -> torch.Tensor:
    """``value`` multiplied (or divided) in place by its scales, broadcast over their blocks;
    its first row is row ``offset`` of the first scale row's block."""
    if fmt.strategy == "tensor":
        scale = scale.reshape(-1)
    if fmt.strategy != "block":
        return value.div_(scale) if divide else value.mul_(scale)
    assert fmt.block is not None
    per_row = scale.repeat_interleave(fmt.block[0], dim=-2)[..., offset : offset + value.shape[-2], :]
    for part in _column_parts(value, fmt.block[1]):
        # whole column blocks come as (..., rows, blocks, width); the partial last one as is
        factor = per_row[..., : part.shape[-2]].unsqueeze(-1) if part.dim() > value.dim() else per_row[..., -1:]
        part.div_(factor) if divide else part.mul_(factor)
    return value


def _column_parts(value: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Views of ``value``: its whole column blocks as (..., rows, blocks, width), then the
    partial last block (..., rows, rest) if the columns do not divide."""
    cols = value.shape[-1]
    full, rest = divmod(cols, width)
    parts = []
    if full:
        parts.append(value[..., : full * width].unflatten(-1, (full, width)))
    if rest:
        parts.append(value[..., full * width :])
    return parts


def divides(fmt: QuantFormat) -> bool:
    """Whether values are divided by the stored scale before rounding (compressed-tensors),
    rather than multiplied by its reciprocal (fine-grained)."""
    return fmt.method == COMPRESSED


class Fp8Kernel:
    """FP8's arithmetic over whole rows (the merge's own driver works on scale-block pieces
    of them with the functions above)."""

    name = "fp8"

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return dequantize_into(out, stored, companions[0], fmt, room)

    def quantize(
        self,
        fmt: QuantFormat,
        value: torch.Tensor,
        stored: torch.Tensor,
        scale_dtype: torch.dtype,
        room: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        scale, factor = scales_for(largest(value, fmt), fmt, scale_dtype)
        quantize_into(stored, value, factor, fmt)
        return (scale,)

    def written(self, fmt: QuantFormat, companions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return companions

    def within_one_step(self, fmt: QuantFormat, found: torch.Tensor, expected: torch.Tensor) -> bool:
        """Codes within one step by signed magnitude; a NaN code only where ``expected`` has
        the same one."""
        ours, theirs = found.view(torch.uint8), expected.view(torch.uint8)
        nan = (found.isnan() | expected.isnan()) & (ours != theirs)
        close = (signed_magnitude(ours, 128) - signed_magnitude(theirs, 128)).abs().max() <= 1
        return bool(close) and not bool(nan.any())


KERNEL = register(Fp8Kernel())
