"""bitsandbytes arithmetic, as its CPU and CUDA kernels dequantize (read only: bitsandbytes
bases are written in 16 bits).

- 4-bit: value k of the flattened weight is T[code k] * absmax[k // blocksize] in float32,
  T the kernel's own table of the quant type (NF4, or FP4 with -0 at code 8, not the stored
  ``quant_map``), the first of a byte's two codes in its high nibble. With double
  quantization absmax[i] = nested_quant_map[code i] * nested_absmax[i // 256] + offset, each
  step rounded in float32.
- 8-bit (LLM.int8): W = (q * SCB[row]) * float32(1 / 127), each product rounded in float32.
"""

from __future__ import annotations

import torch

from ...codecs.base import QuantFormat
from ...codecs.bnb import NESTED_BLOCK
from ...formats.jsondoc import parse
from .base import RowReader, register

NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# FP4's values times 12: the kernels divide by 12 in float32, and store -0 at code 8
FP4_TWELFTHS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
INVERSE_127 = 7.874015718698502e-3  # the float32 nearest 1 / 127, as bitsandbytes multiplies
_PAIRS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pairs(kind: str, device: torch.device) -> torch.Tensor:
    """The two values of every byte (the high nibble's first), float32 pairs as float64 words."""
    if (kind, device) not in _PAIRS:
        table = torch.tensor(NF4) if kind == "nf4" else torch.tensor(FP4_TWELFTHS) / 12.0
        codes = torch.arange(256)
        pairs = torch.stack((table[codes >> 4], table[codes & 15]), dim=1).contiguous()
        _PAIRS[kind, device] = pairs.view(torch.float64).view(-1).to(device)
    return _PAIRS[kind, device]


def four_bit_values(
    out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, kind: str, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``out`` (float32 [rows, columns]) = the values of ``packed`` (uint8, two a byte) with
    ``absmax`` (float32 [rows, columns / blocksize]), exactly."""
    count = packed.numel()
    if scratch is None:
        scratch = torch.empty(4 * count, dtype=torch.uint8, device=out.device)
    index = scratch[: 4 * count].view(torch.int32).copy_(packed.reshape(-1))
    torch.index_select(_pairs(kind, out.device), 0, index, out=out.view(-1).view(torch.float64))
    out.view(*absmax.shape, -1).mul_(absmax.unsqueeze(-1))
    return out


def nested_absmax(
    codes: torch.Tensor, first: int, scales: torch.Tensor, table: torch.Tensor, offset: float
) -> torch.Tensor:
    """Absmax values ``first`` on (float32) from their codes (uint8), the nested scales from
    that of absmax ``first`` on, the nested table and the offset."""
    blocks = torch.arange(first, first + codes.numel(), device=codes.device) // NESTED_BLOCK - first // NESTED_BLOCK
    values = table.reshape(-1)[codes.reshape(-1).long()] * scales.reshape(-1)[blocks]
    return values.add_(torch.tensor(offset, dtype=torch.float32, device=values.device))


def int8_values(out: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``out`` (float32 [rows, columns]) = (q * SCB[row]) * float32(1 / 127)."""
    out.copy_(values.view(torch.int8))
    return out.mul_(scales.reshape(-1, 1)).mul_(torch.tensor(INVERSE_127, dtype=torch.float32, device=out.device))


class BnbKernel:
    name = "bnb"

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if fmt.bits == 8:
            return int8_values(out, stored, companions[0])
        assert fmt.packing is not None
        return four_bit_values(out, stored.view(torch.uint8), companions[0], fmt.packing, room)

    def companion_rows(self, fmt: QuantFormat, index: int, span: tuple[int, int], read: RowReader) -> torch.Tensor:
        """The scales of rows ``span`` (float32 [rows, blocks a row]); for 4-bit weights,
        found from the quantization state (companion 1) and with double quantization the
        nested scales and table (companions 2 and 3). Any other companion: as stored."""
        if fmt.bits == 8 or index:
            return read(index, span if index == 0 else None)
        state = parse(read(1, None).cpu().numpy().tobytes())
        _, cols = state["shape"]
        per = cols // state["blocksize"]
        first, last = span[0] * per, span[1] * per
        absmax = read(0, (first, last))
        if "nested_blocksize" not in state:
            return absmax.view(-1, per)
        scales = read(2, (first // NESTED_BLOCK, -(-last // NESTED_BLOCK)))
        table = read(3, (0, 256))
        return nested_absmax(absmax, first, scales, table, float(state["nested_offset"])).view(-1, per)


KERNEL = register(BnbKernel())
