"""compressed-tensors NVFP4 (``format: nvfp4-pack-quantized``): ``M.weight_packed`` [out,
in / 2] uint8 (two E2M1 values a byte), ``M.weight_scale`` [out, in / 16] FP8-E4M3 (one a
group of 16 values) and ``M.weight_global_scale`` [1] float32 stand for ``M.weight``:
W = q * (scale / global_scale). A static activation scale (``input_global_scale``) is
carried over with the format and dropped with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
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
    names,
    problem,
    register,
    weight_args,
)

METHOD = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
PACKING = "nvfp4"
GROUP = 16  # values a scale covers
SCALE_DTYPES = (None, "float8_e4m3fn", "torch.float8_e4m3fn")
_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's fused layers


class Nvfp4:
    name = "nvfp4"
    packed = True
    writes = True
    stored_as = "NVFP4 values"

    def claims(self, quantization: Mapping[str, Any]) -> bool:
        return quantization.get("quant_method") == METHOD and quantization.get("format") == FORMAT

    def read(self, quantization: dict[str, Any], path: Path) -> QuantFormat:
        args = weight_args(quantization, path)
        kind = (args.get("type"), args.get("num_bits"), args.get("strategy"), args.get("group_size"))
        if kind != ("float", 4, "tensor_group", GROUP):
            raise InputError(
                f"nvfp4-pack-quantized weights of type, bits, strategy and group {list(kind)} are not supported "
                f"(float, 4, tensor_group, {GROUP} are)",
                file=path,
                hint=HINT,
            )
        if not args.get("symmetric", True) or args.get("dynamic") not in (False, None) or args.get("actorder"):
            raise InputError("asymmetric, dynamic or act-ordered NVFP4 weights are not supported", file=path, hint=HINT)
        if args.get("scale_dtype") not in SCALE_DTYPES:
            raise InputError(
                f"NVFP4 scales in {args['scale_dtype']!r} are not supported (float8_e4m3fn are)", file=path, hint=HINT
            )
        return QuantFormat(
            method=METHOD,
            scale_suffix="weight_scale",
            strategy="group",
            block=(1, GROUP),
            ue8m0=False,
            ignore=check_ignore(names(quantization.get("ignore") or [], path), path, prefixed=True),
            activations=("input_global_scale",),
            kv_cache=bool(quantization.get("kv_cache_scheme")),
            packing=PACKING,
            bits=4,
        )

    def owns(self, fmt: QuantFormat) -> bool:
        return fmt.packing == PACKING

    def keeps(self, fmt: QuantFormat) -> str:
        return (
            "E2M1 has 1 bit of mantissa, so an update below about a quarter of a weight's magnitude is rounded "
            "away: often most of a LoRA update"
        )

    def describe(self, fmt: QuantFormat) -> str:
        return f"compressed-tensors NVFP4 (groups of {GROUP}, FP8 scales, a global scale per weight)"

    def scale_shape(self, fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, rows, cols = shape
        return (*lead, rows, cols // GROUP)

    def row_step(self, fmt: QuantFormat) -> int:
        return 1

    def ignored(self, fmt: QuantFormat, module: str) -> bool:
        return compressed_ignored(fmt, module)

    def is_stored(self, name: str, info: TensorInfo) -> bool:
        return info.dtype == "U8" and name.endswith(".weight_packed")

    def find(
        self,
        fmt: QuantFormat,
        tensors: Mapping[str, Located],
        problems: list[ShardmergeError],
        *,
        transposed: bool | None,
    ) -> dict[str, QuantizedWeight]:
        found: dict[str, QuantizedWeight] = {}
        modules = {name.rpartition(".")[0] for name in tensors if name.rpartition(".")[2] in _SUFFIXES}
        for module in sorted(modules):
            parts = {suffix: tensors.get(f"{module}.{suffix}") for suffix in _SUFFIXES}
            packed, scale, scale_of_scales = parts.values()
            if packed is None or scale is None or scale_of_scales is None:
                anchor = next(part for part in parts.values() if part is not None)
                missing = [suffix for suffix, part in parts.items() if part is None]
                problem(problems, f"an NVFP4 weight without its {', '.join(missing)}", anchor, INCOMPLETE)
                continue
            if f"{module}.weight_zero_point" in tensors:
                problem(problems, "asymmetric NVFP4 weights (weight_zero_point) are not supported", packed)
                continue
            found_problem = self._problem(fmt, packed[0], scale[0], scale_of_scales[0], module)
            if found_problem:
                problem(problems, found_problem, packed)
                continue
            rows, half = packed[0].shape
            shape = (rows, 2 * half)
            found[f"{module}.weight"] = QuantizedWeight(
                f"{module}.weight", shape, shape, False, packed, (scale, scale_of_scales)
            )
        return _fused(found)

    def label(self, fmt: QuantFormat, stored_dtype: str, companions: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        (scale, dtype), (scale_of_scales, _) = companions
        leaves = f"{scale.rpartition('.')[2]} / {scale_of_scales.rpartition('.')[2]}"
        return "NVFP4", f"NVFP4 x {dtype} {leaves}"

    def _problem(
        self, fmt: QuantFormat, packed: TensorInfo, scale: TensorInfo, scale_of_scales: TensorInfo, module: str
    ) -> str | None:
        if packed.dtype != "U8" or len(packed.shape) != 2 or 0 in packed.shape:
            return f"weight_packed must be a matrix of U8, not {packed.dtype} {list(packed.shape)}"
        rows, half = packed.shape
        if (2 * half) % GROUP:
            return f"{2 * half} columns are not a whole number of groups of {GROUP}"
        expected = (rows, 2 * half // GROUP)
        if scale.dtype != "F8_E4M3" or scale.shape != expected:
            return f"weight_scale {scale.dtype} {list(scale.shape)} does not match: expected F8_E4M3 {list(expected)}"
        if scale_of_scales.dtype != "F32" or scale_of_scales.shape not in ((), (1,)):
            wrong = f"{scale_of_scales.dtype} {list(scale_of_scales.shape)}"
            return f"weight_global_scale must be one F32 number, not {wrong}"
        if self.ignored(fmt, module):
            return IGNORED
        return None


def _fused(found: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The weights that inference engines fuse into one matrix (a module's q, k and v
    projections, its gate and up projections), which must share one global scale: vLLM
    reads a fused layer with the largest of its parts' global scales, and llm-compressor
    gives them the smallest of theirs."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in found:
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        for index, fused in enumerate(FUSED):
            if leaf in fused:
                groups.setdefault((parent, index), []).append(name)
    for parts in groups.values():
        if len(parts) > 1:
            stored = tuple(sorted(found[name].weight[0].name for name in parts))
            for name in parts:
                found[name] = replace(found[name], shares=stored)
    return found


CODEC = register(Nvfp4())
