"""safetensors at the byte level: header parsing and encoding, the index file.

The format: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer.
Every tensor entry has ``dtype``, ``shape`` and ``data_offsets`` relative to the buffer start.
Nothing here imports torch, so planning stays cheap.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafetensorsFormatError
from .confined import open_input
from .jsondoc import parse

# Bytes per element of each safetensors dtype.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Dtypes a merge may read as float32 and convert to the output dtype. FP8 is deliberately
# absent: an FP8 checkpoint is quantized, and widening it silently would change its meaning.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# safetensors itself refuses headers over 100 MB; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    raw: bytes
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def read_header(
    path: Path, fetch: Callable[[int, int], bytes] | None = None, size: int | None = None
) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data. ``fetch``
    (offset, count -> bytes) and ``size`` read a file that is not here (a Hub file, by range
    requests); ``path`` then names where it will be."""
    try:
        if fetch is not None and size is not None:
            return _parse_header(path, size, fetch)
        fd = open_input(path)
        try:

            def read(offset: int, count: int) -> bytes:
                return os.pread(fd, count, offset)

            return _parse_header(path, os.fstat(fd).st_size, read)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SafetensorsFormatError(f"cannot read: {exc.strerror}", file=path) from exc


def _parse_header(path: Path, file_size: int, fetch: Callable[[int, int], bytes]) -> SafetensorsHeader:
    hint = "the file is damaged or incomplete: download or save it again"
    prefix = fetch(0, 8) if file_size >= 8 else b""
    if len(prefix) < 8:
        raise SafetensorsFormatError(f"file is {file_size} bytes, too short to be safetensors", file=path, hint=hint)
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or length > file_size - 8:
        raise SafetensorsFormatError(
            f"header length {length} does not fit in a {file_size}-byte file", file=path, hint=hint
        )
    raw = fetch(8, length)
    try:
        parsed = parse(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SafetensorsFormatError(f"header is not valid JSON ({exc})", file=path, hint=hint) from exc
    if not isinstance(parsed, dict):
        raise SafetensorsFormatError("header is not a JSON object", file=path, hint=hint)
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise SafetensorsFormatError(
            "__metadata__ is not a map of strings to strings, as the format requires", file=path, hint=hint
        )
    data_start = 8 + length
    tensors = {name: _tensor_info(path, name, entry, data_start, file_size) for name, entry in parsed.items()}
    _check_layout(path, tensors, data_start, file_size)
    return SafetensorsHeader(path, file_size, raw, metadata, tensors)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    """The tensors' bytes tile the data buffer, as safetensors' own loader requires: in order
    of their offsets, each begins where the one before ends, the first at the buffer's start,
    and the last ends at the end of the file. A gap or an overlap (a tensor reading another's
    bytes) is refused, naming the tensor."""
    hint = "the file is damaged or was not written by a safetensors writer: download or save it again"
    expected = data_start
    for info in sorted(tensors.values(), key=lambda info: (info.begin, info.end)):
        if info.begin != expected:
            what = "overlaps the tensor before it" if info.begin < expected else "leaves a gap before it"
            raise SafetensorsFormatError(
                f"data_offsets [{info.begin - data_start}, {info.end - data_start}] {what} (expected it at "
                f"{expected - data_start})",
                file=path,
                tensor=info.name,
                hint=hint,
            )
        expected = info.end
    if expected != file_size:
        raise SafetensorsFormatError(
            f"{file_size - expected} bytes after the last tensor's data, which no tensor holds", file=path, hint=hint
        )


def _tensor_info(path: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    hint = "the file is damaged or incomplete: download or save it again"
    if not isinstance(entry, dict):
        raise SafetensorsFormatError("header entry is not an object", file=path, tensor=name, hint=hint)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise SafetensorsFormatError(f"unknown dtype {dtype!r}", file=path, tensor=name, hint=hint)
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise SafetensorsFormatError(f"invalid shape {shape!r}", file=path, tensor=name, hint=hint)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_count, offsets)) or offsets[0] > offsets[1]:
        raise SafetensorsFormatError(f"invalid data_offsets {offsets!r}", file=path, tensor=name, hint=hint)
    begin, end = data_start + offsets[0], data_start + offsets[1]
    expected = numel(tuple(shape)) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise SafetensorsFormatError(
            f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}",
            file=path,
            tensor=name,
            hint=hint,
        )
    if end > file_size:
        raise SafetensorsFormatError(
            f"file is truncated: tensor data ends at byte {end} but the file has {file_size}",
            file=path,
            tensor=name,
            hint=hint,
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _count(value: object) -> bool:
    """A JSON integer of zero or more (``true`` is not one, though Python says it is)."""
    return type(value) is int and value >= 0


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None) -> bytes:
    """Encode a header (length prefix included) for entries ``(name, dtype, shape, begin, end)``.

    Offsets are relative to the data buffer. The JSON is padded with spaces to a multiple of
    8 bytes, as the safetensors library does, so the data buffer starts aligned.
    """
    body: dict[str, object] = {}
    if metadata:
        body["__metadata__"] = metadata
    for name, dtype, shape, begin, end in entries:
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def render_index(total_size: int, weight_map: dict[str, str], metadata: dict[str, object] | None) -> bytes:
    """Render ``model.safetensors.index.json`` the way transformers writes it."""
    meta = dict(metadata or {})
    meta["total_size"] = total_size
    body = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(body, indent=2) + "\n").encode()
