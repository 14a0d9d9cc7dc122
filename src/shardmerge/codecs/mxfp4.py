"""MXFP4 as transformers stores it (gpt-oss, ``quant_method: mxfp4``): ``X_blocks``
[experts, out, in / 32, 16] uint8 (two E2M1 values a byte, 32 values a block) and
``X_scales`` [experts, out, in / 32] uint8 (E8M0 exponents, one a block) stand for the
model's parameter ``X`` [experts, in, out] (the integration transposes on load).
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
    grid_shape,
    names,
    problem,
    register,
    transformers_ignored,
)

METHOD = "mxfp4"
BLOCK = 32  # values a scale covers


class Mxfp4:
    name = "mxfp4"
    packed = True
    writes = True
    stored_as = "MXFP4 blocks"

    def claims(self, quantization: Mapping[str, Any]) -> bool:
        return quantization.get("quant_method") == METHOD

    def read(self, quantization: dict[str, Any], path: Path) -> QuantFormat:
        if quantization.get("dequantize"):
            raise InputError("the mxfp4 config asks transformers to dequantize on load", file=path, hint=HINT)
        ignore = quantization.get("modules_to_not_convert") or []
        return QuantFormat(
            method=METHOD,
            scale_suffix="_scales",
            strategy="block",
            block=(1, BLOCK),
            ue8m0=True,
            ignore=check_ignore(names(ignore, path), path, prefixed=False),
            activations=(),
            packing=METHOD,
            bits=4,
        )

    def owns(self, fmt: QuantFormat) -> bool:
        return fmt.packing == METHOD

    def keeps(self, fmt: QuantFormat) -> str:
        return (
            "E2M1 has 1 bit of mantissa, so an update below about a quarter of a weight's magnitude is rounded "
            "away: often most of a LoRA update"
        )

    def describe(self, fmt: QuantFormat) -> str:
        return "MXFP4 (32-value blocks, E8M0 scales)"

    def scale_shape(self, fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
        return grid_shape(fmt, shape)

    def row_step(self, fmt: QuantFormat) -> int:
        return 1

    def ignored(self, fmt: QuantFormat, module: str) -> bool:
        return transformers_ignored(fmt, module)

    def is_stored(self, name: str, info: TensorInfo) -> bool:
        return info.dtype == "U8" and name.endswith("_blocks")

    def find(
        self,
        fmt: QuantFormat,
        tensors: Mapping[str, Located],
        problems: list[ShardmergeError],
        *,
        transposed: bool | None,
    ) -> dict[str, QuantizedWeight]:
        found: dict[str, QuantizedWeight] = {}
        for name, located in tensors.items():
            info = located[0]
            if name.endswith("_scales") and f"{name[: -len('_scales')]}_blocks" not in tensors and info.dtype == "U8":
                problem(problems, "MXFP4 scales without their _blocks tensor", located, INCOMPLETE)
            if not name.endswith("_blocks"):
                continue
            model = name[: -len("_blocks")]
            scale = tensors.get(f"{model}_scales")
            if scale is None:
                problem(
                    problems,
                    "MXFP4 blocks without their _scales tensor: their values cannot be read",
                    located,
                    INCOMPLETE,
                )
                continue
            shape = info.shape
            if info.dtype != "U8" or len(shape) != 4 or shape[3] != 16:
                problem(
                    problems,
                    f"MXFP4 blocks must be U8 [experts, out, in / 32, 16], not {info.dtype} {list(shape)}",
                    located,
                )
                continue
            if scale[0].dtype != "U8" or scale[0].shape != shape[:3]:
                wanted = list(shape[:3])
                problem(
                    problems,
                    f"scale {scale[0].dtype} {list(scale[0].shape)} does not match the blocks: expected U8 {wanted}",
                    scale,
                )
                continue
            if self.ignored(fmt, model.rpartition(".")[0]):
                problem(problems, IGNORED, located)
                continue
            if transposed is not True:
                problem(
                    problems,
                    "MXFP4 experts of an architecture whose expert layout shardmerge does not know: the model's "
                    "parameter cannot be told from the blocks",
                    located,
                )
                continue
            experts, rows, blocks, _ = shape
            stored = (experts, rows, blocks * BLOCK)
            found[model] = QuantizedWeight(model, (experts, blocks * BLOCK, rows), stored, True, located, (scale,))
        return found

    def label(self, fmt: QuantFormat, stored_dtype: str, companions: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        scale, _ = companions[0]
        return "MXFP4", f"MXFP4 x E8M0 {scale.rpartition('.')[2]}"


CODEC = register(Mxfp4())
