"""The arithmetic of each quantized format, one file per codec behind one ``Kernel``
interface; registered one line each:"""

from . import bnb, fp8, int_packed, mxfp4, nvfp4  # noqa: F401 (each registers its kernel)
from .base import Kernel, kernel_of, reader_of, registered

__all__ = ["Kernel", "kernel_of", "reader_of", "registered"]
