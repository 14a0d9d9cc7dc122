"""Quantized formats, one codec each (torch-free): which configs and tensors are theirs, and
how their scales lie over the values. The registry, one line a codec:"""

from . import bnb, fp8, int_packed, mxfp4, nvfp4  # noqa: F401 (each registers its codec)
from .base import Declaration, QuantFormat, QuantizedWeight, codec_of, read_declarations, read_quantization, registered

__all__ = [
    "Declaration",
    "QuantFormat",
    "QuantizedWeight",
    "codec_of",
    "read_declarations",
    "read_quantization",
    "registered",
]
