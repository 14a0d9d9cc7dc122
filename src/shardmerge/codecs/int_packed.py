"""compressed-tensors ``pack-quantized`` integers: ``M.weight_packed`` [out, ceil(in * bits
/ 32)] int32, ``M.weight_scale`` [out, in / group] (or [out, 1]), ``M.weight_shape``
([out, in], int64) and, asymmetric, ``M.weight_zero_point`` [ceil(out * bits / 32),
in / group] int32 (packed along the rows) stand for ``M.weight``. Weights are found by dtype
and the presence of every companion, never by names alone; a half-present weight is a
problem naming the tensor.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, ShardmergeError
from ..formats.safetensors import FLOAT_DTYPES, TensorInfo
from .base import (
    HINT,
    IGNORED,
    INCOMPLETE,
    Located,
    QuantFormat,
    QuantizedWeight,
    check_ignore,
    compressed_ignored,
    names,
    positive_ints,
    problem,
    register,
    small_values,
    weight_args,
)

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
PACKING = "int"
_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


class IntPacked:
    name = "int"
    packed = True
    writes = True
    stored_as = "packed integers"

    def claims(self, quantization: Mapping[str, Any]) -> bool:
        return quantization.get("quant_method") == METHOD and quantization.get("format") == FORMAT

    def read(self, quantization: dict[str, Any], path: Path) -> QuantFormat:
        args = weight_args(quantization, path)
        bits, strategy, group = args.get("num_bits"), args.get("strategy"), args.get("group_size")
        if args.get("type") != "int" or type(bits) is not int or bits not in (4, 8):
            kind = f"{args.get('type')}{bits}"
            raise InputError(
                f"pack-quantized {kind} weights are not supported (int4 and int8 are)", file=path, hint=HINT
            )
        if strategy not in ("group", "channel"):
            raise InputError(
                f"pack-quantized weights with strategy {strategy!r} are not supported", file=path, hint=HINT
            )
        if strategy == "group" and not positive_ints([group], 1):
            raise InputError(f"group_size {group!r} is not a positive integer", file=path, hint=HINT)
        if args.get("actorder"):
            raise InputError(
                f"act-ordered weights (actorder {args['actorder']!r}) are not supported", file=path, hint=HINT
            )
        if args.get("dynamic") not in (False, None):
            raise InputError("dynamic weight quantization is not supported", file=path, hint=HINT)
        for key in ("scale_dtype", "zp_dtype"):
            if args.get(key) is not None:
                raise InputError(f"{key} {args[key]!r} is not supported", file=path, hint=HINT)
        activations = quantization.get("config_groups", {})
        if any(isinstance(g, dict) and g.get("input_activations") for g in activations.values()):
            raise InputError(
                "quantized activations with pack-quantized weights are not supported", file=path, hint=HINT
            )
        return QuantFormat(
            method=METHOD,
            scale_suffix="weight_scale",
            strategy="group" if strategy == "group" else "channel",
            block=(1, group) if strategy == "group" else None,
            ue8m0=False,
            ignore=check_ignore(names(quantization.get("ignore") or [], path), path, prefixed=True),
            activations=(),
            kv_cache=bool(quantization.get("kv_cache_scheme")),
            packing=PACKING,
            bits=bits,
            symmetric=bool(args.get("symmetric", True)),
        )

    def owns(self, fmt: QuantFormat) -> bool:
        return fmt.packing == PACKING

    def keeps(self, fmt: QuantFormat) -> str:
        steps = (1 << fmt.bits) - 1
        return (
            f"INT{fmt.bits} has {steps} steps a group, so an update below half a step (1/{2 * steps} of its range) "
            "is rounded away"
        )

    def describe(self, fmt: QuantFormat) -> str:
        grain = f"groups of {fmt.block[1]}" if fmt.block else "per channel"
        kind = "symmetric" if fmt.symmetric else "asymmetric"
        return f"compressed-tensors INT{fmt.bits} ({grain}, {kind})"

    def scale_shape(self, fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, rows, cols = shape
        return (*lead, rows, cols // fmt.block[1] if fmt.block else 1)

    def row_step(self, fmt: QuantFormat) -> int:
        return 1 if fmt.symmetric else 32 // fmt.bits  # zero points are packed along the rows

    def ignored(self, fmt: QuantFormat, module: str) -> bool:
        return compressed_ignored(fmt, module)

    def is_stored(self, name: str, info: TensorInfo) -> bool:
        return info.dtype == "I32" and name.endswith(".weight_packed")

    def find(
        self,
        fmt: QuantFormat,
        tensors: Mapping[str, Located],
        problems: list[ShardmergeError],
        *,
        transposed: bool | None,
    ) -> dict[str, QuantizedWeight]:
        found: dict[str, QuantizedWeight] = {}
        shapes = _read_shapes(tensors, problems)
        modules = {name.rpartition(".")[0] for name in tensors if name.rpartition(".")[2] in _SUFFIXES}
        for module in sorted(modules):
            parts = {suffix: tensors.get(f"{module}.{suffix}") for suffix in _SUFFIXES}
            packed, scale, shape_of = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
            anchor = next(part for part in parts.values() if part is not None)
            if parts["weight_g_idx"] is not None:
                problem(problems, "act-ordered weights (weight_g_idx) are not supported", parts["weight_g_idx"])
                continue
            if packed is None or scale is None or shape_of is None:
                missing = [suffix for suffix in _SUFFIXES[:3] if parts[suffix] is None]
                problem(problems, f"a packed weight without its {', '.join(missing)}", anchor, INCOMPLETE)
                continue
            zero = parts["weight_zero_point"]
            if (zero is None) != fmt.symmetric:
                what = "has a weight_zero_point" if fmt.symmetric else "has no weight_zero_point"
                scheme = "a symmetric" if fmt.symmetric else "an asymmetric"
                problem(problems, f"the config declares {scheme} scheme, but the weight {what}", anchor)
                continue
            if shape_of[0].dtype not in ("I64", "I32") or shape_of[0].shape != (2,):
                wrong = f"{shape_of[0].dtype} {list(shape_of[0].shape)}"
                problem(problems, f"weight_shape must be two integers, not {wrong}", shape_of)
                continue
            if shape_of[0].name not in shapes:
                continue  # its shard is not on disk: a problem noted once for the shard
            rows, cols = shapes[shape_of[0].name]
            found_problem = self._problem(fmt, packed, scale, (rows, cols), zero, module)
            if found_problem:
                problem(problems, found_problem, packed)
                continue
            companions = (scale,) if zero is None else (scale, zero)
            found[f"{module}.weight"] = QuantizedWeight(
                f"{module}.weight", (rows, cols), (rows, cols), False, packed, companions, (shape_of[0].name,)
            )
        return found

    def label(self, fmt: QuantFormat, stored_dtype: str, companions: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        scale, dtype = companions[0]
        stored = f"INT{fmt.bits}"
        zero = " with zero points" if len(companions) > 1 else ""
        return stored, f"{stored} x {dtype} {scale.rpartition('.')[2]}{zero}"

    def _problem(
        self,
        fmt: QuantFormat,
        packed: Located,
        scale: Located,
        shape: tuple[int, int],
        zero: Located | None,
        module: str,
    ) -> str | None:
        if packed[0].dtype != "I32" or len(packed[0].shape) != 2:
            return f"weight_packed must be a matrix of I32, not {packed[0].dtype} {list(packed[0].shape)}"
        rows, cols = shape
        if rows <= 0 or cols <= 0:
            return f"weight_shape {[rows, cols]} is not two positive integers"
        expected = (rows, math.ceil(cols * fmt.bits / 32))
        if packed[0].shape != expected:
            return (
                f"weight_packed {list(packed[0].shape)} does not hold a [{rows}, {cols}] weight: "
                f"expected {list(expected)}"
            )
        group = fmt.block[1] if fmt.block else cols
        if cols % group:
            return f"{cols} columns are not a whole number of groups of {group}"
        if scale[0].dtype not in FLOAT_DTYPES or scale[0].shape != (rows, cols // group):
            return (
                f"weight_scale {scale[0].dtype} {list(scale[0].shape)} does not match: "
                f"expected [{rows}, {cols // group}]"
            )
        if zero is not None:
            zeros = (math.ceil(rows * fmt.bits / 32), cols // group)
            if zero[0].dtype != "I32" or zero[0].shape != zeros:
                return (
                    f"weight_zero_point {zero[0].dtype} {list(zero[0].shape)} does not match: "
                    f"expected I32 {list(zeros)}"
                )
        if self.ignored(fmt, module):
            return IGNORED
        return None


def _read_shapes(tensors: Mapping[str, Located], problems: list[ShardmergeError]) -> dict[str, tuple[int, int]]:
    """The two integers of every ``weight_shape`` tensor (16 bytes at most each)."""
    wanted = [
        located
        for name, located in tensors.items()
        if name.endswith(".weight_shape") and located[0].dtype in ("I64", "I32") and located[0].shape == (2,)
    ]
    shapes: dict[str, tuple[int, int]] = {}
    for name, raw in small_values(wanted, problems, "the shapes of packed weights are stored in this shard").items():
        rows, cols = struct.unpack("<2q" if len(raw) == 16 else "<2i", raw)
        shapes[name] = (rows, cols)
    return shapes


CODEC = register(IntPacked())
