"""bitsandbytes weights as transformers' ``save_pretrained`` writes them (``quant_method:
bitsandbytes``), read to be written in 16 bits (bitsandbytes has no exact quantizer to write
them back with).

- 4-bit (NF4 or FP4): ``M.weight`` uint8 [n / 2, 1], the n values of the [out, in] weight in
  order, two a byte; ``M.weight.absmax`` one scale a block of ``blocksize`` values (float32,
  or with double quantization uint8 codes read through ``M.weight.nested_absmax`` and
  ``M.weight.nested_quant_map`` plus an offset); ``M.weight.quant_map``, the 16 values; and
  ``M.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``), a JSON object in uint8: the
  quant type, block size, original dtype and shape, and the nested block size and offset.
- 8-bit (LLM.int8): ``M.weight`` int8 [out, in], ``M.SCB`` float32 [out], the largest
  magnitude of each row, and ``M.weight_format`` (0: rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, ShardmergeError
from ..formats.jsondoc import parse
from ..formats.safetensors import TensorInfo
from .base import (
    IGNORED,
    INCOMPLETE,
    Located,
    QuantFormat,
    QuantizedWeight,
    check_ignore,
    names,
    problem,
    register,
    small_values,
    transformers_ignored,
)

METHOD = "bitsandbytes"
TYPES = ("nf4", "fp4")
STATE = ".weight.quant_state.bitsandbytes__"
NESTED = (".weight.nested_absmax", ".weight.nested_quant_map")
HINT = "merge with --dtype bfloat16 (auto does), or into the 16-bit release of the base model"
MAX_STATE_BYTES = 4096  # a quantization state is a JSON object of a few keys
NESTED_BLOCK = 256  # absmax values a nested scale covers
FLOAT32_MAX = 3.4028234663852886e38


class Bnb:
    name = "bnb"
    packed = True
    writes = False
    stored_as = "bitsandbytes values"

    def claims(self, quantization: Mapping[str, Any]) -> bool:
        return quantization.get("quant_method") == METHOD

    def read(self, quantization: dict[str, Any], path: Path) -> QuantFormat:
        four, eight = bool(quantization.get("load_in_4bit")), bool(quantization.get("load_in_8bit"))
        if four == eight:
            raise InputError("the bitsandbytes config loads in neither or both of 4 and 8 bits", file=path, hint=HINT)
        kind = quantization.get("bnb_4bit_quant_type", "fp4") if four else "int8"
        if four and kind not in TYPES:
            raise InputError(f"bitsandbytes 4-bit type {kind!r} is not supported (nf4 and fp4 are)", file=path)
        storage = quantization.get("bnb_4bit_quant_storage", "uint8")
        if four and storage != "uint8":
            raise InputError(
                f"bitsandbytes 4-bit values stored as {storage!r} (for FSDP) are not supported (uint8 are)",
                file=path,
                hint=HINT,
            )
        if eight and quantization.get("llm_int8_has_fp16_weight"):
            raise InputError("bitsandbytes 8-bit with 16-bit weights kept is not supported", file=path, hint=HINT)
        ignore = quantization.get("llm_int8_skip_modules") or []
        return QuantFormat(
            method=METHOD,
            scale_suffix="SCB" if eight else "weight.absmax",
            strategy="channel" if eight else "block",
            block=None if eight else (1, 64),
            ue8m0=False,
            ignore=check_ignore(names(ignore, path), path, prefixed=False),
            activations=(),
            packing=kind,
            bits=8 if eight else 4,
        )

    def owns(self, fmt: QuantFormat) -> bool:
        return fmt.method == METHOD

    def keeps(self, fmt: QuantFormat) -> str:
        return "nothing: bitsandbytes weights are written in 16 bits"

    def describe(self, fmt: QuantFormat) -> str:
        if fmt.bits == 8:
            return "bitsandbytes LLM.int8 (a scale per row)"
        return f"bitsandbytes {fmt.packing.upper() if fmt.packing else ''} (blocks of 64 values)"

    def scale_shape(self, fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:-1] if fmt.bits == 8 else (math.prod(shape) // 64,)

    def row_step(self, fmt: QuantFormat) -> int:
        return 1

    def ignored(self, fmt: QuantFormat, module: str) -> bool:
        return transformers_ignored(fmt, module)

    def is_stored(self, name: str, info: TensorInfo) -> bool:
        return name.endswith(".weight") and info.dtype in ("U8", "I8")

    def find(
        self,
        fmt: QuantFormat,
        tensors: Mapping[str, Located],
        problems: list[ShardmergeError],
        *,
        transposed: bool | None,
    ) -> dict[str, QuantizedWeight]:
        find = _find_int8 if fmt.bits == 8 else _find_4bit
        return find(self, fmt, tensors, problems)

    def label(self, fmt: QuantFormat, stored_dtype: str, companions: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        scale, dtype = companions[0]
        stored = "INT8" if fmt.bits == 8 else (fmt.packing or "").upper()
        nested = " (double-quantized)" if len(companions) > 2 else ""
        return stored, f"bitsandbytes {stored} x {dtype} {scale.rpartition('.')[2]}{nested}"


def _find_4bit(
    codec: Bnb, fmt: QuantFormat, tensors: Mapping[str, Located], problems: list[ShardmergeError]
) -> dict[str, QuantizedWeight]:
    """Every 4-bit weight with its companions; its quantization state read and checked
    against the weight and the config."""
    found: dict[str, QuantizedWeight] = {}
    suffix = f"{STATE}{fmt.packing}"
    states = {name: located for name, located in tensors.items() if name.endswith(suffix)}
    for name, located in tensors.items():
        if STATE in name and name not in states:
            problem(problems, f"a quantization state of another type than the config's {fmt.packing}", located, HINT)
    wanted = [located for located in states.values() if _state_problem(located[0]) is None]
    raw = small_values(wanted, problems, "the quantization states of bitsandbytes weights are stored in this shard")
    for state_name, state in sorted(states.items()):
        module = state_name[: -len(suffix)]
        parts = {key: tensors.get(f"{module}{key}") for key in (".weight", ".weight.absmax", ".weight.quant_map")}
        nested = tuple(tensors.get(f"{module}{key}") for key in NESTED)
        missing = [key.lstrip(".") for key, part in parts.items() if part is None]
        if missing:
            problem(problems, f"a bitsandbytes 4-bit weight without its {', '.join(missing)}", state, INCOMPLETE)
            continue
        if state_name not in raw:
            wrong = _state_problem(state[0])
            if wrong:
                problem(problems, wrong, state, HINT)
            continue
        weight, absmax, quant_map = parts.values()
        assert weight is not None and absmax is not None and quant_map is not None
        read = _state(raw[state_name], fmt, weight[0], absmax[0], quant_map[0], nested)
        if isinstance(read, str):
            problem(problems, read, state, HINT)
            continue
        if codec.ignored(fmt, module):
            problem(problems, IGNORED, weight, HINT)
            continue
        companions = (absmax, state, *(part for part in nested if part is not None))
        found[f"{module}.weight"] = QuantizedWeight(
            f"{module}.weight", read, read, False, weight, companions, (quant_map[0].name,)
        )
    for name, located in tensors.items():
        module = name.rpartition(".weight")[0]
        if name.endswith(".weight") and located[0].dtype == "I8":
            problem(problems, "an 8-bit bitsandbytes weight, but the config declares 4 bits", located, HINT)
        if name.endswith(".weight") and located[0].dtype == "U8" and f"{module}{suffix}" not in tensors:
            problem(problems, f"bitsandbytes 4-bit values without their {suffix[len('.weight.') :]}", located)
    return found


def _state_problem(info: TensorInfo) -> str | None:
    """What keeps a quantization state from being read: its dtype, or its size (it is read
    into memory while planning, and its size is the file's writer's to choose)."""
    if info.dtype != "U8" or len(info.shape) != 1:
        return f"the quantization state is {info.dtype} {list(info.shape)}, not JSON in a vector of U8"
    size = info.end - info.begin
    if size > MAX_STATE_BYTES:
        return f"the quantization state holds {size} bytes, more than the {MAX_STATE_BYTES} a state of a few keys takes"
    return None


def _state(
    raw: bytes,
    fmt: QuantFormat,
    weight: TensorInfo,
    absmax: TensorInfo,
    quant_map: TensorInfo,
    nested: tuple[Located | None, ...],
) -> tuple[int, int] | str:
    """The weight's [out, in] shape from its quantization state, or what is wrong."""
    try:
        state = parse(raw)
    except ValueError as exc:
        return f"the quantization state does not parse ({exc})"
    if not isinstance(state, dict):
        return "the quantization state is not a JSON object"
    shape, block = state.get("shape"), state.get("blocksize")
    if state.get("quant_type") != fmt.packing:
        return f"the quantization state's type {state.get('quant_type')!r} is not the config's {fmt.packing}"
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        return f"the quantization state's shape {shape!r} is not two positive integers"
    rows, cols = shape
    if type(block) is not int or block <= 0 or cols % block:
        return f"blocks of {block!r} values do not divide the weight's {cols} columns (whole blocks a row are read)"
    if weight.dtype != "U8" or weight.end - weight.begin != math.ceil(rows * cols / 2):
        return f"weight {weight.dtype} {list(weight.shape)} does not hold a {shape} weight in 4 bits"
    if quant_map.dtype != "F32" or quant_map.shape != (16,):
        return f"quant_map {quant_map.dtype} {list(quant_map.shape)} is not 16 F32 values"
    blocks = rows * cols // block
    has_nested = "nested_blocksize" in state
    present = {part is not None for part in nested}
    if present != {has_nested}:
        return "the quantization state and the nested_absmax and nested_quant_map tensors disagree on nesting"
    if absmax.shape != (blocks,) or absmax.dtype != ("U8" if has_nested else "F32"):
        wanted = f"{'U8' if has_nested else 'F32'} [{blocks}]"
        return f"absmax {absmax.dtype} {list(absmax.shape)} does not match: expected {wanted}"
    if has_nested:
        offset = state.get("nested_offset")
        finite = type(offset) in (int, float) and abs(offset) <= FLOAT32_MAX  # added in float32
        if state.get("nested_blocksize") != NESTED_BLOCK or not finite:
            return f"nested blocks of {state.get('nested_blocksize')!r} with offset {offset!r} are not supported"
        scales, codes = (part[0] for part in nested if part is not None)
        if scales.dtype != "F32" or scales.shape != (math.ceil(blocks / NESTED_BLOCK),):
            return f"nested_absmax {scales.dtype} {list(scales.shape)} does not match the {blocks} absmax values"
        if codes.dtype != "F32" or codes.shape != (256,):
            return f"nested_quant_map {codes.dtype} {list(codes.shape)} is not 256 F32 values"
    return rows, cols


def _find_int8(
    codec: Bnb, fmt: QuantFormat, tensors: Mapping[str, Located], problems: list[ShardmergeError]
) -> dict[str, QuantizedWeight]:
    """Every LLM.int8 weight with its row scales (``SCB``); ``weight_format`` must say rows."""
    found: dict[str, QuantizedWeight] = {}
    formats = [
        located
        for name, located in tensors.items()
        if name.endswith(".weight_format") and located[0].dtype == "U8" and located[0].shape == ()
    ]
    raw = small_values(formats, problems, "the formats of bitsandbytes weights are stored in this shard")
    for name, located in sorted(tensors.items()):
        module = name.rpartition(".")[0]
        if (name.endswith(".weight") and located[0].dtype == "U8") or STATE in name:
            problem(problems, "a 4-bit bitsandbytes tensor, but the config declares 8 bits", located, HINT)
        if name.endswith(".SCB") and f"{module}.weight" not in tensors:
            problem(problems, "row scales (SCB) without their weight", located, INCOMPLETE)
        if not (name.endswith(".weight") and located[0].dtype == "I8"):
            continue
        scale = tensors.get(f"{module}.SCB")
        info = located[0]
        if scale is None:
            problem(problems, "an 8-bit bitsandbytes weight without its SCB", located, INCOMPLETE)
            continue
        if len(info.shape) != 2 or scale[0].dtype != "F32" or scale[0].shape != info.shape[:1]:
            wrong = f"{scale[0].dtype} {list(scale[0].shape)}"
            problem(problems, f"SCB {wrong} does not match the weight {list(info.shape)}", scale, HINT)
            continue
        form = f"{module}.weight_format"
        if form in tensors and raw.get(form) != b"\x00":
            problem(problems, "weights not stored by rows (weight_format) are not supported", tensors[form], HINT)
            continue
        if codec.ignored(fmt, module):
            problem(problems, IGNORED, located, HINT)
            continue
        extra = (form,) if form in tensors else ()
        found[name] = QuantizedWeight(name, info.shape, info.shape, False, located, (scale,), extra)
    return found


CODEC = register(Bnb())
