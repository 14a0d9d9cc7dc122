"""What a quantized checkpoint says about itself: its ``quantization_config`` read into one
QuantFormat, and which of its tensors are quantized weights with which scale.

Two FP8 formats are read (weights in ``float8_e4m3fn``, W = q * scale, one scale per block,
row or tensor): transformers' fine-grained FP8 (``quant_method: fp8``, ``X.weight_scale_inv``
per ``weight_block_size`` block, DeepSeek-V3 and Qwen3-FP8 style) and compressed-tensors'
float-quantized FP8 (``X.weight_scale`` per tensor, channel or block). Every other method is
refused here, by name. Which weights are quantized is decided by their dtype and the presence
of their scale, cross-checked against the config's ignore list, never by name patterns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, ShardmergeError
from .safetensors import TensorInfo

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
WEIGHT_DTYPE = "F8_E4M3"
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
_HINT = "merge into the 16-bit release of the base model"


@dataclass(frozen=True)
class QuantFormat:
    """One checkpoint's weight quantization.

    method: ``fp8`` (fine-grained FP8) or ``compressed-tensors``. strategy: ``block``,
    ``channel`` or ``tensor``, with ``block`` the (rows, columns) of a block. ue8m0: scales
    are powers of two (``scale_fmt: ue8m0``). activations: the module tensors that hold
    static activation scales, carried over as they are and dropped with the quantization.
    """

    method: str
    scale_suffix: str
    strategy: str
    block: tuple[int, int] | None
    ue8m0: bool
    ignore: tuple[str, ...]
    activations: tuple[str, ...]
    kv_cache: bool = False

    def describe(self) -> str:
        grain = f"{self.block[0]}x{self.block[1]} blocks" if self.block else f"per {self.strategy}"
        name = "fine-grained FP8" if self.method == "fp8" else "compressed-tensors FP8"
        return f"{name} ({grain}{', ue8m0 scales' if self.ue8m0 else ''})"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale tensor's shape for a weight of ``shape`` (leading dims are batches)."""
        *lead, rows, cols = shape
        if self.strategy == "tensor":
            return (1,) if self.method == "compressed-tensors" else (*lead, 1, 1)
        if self.strategy == "channel":
            return (*lead, rows, 1)
        assert self.block is not None
        return (*lead, math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))

    def row_step(self) -> int:
        """Rows that share a scale: blocks of rows must start at multiples of this."""
        return self.block[0] if self.strategy == "block" and self.block else 1

    def ignored(self, module: str) -> bool:
        """Whether the config lists ``module`` as left unquantized."""
        if self.method == "fp8":
            # transformers' rule: a prefix up to a module boundary, a regex, or a suffix.
            return any(
                re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(key) for key in self.ignore
            )
        return any(re.match(key[3:], module) if key.startswith("re:") else key == module for key in self.ignore)


def read_quantization(config: Mapping[str, Any], path: Path) -> QuantFormat | None:
    """The base's weight quantization from its config.json, or None for an unquantized base;
    an InputError naming the format for anything shardmerge cannot merge into exactly."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    if not isinstance(quantization, dict):
        raise InputError("quantization_config is not an object", file=path, hint=_HINT)
    method = str(quantization.get("quant_method", "unknown"))
    if method == "fp8":
        return _fine_grained(quantization, path)
    if method == "compressed-tensors":
        return _compressed_tensors(quantization, path)
    raise InputError(f"the base is quantized with {method}, which shardmerge cannot merge into", file=path, hint=_HINT)


def _fine_grained(quantization: dict[str, Any], path: Path) -> QuantFormat:
    block = quantization.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(n, int) and n > 0 for n in block)
    ):
        raise InputError(f"weight_block_size {block!r} is not two positive integers", file=path, hint=_HINT)
    if quantization.get("dequantize"):
        raise InputError("the fp8 config asks transformers to dequantize on load", file=path, hint=_HINT)
    scale_fmt = quantization.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise InputError(f"unknown fp8 scale_fmt {scale_fmt!r}", file=path, hint=_HINT)
    ignore = quantization.get("modules_to_not_convert") or quantization.get("ignored_layers") or []
    static = quantization.get("activation_scheme", "dynamic") == "static"
    return QuantFormat(
        method="fp8",
        scale_suffix="weight_scale_inv",
        strategy="block" if block else "tensor",
        block=(block[0], block[1]) if block else None,
        ue8m0=scale_fmt == "ue8m0",
        ignore=tuple(str(entry) for entry in ignore),
        activations=("activation_scale",) if static else (),
    )


def _compressed_tensors(quantization: dict[str, Any], path: Path) -> QuantFormat:
    fmt = quantization.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise InputError(
            f"compressed-tensors format {fmt!r} is not supported (float-quantized FP8 is)", file=path, hint=_HINT
        )
    groups = quantization.get("config_groups") or {}
    weights = [group.get("weights") for group in groups.values() if isinstance(group, dict)]
    if not weights or any(not isinstance(args, dict) for args in weights):
        raise InputError("compressed-tensors config_groups declare no weight quantization", file=path, hint=_HINT)
    if any(args != weights[0] for args in weights):
        raise InputError("compressed-tensors config_groups quantize weights in different ways", file=path, hint=_HINT)
    args = weights[0]
    if args.get("type") != "float" or args.get("num_bits") != 8:
        kind = f"{args.get('type')}{args.get('num_bits')}"
        raise InputError(f"compressed-tensors {kind} weights are not supported (FP8 is)", file=path, hint=_HINT)
    strategy = args.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise InputError(f"compressed-tensors FP8 with strategy {strategy!r} is not supported", file=path, hint=_HINT)
    if not args.get("symmetric", True) or args.get("dynamic") not in (False, None) or args.get("actorder"):
        raise InputError("asymmetric, dynamic or act-ordered FP8 weights are not supported", file=path, hint=_HINT)
    if args.get("scale_dtype") is not None:
        raise InputError(f"scale_dtype {args['scale_dtype']!r} is not supported", file=path, hint=_HINT)
    block = args.get("block_structure")
    if strategy == "block" and not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(n, int) and n > 0 for n in block)
    ):
        raise InputError(f"block_structure {block!r} is not two positive integers", file=path, hint=_HINT)
    activations = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
    return QuantFormat(
        method="compressed-tensors",
        scale_suffix="weight_scale",
        strategy=strategy,
        block=(block[0], block[1]) if strategy == "block" else None,
        ue8m0=False,
        ignore=tuple(str(entry) for entry in quantization.get("ignore") or ()),
        activations=activations,
        kv_cache=bool(quantization.get("kv_cache_scheme")),
    )


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight and its scale tensor (which may sit in another shard)."""

    weight: TensorInfo
    scale: TensorInfo
    weight_file: Path
    scale_file: Path


def find_quantized(
    fmt: QuantFormat, tensors: Mapping[str, tuple[TensorInfo, Path]], problems: list[ShardmergeError]
) -> dict[str, QuantizedWeight]:
    """Every quantized weight of the checkpoint by name, paired with its scale; a problem for a
    weight without a usable scale, a scale without its weight, or a weight the config's
    ignore list says is unquantized."""
    found: dict[str, QuantizedWeight] = {}
    for name, (info, file) in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == fmt.scale_suffix:
            weight = tensors.get(f"{module}.weight")
            if weight is None or weight[0].dtype != WEIGHT_DTYPE:
                what = "is missing" if weight is None else f"is {weight[0].dtype}, not {WEIGHT_DTYPE}"
                problems.append(InputError(f"a weight scale whose weight {what}", file=file, tensor=name, hint=_HINT))
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
                    hint="the checkpoint is incomplete or not in the format its config declares",
                )
            )
            continue
        problem = _scale_problem(fmt, info, scale[0], module)
        if problem:
            problems.append(InputError(problem, file=scale[1], tensor=scale[0].name, hint=_HINT))
            continue
        found[name] = QuantizedWeight(info, scale[0], file, scale[1])
    return found


def _scale_problem(fmt: QuantFormat, weight: TensorInfo, scale: TensorInfo, module: str) -> str | None:
    if len(weight.shape) < 2:
        return f"a scale for a {len(weight.shape)}-D weight; FP8 weights are matrices"
    if len(weight.shape) > 2 and fmt.strategy == "tensor":
        return f"one scale per tensor for a {len(weight.shape)}-D weight is not supported"
    if scale.dtype not in SCALE_DTYPES:
        return f"scale dtype {scale.dtype} is not one of {', '.join(sorted(SCALE_DTYPES))}"
    expected = fmt.scale_shape(weight.shape)
    if tuple(scale.shape) != expected and not (fmt.strategy == "tensor" and tuple(scale.shape) in ((), (1,), (1, 1))):
        grain = f"weight {list(weight.shape)} in {fmt.describe()}"
        return f"scale shape {list(scale.shape)} does not match the {grain}: expected {list(expected)}"
    if fmt.ignored(module):
        return "the weight is quantized, but the config lists its module as left unquantized"
    return None
