"""E2M1, the 4-bit float of MXFP4 and NVFP4: a sign bit, then a magnitude code 0 to 7 for
0, 0.5, 1, 1.5, 2, 3, 4 and 6. A byte holds two values, the even element in the low nibble.
How a value is rounded to a code is each format's own (its reference quantizer's)."""

from __future__ import annotations

import torch

from .base import signed_magnitude

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_SIGNED = E2M1 + tuple(-v for v in E2M1)  # codes 8 to 15: the sign bit set

_PAIRS: dict[torch.device, torch.Tensor] = {}


def byte_values(out: torch.Tensor, packed: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (float32, two values a byte of ``packed``, uint8) = the values of the bytes.
    ``scratch``: room (uint8) for 2 bytes a value."""
    if out.device not in _PAIRS:
        pairs = torch.tensor([(E2M1_SIGNED[c & 15], E2M1_SIGNED[c >> 4]) for c in range(256)], dtype=torch.float32)
        _PAIRS[out.device] = pairs.view(torch.float64).view(-1).to(out.device)
    count = packed.numel()
    if scratch is None:
        scratch = torch.empty(4 * count, dtype=torch.uint8, device=out.device)
    index = scratch[: 4 * count].view(torch.int32).view(packed.shape).copy_(packed)
    # a byte's two values at once: each pair of float32 read and written as one 8-byte word
    torch.index_select(_PAIRS[out.device], 0, index.view(-1), out=out.view(-1).view(torch.float64))
    return out


def pack(codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, one a value, overwritten) packed two a byte into ``packed``."""
    pairs = codes.view(*packed.shape, 2)
    pairs[..., 1].bitwise_left_shift_(4)
    return torch.bitwise_or(pairs[..., 0], pairs[..., 1], out=packed)


def within_one_step(found: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether every code of ``found`` is within one step of ``expected``'s, by value."""
    ours, theirs = (signed_magnitude(_nibbles(values), 8) for values in (found, expected))
    return bool((ours - theirs).abs().max() <= 1)


def _nibbles(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of ``values``, in order (the even element in the low nibble)."""
    data = values.contiguous().view(torch.uint8)
    return torch.stack((data & 15, data >> 4), dim=-1).view(-1)
