"""The tensors of a packed checkpoint: which stored tensors make up each quantized weight.

MXFP4 (gpt-oss): ``X_blocks`` [experts, out, in / 32, 16] uint8 and ``X_scales``
[experts, out, in / 32] uint8 stand for the model's parameter ``X`` [experts, in, out] (the
integration transposes on load). compressed-tensors pack-quantized: ``M.weight_packed``
[out, ceil(in * bits / 32)] int32, ``M.weight_scale`` [out, in / group] (or [out, 1]),
``M.weight_shape`` ([out, in], int64) and, asymmetric, ``M.weight_zero_point``
[ceil(out * bits / 32), in / group] int32 (packed along the rows) stand for ``M.weight``.
Weights are found by dtype and the presence of every companion, never by names alone; a
half-present weight is a problem naming the tensor.
"""

from __future__ import annotations

import math
import os
import struct
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ShardmergeError
from .confined import open_input
from .quantization import HINT, QuantFormat
from .safetensors import FLOAT_DTYPES, TensorInfo

_INCOMPLETE = "the checkpoint is incomplete or not in the format its config declares"
Located = tuple[TensorInfo, Path]


@dataclass(frozen=True)
class PackedWeight:
    """One packed weight: ``name``, the model's name for it, and ``model_shape``, its shape
    there; ``shape``, its values as stored ([experts,] rows, columns; the model's transpose
    where ``transposed``); the stored tensors (``zero`` only for asymmetric schemes), and the
    companions that a dequantized output drops (``extra``: ``weight_shape``)."""

    name: str
    model_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transposed: bool
    packed: Located
    scale: Located
    zero: Located | None = None
    extra: tuple[str, ...] = ()

    @property
    def stored(self) -> tuple[str, ...]:
        """Every stored tensor of the weight."""
        return (self.packed[0].name, self.scale[0].name, *([self.zero[0].name] if self.zero else []), *self.extra)


def find_packed(
    fmt: QuantFormat, tensors: Mapping[str, Located], problems: list[ShardmergeError], *, transposed: bool | None
) -> dict[str, PackedWeight]:
    """Every packed weight of the checkpoint by its model name. ``transposed``: whether the
    architecture's expert parameters are [experts, in, out] (None: unknown), which decides
    the model's name and shape of an MXFP4 expert tensor."""
    if fmt.packing == "mxfp4":
        return _mxfp4(fmt, tensors, problems, transposed)
    return _int(fmt, tensors, problems)


def _problem(problems: list[ShardmergeError], message: str, where: Located, hint: str = HINT) -> None:
    problems.append(InputError(message, file=where[1], tensor=where[0].name, hint=hint))


def _mxfp4(
    fmt: QuantFormat, tensors: Mapping[str, Located], problems: list[ShardmergeError], transposed: bool | None
) -> dict[str, PackedWeight]:
    found: dict[str, PackedWeight] = {}
    for name, located in tensors.items():
        info = located[0]
        if name.endswith("_scales") and f"{name[: -len('_scales')]}_blocks" not in tensors and info.dtype == "U8":
            _problem(problems, "MXFP4 scales without their _blocks tensor", located, _INCOMPLETE)
        if not name.endswith("_blocks"):
            continue
        model = name[: -len("_blocks")]
        scale = tensors.get(f"{model}_scales")
        if scale is None:
            _problem(
                problems, "MXFP4 blocks without their _scales tensor: their values cannot be read", located, _INCOMPLETE
            )
            continue
        shape = info.shape
        if info.dtype != "U8" or len(shape) != 4 or shape[3] != 16:
            _problem(
                problems,
                f"MXFP4 blocks must be U8 [experts, out, in / 32, 16], not {info.dtype} {list(shape)}",
                located,
            )
            continue
        if scale[0].dtype != "U8" or scale[0].shape != shape[:3]:
            wanted = list(shape[:3])
            _problem(
                problems,
                f"scale {scale[0].dtype} {list(scale[0].shape)} does not match the blocks: expected U8 {wanted}",
                scale,
            )
            continue
        if fmt.ignored(model.rpartition(".")[0]):
            _problem(problems, "the weight is quantized, but the config lists its module as left unquantized", located)
            continue
        if transposed is not True:
            _problem(
                problems,
                "MXFP4 experts of an architecture whose expert layout shardmerge does not know: the model's "
                "parameter cannot be told from the blocks",
                located,
            )
            continue
        experts, rows, blocks, _ = shape
        stored = (experts, rows, blocks * 32)
        found[model] = PackedWeight(model, (experts, blocks * 32, rows), stored, True, located, scale)
    return found


def _int(fmt: QuantFormat, tensors: Mapping[str, Located], problems: list[ShardmergeError]) -> dict[str, PackedWeight]:
    found: dict[str, PackedWeight] = {}
    shapes = _read_shapes(tensors, problems)
    suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    modules = {name.rpartition(".")[0] for name in tensors if name.rpartition(".")[2] in suffixes}
    for module in sorted(modules):
        parts = {suffix: tensors.get(f"{module}.{suffix}") for suffix in suffixes}
        packed, scale, shape_of = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
        anchor = next(part for part in parts.values() if part is not None)
        if parts["weight_g_idx"] is not None:
            _problem(problems, "act-ordered weights (weight_g_idx) are not supported", parts["weight_g_idx"])
            continue
        if packed is None or scale is None or shape_of is None:
            missing = [suffix for suffix in suffixes[:3] if parts[suffix] is None]
            _problem(problems, f"a packed weight without its {', '.join(missing)}", anchor, _INCOMPLETE)
            continue
        zero = parts["weight_zero_point"]
        if (zero is None) != fmt.symmetric:
            what = "has a weight_zero_point" if fmt.symmetric else "has no weight_zero_point"
            _problem(problems, f"the config declares {'a symmetric' if fmt.symmetric else 'an asymmetric'} scheme, "
                     f"but the weight {what}", anchor)  # fmt: skip
            continue
        if shape_of[0].dtype not in ("I64", "I32") or shape_of[0].shape != (2,):
            wrong = f"{shape_of[0].dtype} {list(shape_of[0].shape)}"
            _problem(problems, f"weight_shape must be two integers, not {wrong}", shape_of)
            continue
        if shape_of[0].name not in shapes:
            continue  # its shard is not on disk: a problem noted once for the shard
        rows, cols = shapes[shape_of[0].name]
        problem = _int_problem(fmt, packed, scale, (rows, cols), zero, module)
        if problem:
            _problem(problems, problem, packed)
            continue
        found[f"{module}.weight"] = PackedWeight(
            f"{module}.weight", (rows, cols), (rows, cols), False, packed, scale, zero, (shape_of[0].name,)
        )
    return found


def _int_problem(
    fmt: QuantFormat, packed: Located, scale: Located, shape: tuple[int, int], zero: Located | None, module: str
) -> str | None:
    if packed[0].dtype != "I32" or len(packed[0].shape) != 2:
        return f"weight_packed must be a matrix of I32, not {packed[0].dtype} {list(packed[0].shape)}"
    rows, cols = shape
    expected = (rows, math.ceil(cols * fmt.bits / 32))
    if packed[0].shape != expected:
        return (
            f"weight_packed {list(packed[0].shape)} does not hold a [{rows}, {cols}] weight: expected {list(expected)}"
        )
    group = fmt.block[1] if fmt.block else cols
    if cols % group:
        return f"{cols} columns are not a whole number of groups of {group}"
    if scale[0].dtype not in FLOAT_DTYPES or scale[0].shape != (rows, cols // group):
        return (
            f"weight_scale {scale[0].dtype} {list(scale[0].shape)} does not match: expected [{rows}, {cols // group}]"
        )
    if zero is not None:
        zeros = (math.ceil(rows * fmt.bits / 32), cols // group)
        if zero[0].dtype != "I32" or zero[0].shape != zeros:
            return f"weight_zero_point {zero[0].dtype} {list(zero[0].shape)} does not match: expected I32 {list(zeros)}"
    if fmt.ignored(module):
        return "the weight is quantized, but the config lists its module as left unquantized"
    return None


def _read_shapes(tensors: Mapping[str, Located], problems: list[ShardmergeError]) -> dict[str, tuple[int, int]]:
    """The two integers of every ``weight_shape`` tensor (16 bytes at most each), each shard
    opened once. A shard not on disk (a Hub base's, whose headers alone are read before the
    merge) is one problem: the shapes cannot be told without its data."""
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for name, (info, path) in tensors.items():
        if name.endswith(".weight_shape") and info.dtype in ("I64", "I32") and info.shape == (2,):
            by_file[path].append(info)
    shapes: dict[str, tuple[int, int]] = {}
    for path, infos in by_file.items():
        if not path.is_file():
            problems.append(
                InputError(
                    "the shapes of packed weights are stored in this shard, which is not downloaded",
                    file=path,
                    tensor=infos[0].name,
                    hint="download the base (hf download REPO --local-dir DIR) and merge from that folder",
                )
            )
            continue
        fd = open_input(path)
        try:
            for info in infos:
                data = os.pread(fd, info.end - info.begin, info.begin)
                rows, cols = struct.unpack("<2q" if info.dtype == "I64" else "<2i", data)
                shapes[info.name] = (rows, cols)
        finally:
            os.close(fd)
    return shapes
