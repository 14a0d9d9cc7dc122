"""PyTorch ``.bin`` checkpoints (``torch.save`` zip files) read like safetensors: header only.

The pickle is loaded with torch's weights-only unpickler (it builds no arbitrary objects),
with every storage replaced by an empty one on the ``meta`` device. That yields each
tensor's dtype, shape, strides and storage key without reading any tensor data; the zip
record offset of the storage then gives the tensor's absolute byte range in the file, and
the executor reads it with pread exactly as it reads safetensors. Nothing is memory-mapped,
so the memory bound is the same as for safetensors.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ..errors import SafetensorsFormatError
from .confined import open_input
from .safetensors import SafetensorsHeader, TensorInfo

_HINT = "load it with torch and save it again with safetensors (save_pretrained(safe_serialization=True))"


def read_bin_header(path: Path) -> SafetensorsHeader:
    """Tensor layout of a ``torch.save`` checkpoint holding a flat dict of tensors, read from
    the file input files are opened as (``confined.py``)."""
    import torch

    with os.fdopen(open_input(path), "rb") as handle:
        try:
            reader = torch._C.PyTorchFileReader(handle)
        except (RuntimeError, OSError) as exc:
            raise SafetensorsFormatError(
                "not a PyTorch zip checkpoint (legacy or damaged file)", file=path, hint=_HINT
            ) from exc
        return _layout(path, reader, os.fstat(handle.fileno()).st_size)


def _layout(path: Path, reader: Any, size: int) -> SafetensorsHeader:
    import torch
    from torch import _weights_only_unpickler

    from .dtypes import ST_DTYPES

    records = reader.get_all_records()
    pickles = [name for name in records if name == "data.pkl" or name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise SafetensorsFormatError("no data.pkl record in the checkpoint", file=path, hint=_HINT)
    prefix = pickles[0][: -len("data.pkl")]
    raw = reader.get_record(pickles[0])
    storage_keys: dict[int, str] = {}

    def persistent_load(saved_id: Any) -> Any:
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        storage = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
        storage_keys[storage._cdata] = str(key)
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(raw))
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    try:
        state = unpickler.load()
    except Exception as exc:  # the unpickler raises many types; all mean "not a plain state dict"
        raise SafetensorsFormatError(
            f"cannot read the checkpoint safely ({str(exc).splitlines()[0]})",
            file=path,
            hint="it holds more than tensors, which may run code when loaded: ask its author for safetensors",
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SafetensorsFormatError("checkpoint is not a flat dict of tensors", file=path, hint=_HINT)
    tensors = {}
    for name, tensor in state.items():
        if tensor.dtype not in ST_DTYPES:
            raise SafetensorsFormatError(f"unsupported dtype {tensor.dtype}", file=path, tensor=name, hint=_HINT)
        if not tensor.is_contiguous():
            raise SafetensorsFormatError("tensor is not stored contiguously", file=path, tensor=name, hint=_HINT)
        key = storage_keys[tensor.untyped_storage()._cdata]
        begin = reader.get_record_offset(f"{prefix}data/{key}") + tensor.storage_offset() * tensor.element_size()
        end = begin + tensor.numel() * tensor.element_size()
        tensors[name] = TensorInfo(name, ST_DTYPES[tensor.dtype], tuple(tensor.shape), begin, end)
    for info in tensors.values():
        if info.end > size:
            raise SafetensorsFormatError(
                f"file is truncated: tensor data ends at byte {info.end} but the file has {size}",
                file=path,
                tensor=info.name,
                hint=_HINT,
            )
    return SafetensorsHeader(path, size, raw, {"format": "pt"}, tensors)
