"""What a quantized checkpoint says about itself: its ``quantization_config`` read into one
QuantFormat, and which of its tensors are quantized weights with which scale.

Two FP8 formats are read (weights in ``float8_e4m3fn``, W = q * scale, one scale per block,
row or tensor): transformers' fine-grained FP8 (``quant_method: fp8``, ``X.weight_scale_inv``
per ``weight_block_size`` block, DeepSeek-V3 and Qwen3-FP8 style) and compressed-tensors'
float-quantized FP8 (``X.weight_scale`` per tensor, channel or block). Two packed formats,
several values to a stored element, are read in ``packed.py``: MXFP4 (gpt-oss) and
compressed-tensors' pack-quantized integers. Every other method is refused here, by name.
Which weights are quantized is decided by their dtype and the presence of their scale,
cross-checked against the config's ignore list, never by name patterns.
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
HINT = "merge into the 16-bit release of the base model"


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
    packing: str | None = None  # ``mxfp4`` or ``int``: several values to a stored element
    bits: int = 8
    symmetric: bool = True

    def describe(self) -> str:
        if self.packing == "mxfp4":
            return "MXFP4 (32-value blocks, E8M0 scales)"
        if self.packing == "int":
            grain = f"groups of {self.block[1]}" if self.block else "per channel"
            kind = "symmetric" if self.symmetric else "asymmetric"
            return f"compressed-tensors INT{self.bits} ({grain}, {kind})"
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
        if self.packing == "int" and not self.symmetric:
            return 32 // self.bits  # zero points are packed along the rows
        return self.block[0] if self.strategy == "block" and self.block else 1

    def ignored(self, module: str) -> bool:
        """Whether the config lists ``module`` as left unquantized."""
        if self.method in ("fp8", "mxfp4"):
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
        raise InputError("quantization_config is not an object", file=path, hint=HINT)
    method = str(quantization.get("quant_method", "unknown"))
    if method == "fp8":
        fmt = _fine_grained(quantization, path)
    elif method == "mxfp4":
        fmt = mxfp4_format(quantization, path)
    elif method == "compressed-tensors" and quantization.get("format") == "pack-quantized":
        fmt = int_format(quantization, path)
    elif method == "compressed-tensors":
        fmt = _compressed_tensors(quantization, path)
    else:
        raise InputError(
            f"the base is quantized with {method}, which shardmerge cannot merge into", file=path, hint=HINT
        )
    _check_ignore(fmt, path)
    return fmt


def _check_ignore(fmt: QuantFormat, path: Path) -> None:
    """The ignore list's entries are names or expressions that compile, as ``ignored`` reads them."""
    for key in fmt.ignore:
        try:
            re.compile(key if fmt.method in ("fp8", "mxfp4") else key.removeprefix("re:"))
        except re.error as exc:
            raise InputError(
                f"ignore entry {key!r} is not a regular expression ({exc})", file=path, hint=HINT
            ) from None


def _positive_ints(values: object, count: int) -> bool:
    """A list of ``count`` JSON integers above zero (``true`` is not one)."""
    return isinstance(values, list) and len(values) == count and all(type(n) is int and n > 0 for n in values)


def _names(entries: object, path: Path) -> tuple[str, ...]:
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise InputError(f"the ignore list {entries!r} is not a list of names", file=path, hint=HINT)
    return tuple(entries)


def _fine_grained(quantization: dict[str, Any], path: Path) -> QuantFormat:
    block = quantization.get("weight_block_size")
    if block is not None and not _positive_ints(block, 2):
        raise InputError(f"weight_block_size {block!r} is not two positive integers", file=path, hint=HINT)
    if quantization.get("dequantize"):
        raise InputError("the fp8 config asks transformers to dequantize on load", file=path, hint=HINT)
    scale_fmt = quantization.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise InputError(f"unknown fp8 scale_fmt {scale_fmt!r}", file=path, hint=HINT)
    ignore = quantization.get("modules_to_not_convert") or quantization.get("ignored_layers") or []
    static = quantization.get("activation_scheme", "dynamic") == "static"
    return QuantFormat(
        method="fp8",
        scale_suffix="weight_scale_inv",
        strategy="block" if block else "tensor",
        block=(block[0], block[1]) if block else None,
        ue8m0=scale_fmt == "ue8m0",
        ignore=_names(ignore, path),
        activations=("activation_scale",) if static else (),
    )


def weight_args(quantization: dict[str, Any], path: Path) -> dict[str, Any]:
    """The one way a compressed-tensors config quantizes weights (every group alike)."""
    groups = quantization.get("config_groups") or {}
    weights = [group.get("weights") for group in groups.values() if isinstance(group, dict)]
    if not weights or any(not isinstance(args, dict) for args in weights):
        raise InputError("compressed-tensors config_groups declare no weight quantization", file=path, hint=HINT)
    if any(args != weights[0] for args in weights):
        raise InputError("compressed-tensors config_groups quantize weights in different ways", file=path, hint=HINT)
    return weights[0]


def _compressed_tensors(quantization: dict[str, Any], path: Path) -> QuantFormat:
    fmt = quantization.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise InputError(
            f"compressed-tensors format {fmt!r} is not supported (float-quantized FP8 and pack-quantized INT4/INT8 "
            "are)",
            file=path,
            hint=HINT,
        )
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
    if strategy == "block" and not _positive_ints(block, 2):
        raise InputError(f"block_structure {block!r} is not two positive integers", file=path, hint=HINT)
    activations = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
    return QuantFormat(
        method="compressed-tensors",
        scale_suffix="weight_scale",
        strategy=strategy,
        block=(block[0], block[1]) if strategy == "block" else None,
        ue8m0=False,
        ignore=_names(quantization.get("ignore") or [], path),
        activations=activations,
        kv_cache=bool(quantization.get("kv_cache_scheme")),
    )


def mxfp4_format(quantization: dict[str, Any], path: Path) -> QuantFormat:
    """transformers' MXFP4 (gpt-oss): ``X_blocks`` (uint8, two E2M1 values a byte, 32 values a
    block) and ``X_scales`` (uint8 E8M0 exponents, one a block)."""
    if quantization.get("dequantize"):
        raise InputError("the mxfp4 config asks transformers to dequantize on load", file=path, hint=HINT)
    ignore = quantization.get("modules_to_not_convert") or []
    return QuantFormat(
        method="mxfp4",
        scale_suffix="_scales",
        strategy="block",
        block=(1, 32),
        ue8m0=True,
        ignore=_names(ignore, path),
        activations=(),
        packing="mxfp4",
        bits=4,
    )


def int_format(quantization: dict[str, Any], path: Path) -> QuantFormat:
    """compressed-tensors ``pack-quantized``: integer weights packed into int32
    (``X.weight_packed``), a scale per group or per output channel (``X.weight_scale``), the
    original shape (``X.weight_shape``), and for asymmetric schemes packed zero points
    (``X.weight_zero_point``)."""
    args = weight_args(quantization, path)
    bits, strategy, group = args.get("num_bits"), args.get("strategy"), args.get("group_size")
    if args.get("type") != "int" or type(bits) is not int or bits not in (4, 8):
        kind = f"{args.get('type')}{bits}"
        raise InputError(f"pack-quantized {kind} weights are not supported (int4 and int8 are)", file=path, hint=HINT)
    if strategy not in ("group", "channel"):
        raise InputError(f"pack-quantized weights with strategy {strategy!r} are not supported", file=path, hint=HINT)
    if strategy == "group" and not _positive_ints([group], 1):
        raise InputError(f"group_size {group!r} is not a positive integer", file=path, hint=HINT)
    if args.get("actorder"):
        raise InputError(f"act-ordered weights (actorder {args['actorder']!r}) are not supported", file=path, hint=HINT)
    if args.get("dynamic") not in (False, None):
        raise InputError("dynamic weight quantization is not supported", file=path, hint=HINT)
    for key in ("scale_dtype", "zp_dtype"):
        if args.get(key) is not None:
            raise InputError(f"{key} {args[key]!r} is not supported", file=path, hint=HINT)
    activations = quantization.get("config_groups", {})
    if any(isinstance(g, dict) and g.get("input_activations") for g in activations.values()):
        raise InputError("quantized activations with pack-quantized weights are not supported", file=path, hint=HINT)
    return QuantFormat(
        method="compressed-tensors",
        scale_suffix="weight_scale",
        strategy="group" if strategy == "group" else "channel",
        block=(1, group) if strategy == "group" else None,
        ue8m0=False,
        ignore=_names(quantization.get("ignore") or [], path),
        activations=(),
        kv_cache=bool(quantization.get("kv_cache_scheme")),
        packing="int",
        bits=bits,
        symmetric=bool(args.get("symmetric", True)),
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
                problems.append(InputError(f"a weight scale whose weight {what}", file=file, tensor=name, hint=HINT))
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
            problems.append(InputError(problem, file=scale[1], tensor=scale[0].name, hint=HINT))
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
