"""Tiny packed checkpoints: a real transformers model saved in bfloat16, its quantizable
weights packed by shardmerge's own quantizers (MXFP4 for gpt-oss's experts, compressed-tensors
pack-quantized integers for Linear weights), and a float32 copy of the values they stand for,
read by the format's own library (transformers' MXFP4 conversion, compressed-tensors'
decompressor): the base PEFT's reference merge runs on. Also the reference quantizers a
requantized output is compared with: compressed-tensors' own, and for MXFP4 (whose reference,
OpenAI's triton_kernels, is not installable here) its definition written out element by
element."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import NVFP4PackedCompressor, PackedQuantizationCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.quant_scheme import NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from safetensors.torch import save_file
from transformers import GptOssConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from conftest import Base, read_output_like_base, save_in_two_shards
from shardmerge.codecs import QuantFormat, read_quantization
from shardmerge.run.codecs.int_packed import int_pack, int_quantize, pack_zero_rows
from shardmerge.run.codecs.mxfp4 import mxfp4_quantize

LEFT_16_BIT = "model.layers.1.self_attn.o_proj"


@dataclass(frozen=True)
class PackedBase:
    """``path``: the packed checkpoint; ``dequantized``: its values in float32, read by the
    format's own library, under the 16-bit model's names; ``quantized``: those names."""

    path: Path
    dequantized: Base
    quantized: tuple[str, ...]
    fmt: QuantFormat
    quantization: dict[str, Any]


def gpt_oss_config(hidden: int = 32) -> GptOssConfig:
    """Hidden size equal to the intermediate size, as in the real 2880 = 2880."""
    return GptOssConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip


def mxfp4_config() -> dict[str, Any]:
    """gpt-oss's own: everything but the experts stays 16-bit."""
    keep = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    return {"quant_method": "mxfp4", "modules_to_not_convert": keep}


def int_config(bits: int = 4, symmetric: bool = True, group: int | None = 8) -> dict[str, Any]:
    weights = {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group else "channel",
        "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax",
    }  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
        "ignore": ["lm_head", "re:.*mlp.gate$", LEFT_16_BIT],
        "kv_cache_scheme": None,
    }


def nvfp4_config() -> dict[str, Any]:
    """compressed-tensors' NVFP4A16 preset, as a checkpoint's config stores it."""
    weights = NVFP4A16["weights"].model_dump()
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
        "ignore": ["lm_head", "re:.*mlp.gate$", LEFT_16_BIT],
        "kv_cache_scheme": None,
    }


def mxfp4_checkpoint(source: Path, folder: Path) -> PackedBase:
    """gpt-oss's experts of the bfloat16 checkpoint ``source`` in MXFP4, as the MXFP4 releases
    store them: ``X_blocks`` and ``X_scales`` in the [experts, out, in] order."""

    def pack(fmt: QuantFormat, name: str, value: torch.Tensor) -> Packed | None:
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return None
        experts, inputs, outputs = value.shape
        stored = value.float().transpose(1, 2).contiguous().view(-1, inputs)
        blocks = torch.empty(stored.shape[0], inputs // 2, dtype=torch.uint8)
        scales = torch.empty(stored.shape[0], inputs // 32, dtype=torch.uint8)
        mxfp4_quantize(stored, blocks, scales)
        out = {
            f"{name}_blocks": blocks.view(experts, outputs, inputs // 32, 16),
            f"{name}_scales": scales.view(experts, outputs, inputs // 32),
        }
        return out, convert_moe_packed_tensors(*out.values(), dtype=torch.float32)

    return _pack(source, folder, mxfp4_config(), pack, lambda weight: (weight, {f"{weight}_scales"}))


def int_checkpoint(source: Path, folder: Path, quantization: dict[str, Any]) -> PackedBase:
    """The Linear weights of the bfloat16 checkpoint ``source`` packed as compressed-tensors
    packs them, scales in bfloat16 (the weights' dtype, as its modules hold them)."""

    def pack(fmt: QuantFormat, name: str, value: torch.Tensor) -> Packed | None:
        module = name.removesuffix(".weight")
        if not (value.dim() == 2 and name.endswith("_proj.weight") and ".layers." in name) or fmt.ignored(module):
            return None
        packed = reference_int(value.float(), quantization)
        return {f"{module}.{key}": tensor for key, tensor in packed.items()}, library_int_values(packed, quantization)

    def apart(weight: str) -> tuple[str, set[str]]:
        module = weight.removesuffix(".weight")
        return module, {f"{module}.weight_scale", f"{module}.weight_zero_point"}

    return _pack(source, folder, quantization, pack, apart)


def nvfp4_checkpoint(source: Path, folder: Path) -> PackedBase:
    """The Linear weights of the bfloat16 checkpoint ``source`` compressed by compressed-tensors'
    NVFP4 rules and compressor, the parts of a fused layer sharing a global scale as
    llm-compressor makes them."""
    quantization = nvfp4_config()
    fmt = read_quantization({"quantization_config": quantization}, source / "config.json")
    assert fmt is not None

    def quantized(name: str, value: torch.Tensor) -> bool:
        module = name.removesuffix(".weight")
        return value.dim() == 2 and name.endswith("_proj.weight") and ".layers." in name and not fmt.ignored(module)

    tensors = read_output_like_base(source)
    scales = shared_global_scales({name: value.float() for name, value in tensors.items() if quantized(name, value)})

    def pack(fmt: QuantFormat, name: str, value: torch.Tensor) -> Packed | None:
        module = name.removesuffix(".weight")
        if name not in scales:
            return None
        packed = reference_nvfp4(value.float(), scales[name])
        return {f"{module}.{key}": tensor for key, tensor in packed.items()}, library_nvfp4_values(packed)

    def apart(weight: str) -> tuple[str, set[str]]:
        module = weight.removesuffix(".weight")
        return module, {f"{module}.weight_scale", f"{module}.weight_global_scale"}

    return _pack(source, folder, quantization, pack, apart)


# A weight's stored tensors by name, and its values read back by the format's library.
Packed = tuple[dict[str, torch.Tensor], torch.Tensor]


def _pack(
    source: Path,
    folder: Path,
    quantization: dict[str, Any],
    pack: Callable[[QuantFormat, str, torch.Tensor], Packed | None],
    apart: Callable[[str], tuple[str, set[str]]],
) -> PackedBase:
    """The checkpoint ``source`` with the weights ``pack`` packs packed, in two shards (the
    first weight's companions, ``apart``, in the other shard than it), and its dequantized
    copy beside it."""
    fmt = read_quantization({"quantization_config": quantization}, source / "config.json")
    assert fmt is not None
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    quantized = []
    for name, value in read_output_like_base(source).items():
        packed = pack(fmt, name, value)
        if packed is None:
            out[name], dequantized[name] = value, value.float()
            continue
        out.update(packed[0])
        dequantized[name] = packed[1]
        quantized.append(name)
    owner, companions = apart(quantized[0])
    folder.mkdir(parents=True)
    save_in_two_shards(out, folder, companions & set(out), owner)
    config = json.loads((source / "config.json").read_text())
    for extra in source.iterdir():
        if extra.suffix == ".json" and not extra.name.startswith("model"):
            shutil.copy(extra, folder / extra.name)
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}, indent=2))
    plain = folder.with_name(folder.name + "-dequantized")
    plain.mkdir(parents=True)
    save_file(
        {n: t.contiguous() for n, t in dequantized.items()}, plain / "model.safetensors", metadata={"format": "pt"}
    )
    (plain / "config.json").write_text(json.dumps(config | {"dtype": "float32"}, indent=2))
    return PackedBase(folder, Base(plain, torch.float32), tuple(quantized), fmt, quantization)


def _scheme(quantization: dict[str, Any]) -> QuantizationScheme:
    args = QuantizationArgs(**quantization["config_groups"]["group_0"]["weights"])
    return QuantizationScheme(targets=["Linear"], weights=args)


def reference_int(
    value: torch.Tensor, quantization: dict[str, Any], scale_dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """``value`` (float32) compressed by compressed-tensors: a minmax observer's scales and
    zero points (``calculate_qparams``), the scale held in ``scale_dtype``, then its packer."""
    scheme = _scheme(quantization)
    args = scheme.weights
    assert args is not None
    rows, cols = value.shape
    group = args.group_size if args.group_size else cols
    grouped = value.reshape(rows, cols // group, group)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": value, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero}
    return dict(PackedQuantizationCompressor.compress(state, scheme))


def library_int_values(packed: dict[str, torch.Tensor], quantization: dict[str, Any]) -> torch.Tensor:
    """compressed-tensors' decompressor, in float32 (its own runs in the scale's dtype)."""
    state = dict(packed) | {"weight_scale": packed["weight_scale"].float()}
    return PackedQuantizationCompressor.decompress(state, _scheme(quantization))["weight"]


def ours_int(value: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """shardmerge's quantizer on ``value`` (float32), as stored tensors."""
    values, scale, zero = int_quantize(value.clone(), fmt, torch.bfloat16)
    words = torch.empty(value.shape[0], math.ceil(value.shape[1] * fmt.bits / 32), dtype=torch.int32)
    out = {"weight_packed": int_pack(values, fmt.bits, words), "weight_scale": scale}
    return out | ({} if zero is None else {"weight_zero_point": pack_zero_rows(zero, fmt.bits)})


def _nvfp4_scheme() -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=NVFP4A16["weights"])


def reference_nvfp4(value: torch.Tensor, scale_of_scales: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``value`` (float32) compressed by compressed-tensors' NVFP4 rules: the global scale of
    the tensor's range (``generate_gparam``) unless given, a minmax observer's group scales
    under it (``calculate_qparams``), then its NVFP4 compressor."""
    scheme = _nvfp4_scheme()
    args = scheme.weights
    assert args is not None and args.group_size is not None
    if scale_of_scales is None:
        scale_of_scales = generate_gparam(value.amin(), value.amax())
    grouped = value.reshape(value.shape[0], -1, args.group_size)
    scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=scale_of_scales)
    state = {"weight": value, "weight_scale": scale, "weight_global_scale": scale_of_scales}
    return dict(NVFP4PackedCompressor.compress(state, scheme))


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_global_scales(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global scale of each weight (float32 values by name) as llm-compressor gives
    them: each weight's own (``generate_gparam``), then for the parts of a layer vLLM fuses
    (a module's q, k and v projections; its gate and up projections) the smallest of theirs
    (``update_fused_layer_weight_global_scales``)."""
    own = {name: generate_gparam(value.amin(), value.amax()) for name, value in values.items()}
    shared = dict(own)
    for names in fused_parts(list(values)):
        smallest = torch.min(torch.cat([own[name] for name in names]))
        shared.update({name: smallest.reshape(1).clone() for name in names})
    return shared


def fused_parts(names: list[str]) -> list[list[str]]:
    """The weights among ``names`` that vLLM fuses into one layer, group by group."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        for index, fused in enumerate(FUSED):
            if leaf in fused:
                groups.setdefault((parent, index), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def library_nvfp4_values(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' NVFP4 decompressor, in float32 (its own unpacks to bfloat16)."""
    state = dict(packed) | {"weight_scale": packed["weight_scale"].float()}
    rows, half = packed["weight_packed"].shape
    unpacked = unpack_fp4_from_uint8(packed["weight_packed"], rows, 2 * half, dtype=torch.float32)
    return dequantize(
        x_q=unpacked,
        scale=state["weight_scale"],
        args=_nvfp4_scheme().weights,
        global_scale=packed["weight_global_scale"],
        dtype=torch.float32,
    )


def reference_mxfp4(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` (float32 [rows, 32 * n]) in MXFP4 by the definition of OpenAI's reference
    quantizer, element by element: a block's scale is the smallest power of two at least its
    largest magnitude / 6 (in float32), none for a block of zeros; each value over the scale
    takes the nearest E2M1 magnitude (a tie the larger one) and its own sign."""
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    rows, cols = value.shape
    blocks = torch.zeros(rows, cols // 2, dtype=torch.uint8)
    scales = torch.zeros(rows, cols // 32, dtype=torch.uint8)
    for row in range(rows):
        for block in range(cols // 32):
            values = value[row, block * 32 : (block + 1) * 32].tolist()
            target = float(torch.tensor(max(abs(v) for v in values) / 6.0, dtype=torch.float32))
            exponent = math.ceil(math.log2(target)) if target > 0 else -127
            scales[row, block] = exponent + 127 if target > 0 else 0
            codes = []
            for v in values:
                q = v / 2.0**exponent if target > 0 else 0.0 * v
                best = min(range(8), key=lambda c, q=q: (abs(abs(q) - magnitudes[c]), -c))
                codes.append(best | (8 if math.copysign(1.0, q) < 0 else 0))
            for pair in range(16):
                blocks[row, block * 16 + pair] = codes[2 * pair] | (codes[2 * pair + 1] << 4)
    return blocks, scales
