"""FP8 weights (``float8_e4m3fn``, W = q * scale, one scale per block, row or tensor), in two
formats read alike: transformers' fine-grained FP8 (``quant_method: fp8``,
``X.weight_scale_inv`` per ``weight_block_size`` block, DeepSeek-V3 and Qwen3-FP8 style) and
compressed-tensors' float-quantized FP8 (``X.weight_scale`` per tensor, channel or block).
Which weights are quantized is decided by their dtype and the presence of their scale,
cross-checked against the config's ignore list, never by name patterns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, ShardmergeError
from ..formats.safetensors import TensorInfo
from .base import (
    HINT,
    IGNORED,
    INCOMPLETE,
    Located,
    QuantFormat,
    QuantizedWeight,
    check_ignore,
    compressed_ignored,
    grid_shape,
    names,
    positive_ints,
    register,
    transformers_ignored,
    weight_args,
)

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
WEIGHT_DTYPE = "F8_E4M3"
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
FINE_GRAINED = "fp8"
COMPRESSED = "compressed-tensors"
FORMATS = ("float-quantized", "naive-quantized")  # compressed-tensors' FP8 formats


class Fp8:
    name = "fp8"
    packed = False
    writes = True
    stored_as = WEIGHT_DTYPE

    def claims(self, quantization: Mapping[str, Any]) -> bool:
        method = quantization.get("quant_method")
        return method == FINE_GRAINED or (method == COMPRESSED and quantization.get("format") in FORMATS)

    def read(self, quantization: dict[str, Any], path: Path) -> QuantFormat:
        if quantization.get("quant_method") == FINE_GRAINED:
            return _fine_grained(quantization, path)
        return _compressed_tensors(quantization, path)

    def owns(self, fmt: QuantFormat) -> bool:
        return fmt.packing is None and fmt.method in (FINE_GRAINED, COMPRESSED)

    def keeps(self, fmt: QuantFormat) -> str:
        return "FP8 has 3 bits of mantissa, so an update below about 1/16 of a weight's magnitude is rounded away"

    def describe(self, fmt: QuantFormat) -> str:
        grain = f"{fmt.block[0]}x{fmt.block[1]} blocks" if fmt.block else f"per {fmt.strategy}"
        name = "fine-grained FP8" if fmt.method == FINE_GRAINED else "compressed-tensors FP8"
        return f"{name} ({grain}{', ue8m0 scales' if fmt.ue8m0 else ''})"

    def scale_shape(self, fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
        if fmt.strategy == "tensor" and fmt.method == COMPRESSED:
            return (1,)
        return grid_shape(fmt, shape)

    def row_step(self, fmt: QuantFormat) -> int:
        return fmt.block[0] if fmt.strategy == "block" and fmt.block else 1

    def ignored(self, fmt: QuantFormat, module: str) -> bool:
        return (transformers_ignored if fmt.method == FINE_GRAINED else compressed_ignored)(fmt, module)

    def is_stored(self, name: str, info: TensorInfo) -> bool:
        return info.dtype == WEIGHT_DTYPE

    def find(
        self,
        fmt: QuantFormat,
        tensors: Mapping[str, Located],
        problems: list[ShardmergeError],
        *,
        transposed: bool | None,
    ) -> dict[str, QuantizedWeight]:
        """Every FP8 weight paired with its scale; a problem for a weight without a usable
        scale, a scale without its weight, or a weight the config's ignore list says is
        unquantized."""
        found: dict[str, QuantizedWeight] = {}
        for name, (info, file) in tensors.items():
            module, _, leaf = name.rpartition(".")
            if leaf == fmt.scale_suffix:
                weight = tensors.get(f"{module}.weight")
                if weight is None or weight[0].dtype != WEIGHT_DTYPE:
                    what = "is missing" if weight is None else f"is {weight[0].dtype}, not {WEIGHT_DTYPE}"
                    problems.append(
                        InputError(f"a weight scale whose weight {what}", file=file, tensor=name, hint=HINT)
                    )
                continue
            if info.dtype != WEIGHT_DTYPE:
                continue
            scale = tensors.get(f"{module}.{fmt.scale_suffix}")
            if leaf != "weight" or scale is None:
                problems.append(
                    InputError(
                        f"{WEIGHT_DTYPE} tensor without a {fmt.scale_suffix} beside it: its values cannot be read",
                        file=file,
                        tensor=name,
                        hint=INCOMPLETE,
                    )
                )
                continue
            problem = self._scale_problem(fmt, info, scale[0], module)
            if problem:
                problems.append(InputError(problem, file=scale[1], tensor=scale[0].name, hint=HINT))
                continue
            found[name] = QuantizedWeight(name, info.shape, info.shape, False, (info, file), (scale,))
        return found

    def label(self, fmt: QuantFormat, stored_dtype: str, companions: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        scale, dtype = companions[0]
        return stored_dtype, f"{stored_dtype} x {dtype} {scale.rpartition('.')[2]}"

    def _scale_problem(self, fmt: QuantFormat, weight: TensorInfo, scale: TensorInfo, module: str) -> str | None:
        if len(weight.shape) < 2:
            return f"a scale for a {len(weight.shape)}-D weight; FP8 weights are matrices"
        if len(weight.shape) > 2 and fmt.strategy == "tensor":
            return f"one scale per tensor for a {len(weight.shape)}-D weight is not supported"
        if scale.dtype not in SCALE_DTYPES:
            return f"scale dtype {scale.dtype} is not one of {', '.join(sorted(SCALE_DTYPES))}"
        expected = self.scale_shape(fmt, weight.shape)
        whole = fmt.strategy == "tensor" and tuple(scale.shape) in ((), (1,), (1, 1))
        if tuple(scale.shape) != expected and not whole:
            grain = f"weight {list(weight.shape)} in {self.describe(fmt)}"
            return f"scale shape {list(scale.shape)} does not match the {grain}: expected {list(expected)}"
        if self.ignored(fmt, module):
            return IGNORED
        return None


def _fine_grained(quantization: dict[str, Any], path: Path) -> QuantFormat:
    block = quantization.get("weight_block_size")
    if block is not None and not positive_ints(block, 2):
        raise InputError(f"weight_block_size {block!r} is not two positive integers", file=path, hint=HINT)
    if quantization.get("dequantize"):
        raise InputError("the fp8 config asks transformers to dequantize on load", file=path, hint=HINT)
    scale_fmt = quantization.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise InputError(f"unknown fp8 scale_fmt {scale_fmt!r}", file=path, hint=HINT)
    ignore = quantization.get("modules_to_not_convert") or quantization.get("ignored_layers") or []
    static = quantization.get("activation_scheme", "dynamic") == "static"
    return QuantFormat(
        method=FINE_GRAINED,
        scale_suffix="weight_scale_inv",
        strategy="block" if block else "tensor",
        block=(block[0], block[1]) if block else None,
        ue8m0=scale_fmt == "ue8m0",
        ignore=check_ignore(names(ignore, path), path, prefixed=False),
        activations=("activation_scale",) if static else (),
    )


def _compressed_tensors(quantization: dict[str, Any], path: Path) -> QuantFormat:
    args = weight_args(quantization, path)
    if args.get("type") != "float" or args.get("num_bits") != 8:
        kind = f"{args.get('type')}{args.get('num_bits')}"
        raise InputError(f"compressed-tensors {kind} weights are not supported (FP8 is)", file=path, hint=HINT)
    strategy = args.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise InputError(f"compressed-tensors FP8 with strategy {strategy!r} is not supported", file=path, hint=HINT)
    if not args.get("symmetric", True) or args.get("dynamic") not in (False, None) or args.get("actorder"):
        raise InputError("asymmetric, dynamic or act-ordered FP8 weights are not supported", file=path, hint=HINT)
    if args.get("scale_dtype") is not None:
        raise InputError(f"scale_dtype {args['scale_dtype']!r} is not supported", file=path, hint=HINT)
    block = args.get("block_structure")
    if strategy == "block" and not positive_ints(block, 2):
        raise InputError(f"block_structure {block!r} is not two positive integers", file=path, hint=HINT)
    activations = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
    return QuantFormat(
        method=COMPRESSED,
        scale_suffix="weight_scale",
        strategy=strategy,
        block=(block[0], block[1]) if strategy == "block" else None,
        ue8m0=False,
        ignore=check_ignore(names(quantization.get("ignore") or [], path), path, prefixed=True),
        activations=activations,
        kv_cache=bool(quantization.get("kv_cache_scheme")),
    )


CODEC = register(Fp8())
