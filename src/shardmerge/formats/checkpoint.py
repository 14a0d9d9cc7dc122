"""A checkpoint file's header, whichever format it is in: safetensors, or a PyTorch ``.bin``
described the same way (see ``torch_bin.py``)."""

from __future__ import annotations

from pathlib import Path

from .safetensors import SafetensorsHeader, read_header


def read_checkpoint_header(path: Path) -> SafetensorsHeader:
    """Header of a safetensors file, or the same description of a PyTorch ``.bin`` file."""
    if path.suffix == ".bin":
        from .torch_bin import read_bin_header  # imports torch: only for pickle-format files

        return read_bin_header(path)
    return read_header(path)
