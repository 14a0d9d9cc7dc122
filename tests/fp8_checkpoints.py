"""Tiny FP8 checkpoints: a real transformers model saved in bfloat16, its Linear weights
quantized by shardmerge's own quantizer in one of the two FP8 formats, and a float32 copy of
the values they stand for, dequantized by the format's own library (transformers' FP8
integration, compressed-tensors): the base PEFT's reference merge runs on."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from conftest import Base, read_output_like_base, save_in_two_shards
from shardmerge.codecs import QuantFormat, read_quantization
from shardmerge.run.codecs.fp8 import largest, quantize_into, scales_for

# Modules a quantizer leaves in 16 bits besides the head: the MoE router, and one projection
# listed by name, as users' checkpoints do.
LEFT_16_BIT = "model.layers.1.self_attn.o_proj"


@dataclass(frozen=True)
class Fp8Base:
    """``path``: the FP8 checkpoint; ``dequantized``: its values in float32, read by the
    format's own library; ``quantized``: the names of its quantized weights."""

    path: Path
    dequantized: Base
    quantized: tuple[str, ...]
    fmt: QuantFormat


def fine_grained(block: tuple[int, int] | None = (32, 32), **extra: Any) -> dict[str, Any]:
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head", LEFT_16_BIT]}
    if block is not None:
        config["weight_block_size"] = list(block)
    return config | extra


def compressed_tensors(strategy: str, block: tuple[int, int] | None = None, static: bool = False) -> dict[str, Any]:
    weights = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": False,
        "group_size": None,
        "block_structure": list(block) if block else None,
        "actorder": None,
        "observer": "minmax",
    }
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": not static}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": ["lm_head", "re:.*mlp.gate$", LEFT_16_BIT],
        "kv_cache_scheme": None,
    }


def quantize_checkpoint(
    source: Path, folder: Path, quantization: dict[str, Any], scale_dtype: torch.dtype = torch.float32
) -> Fp8Base:
    """Quantize the Linear weights of the bfloat16 checkpoint ``source`` into ``folder`` (two
    shards, one scale stored apart from its weight), and write the dequantized float32 copy
    beside it."""
    config = json.loads((source / "config.json").read_text())
    fmt = read_quantization({"quantization_config": quantization}, source / "config.json")
    assert fmt is not None
    tensors = read_output_like_base(source)
    out: dict[str, torch.Tensor] = {}
    quantized = []
    for name, value in tensors.items():
        module = name.removesuffix(".weight")
        if not _quantizable(name, value) or fmt.ignored(module):
            out[name] = value
            continue
        work = value.float()
        stored, factor = scales_for(largest(work, fmt), fmt, scale_dtype)
        out[name] = quantize_into(torch.empty(value.shape, dtype=torch.float8_e4m3fn), work.clone(), factor, fmt)
        out[f"{module}.{fmt.scale_suffix}"] = stored.reshape(fmt.scale_shape(tuple(value.shape)))
        groups = quantization.get("config_groups")
        if groups and not groups["group_0"]["input_activations"]["dynamic"]:  # static activation scales
            out[f"{module}.input_scale"] = torch.rand(1, dtype=torch.bfloat16) + 0.5
        quantized.append(name)
    folder.mkdir(parents=True)
    owner = quantized[0].removesuffix(".weight")
    save_in_two_shards(out, folder, {f"{owner}.{fmt.scale_suffix}"}, owner)
    for extra in source.iterdir():
        if extra.suffix == ".json" and not extra.name.startswith("model"):
            shutil.copy(extra, folder / extra.name)
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}, indent=2))
    dequantized = folder.with_name(folder.name + "-dequantized")
    _save_dequantized(out, quantized, fmt, quantization, config, dequantized)
    return Fp8Base(folder, Base(dequantized, torch.float32), tuple(quantized), fmt)


def library_dequantize(
    q: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, quantization: dict[str, Any]
) -> torch.Tensor:
    """The float32 value of ``q``, computed by the format's own library."""
    if fmt.method == "fp8":
        return _dequantize_fp8_weight(q, scale, list(fmt.block) if fmt.block else None, torch.float32)
    args = QuantizationArgs(**quantization["config_groups"]["group_0"]["weights"])
    return ct_dequantize(q, scale.float(), args=args, dtype=torch.float32)


def _quantizable(name: str, value: torch.Tensor) -> bool:
    return value.dim() == 2 and name.endswith("_proj.weight") and ".layers." in name


def _save_dequantized(
    tensors: dict[str, torch.Tensor],
    quantized: list[str],
    fmt: QuantFormat,
    quantization: dict[str, Any],
    config: dict[str, Any],
    folder: Path,
) -> None:
    dropped = {
        f"{n.removesuffix('.weight')}.{suffix}" for n in quantized for suffix in (fmt.scale_suffix, "input_scale")
    }
    out = {}
    for name, value in tensors.items():
        if name in dropped:
            continue
        scale = tensors.get(f"{name.removesuffix('.weight')}.{fmt.scale_suffix}")
        out[name] = library_dequantize(value, scale, fmt, quantization) if name in quantized else value.float()
    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in out.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config | {"dtype": "float32"}, indent=2))
