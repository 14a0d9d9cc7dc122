"""The arithmetic every codec implements (``Kernel``) and the registry the merge and
``verify`` ask, keyed by the torch-free codec's name.

A kernel turns stored values and their companions (scales, zero points) into float32
exactly, and float32 values back into stored values and new companions the way the format's
own reference quantizer does. Companions come in the order the planner found them (the scale
first) and in the layout ``dequantize`` takes; ``written`` gives them as the file stores them.
A format that is only read (its codec does not write: bitsandbytes) has a ``PackedReader``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ...codecs.base import QuantFormat, codec_of

# Reads rows ``span`` of companion ``index`` as stored (of the expert being merged), or all
# of them for None. A vector's rows are its elements.
RowReader = Callable[[int, tuple[int, int] | None], torch.Tensor]


@runtime_checkable
class Kernel(Protocol):
    """One codec's arithmetic. ``name``: the registered codec's."""

    name: str

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out`` (float32 [rows, columns]) = the values of rows of ``stored`` with the
        companions of the same rows, exactly. ``room``: reused scratch bytes, if given."""
        ...

    def quantize(
        self,
        fmt: QuantFormat,
        value: torch.Tensor,
        stored: torch.Tensor,
        scale_dtype: torch.dtype,
        room: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """``value`` (float32 [rows, columns], overwritten) quantized into ``stored`` as the
        reference quantizer does, the scales found from the rows' own values: the new
        companions, in the layout ``dequantize`` takes."""
        ...

    def written(self, fmt: QuantFormat, companions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``companions`` as the checkpoint stores them."""
        ...

    def within_one_step(self, fmt: QuantFormat, found: torch.Tensor, expected: torch.Tensor) -> bool:
        """Whether every code of ``found`` is within one step of ``expected``'s (the same
        stored tensor computed on another device), ordered by value."""
        ...


@runtime_checkable
class PackedReader(Protocol):
    """How a packed format is read, one matrix's rows at a time."""

    name: str

    def dequantize(
        self,
        fmt: QuantFormat,
        out: torch.Tensor,
        stored: torch.Tensor,
        companions: tuple[torch.Tensor, ...],
        room: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``Kernel.dequantize``."""
        ...

    def companion_rows(self, fmt: QuantFormat, index: int, span: tuple[int, int], read: RowReader) -> torch.Tensor:
        """Companion ``index`` of the weight's rows ``span``, in the layout ``dequantize``
        takes, read through ``read``."""
        ...


class PackedKernel(PackedReader, Kernel, Protocol):
    """A kernel of a packed format, merged one matrix's rows at a time. ``whole_scale``: a
    scale covers the whole weight (NVFP4's global scale), so ``quantize`` takes the merged
    weight's largest magnitude, found in a pass before its first block is quantized."""

    whole_scale: bool

    def quantize(
        self,
        fmt: QuantFormat,
        value: torch.Tensor,
        stored: torch.Tensor,
        scale_dtype: torch.dtype,
        room: torch.Tensor | None = None,
        largest: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """As ``Kernel.quantize``; ``largest``: the merged weight's largest magnitude where
        ``whole_scale`` (None: ``value`` is the whole weight)."""
        ...


_KERNELS: dict[str, Kernel | PackedReader] = {}


def register(kernel: Kernel | PackedReader) -> Kernel | PackedReader:
    if kernel.name in _KERNELS:
        raise ValueError(f"a kernel named {kernel.name!r} is registered already")
    _KERNELS[kernel.name] = kernel
    return kernel


def registered() -> dict[str, Kernel | PackedReader]:
    return dict(_KERNELS)


def kernel_of(fmt: QuantFormat) -> Kernel:
    """The arithmetic of the codec that read ``fmt``, which writes its format."""
    kernel = _KERNELS[codec_of(fmt).name]
    assert isinstance(kernel, Kernel), f"{kernel.name} is read only"
    return kernel


def reader_of(fmt: QuantFormat) -> PackedReader:
    """How the packed format ``fmt`` is read."""
    kernel = _KERNELS[codec_of(fmt).name]
    assert isinstance(kernel, PackedReader), f"{kernel.name} is not packed"
    return kernel


def nonzero(stored: torch.Tensor) -> torch.Tensor:
    """``stored`` scales, the smallest normal number of their dtype where they are 0."""
    return torch.where(stored > 0, stored, torch.finfo(stored.dtype).tiny)


def signed_magnitude(codes: torch.Tensor, sign: int) -> torch.Tensor:
    """Sign-magnitude float codes (sign bit ``sign``, then magnitude) as integers in the
    order of their values: neighbouring values one apart, +0 and -0 both 0."""
    wide = codes.to(torch.int16)
    return torch.where(wide >= sign, -(wide & (sign - 1)), wide)
