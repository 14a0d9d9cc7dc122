"""A mixed-format base, as DeepSeek-style releases ship them: a compressed-tensors
``mixed-precision`` config whose groups give a Qwen3-MoE's routed experts (stored one tensor
per expert) NVFP4 and every other linear layer FP8, both stored by compressed-tensors' own
quantizers. Each tensor is read in the format of the group whose targets name it most
closely, whatever its dtype (an NVFP4 weight's scales are FP8-E4M3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import Qwen3MoeConfig

import shardmerge
from conftest import (
    Base,
    assert_matches_saved,
    assert_refused,
    assert_same_logits,
    merge_broken_copy,
    peft_reference,
    read_output,
    read_output_like_base,
    save_adapter,
    save_base,
    save_in_two_shards,
    saved_reference,
)
from fp8_checkpoints import compressed_tensors
from packed_checkpoints import library_nvfp4_values, nvfp4_config, reference_nvfp4, shared_global_scales

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))
EXPERTS = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
FP8_WEIGHTS = compressed_tensors("channel")["config_groups"]["group_0"]["weights"]


def mixed_config(fp8_targets: list[str] | None = None, nvfp4_targets: list[str] | None = None) -> dict[str, Any]:
    nvfp4 = nvfp4_config()["config_groups"]["group_0"]["weights"]
    return {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": fp8_targets or ["Linear"], "weights": FP8_WEIGHTS, "format": "float-quantized"},
            "group_1": {"targets": nvfp4_targets or [EXPERTS], "weights": nvfp4, "format": "nvfp4-pack-quantized"},
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"],
        "kv_cache_scheme": None,
    }


def reference_fp8(value: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' FP8 per channel, scales held in bfloat16."""
    args = QuantizationArgs(**FP8_WEIGHTS)
    scale, _ = calculate_qparams(value.amin(1, keepdim=True), value.amax(1, keepdim=True), args)
    held = scale.to(torch.bfloat16)
    return {"weight": ct_quantize(value, held, None, args, dtype=torch.float8_e4m3fn), "weight_scale": held}


def library_fp8_values(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    args = QuantizationArgs(**FP8_WEIGHTS)
    return ct_dequantize(stored["weight"], stored["weight_scale"].float(), args=args, dtype=torch.float32)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Base]:
    """The mixed base (two shards), and its values as the libraries read them, in float32."""
    root = tmp_path_factory.mktemp("mixed")
    config = Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    source = save_base(config, root / "bf16", torch.bfloat16, seed=7)
    out: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    tensors = read_output_like_base(source.path)
    # each expert's gate and up projections share a global scale, as llm-compressor gives them
    scales = shared_global_scales({n: v.float() for n, v in tensors.items() if ".experts." in n and v.dim() == 2})
    for name, value in tensors.items():
        module = name.removesuffix(".weight")
        if not (value.dim() == 2 and name.endswith("_proj.weight")):
            out[name], values[name] = value, value.float()
            continue
        expert = ".experts." in name
        stored = reference_nvfp4(value.float(), scales[name]) if expert else reference_fp8(value.float())
        out.update({f"{module}.{key}": tensor for key, tensor in stored.items()})
        values[name] = (library_nvfp4_values if expert else library_fp8_values)(stored)
    folder = root / "mixed"
    folder.mkdir()
    apart = "model.layers.0.mlp.experts.1.down_proj"
    save_in_two_shards(out, folder, {f"{apart}.weight_scale", f"{apart}.weight_global_scale"}, apart)
    config = json.loads((source.path / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": mixed_config()}))
    plain = root / "mixed-dequantized"
    plain.mkdir()
    save_file(values, plain / "model.safetensors", metadata={"format": "pt"})
    (plain / "config.json").write_text(json.dumps(config | {"dtype": "float32"}))
    return folder, Base(plain, torch.float32)


def _adapter(base: Base, folder: Path) -> Path:
    """LoRA on attention and on the fused experts (PEFT's ``target_parameters``), which the
    checkpoint stores one tensor per expert."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    return save_adapter(base, folder, seed=17, config=config)


def test_a_mixed_base_is_read_by_group_and_merges_exactly(mixed: tuple[Path, Base], tmp_path: Path) -> None:
    path, dequantized = mixed
    adapter = _adapter(dequantized, tmp_path / "adapter")
    plan = shardmerge.plan(base=str(path), adapters=[str(adapter)], dtype="bfloat16")
    formats = {t.name: t.quant.format.codec.name for shard in plan.shards for t in shard.tensors if t.quant}
    assert formats["model.layers.0.mlp.experts.1.down_proj.weight"] == "nvfp4"
    assert formats["model.layers.0.self_attn.q_proj.weight"] == "fp8"
    assert set(formats.values()) == {"nvfp4", "fp8"}
    output = tmp_path / "out"
    shardmerge.merge(base=str(path), adapters=[str(adapter)], output=str(output), dtype="bfloat16")
    reference = peft_reference(dequantized, [(adapter, 1.0)])
    expected = saved_reference(reference, tmp_path / "reference")
    assert read_output(output).keys() == expected.keys()
    assert_matches_saved(output, expected, torch.bfloat16)
    assert_same_logits(output, reference, torch.bfloat16)


def test_a_mixed_base_kept_in_its_formats_is_each_librarys_quantization_of_the_merge(
    mixed: tuple[Path, Base], tmp_path: Path
) -> None:
    path, dequantized = mixed
    adapter = _adapter(dequantized, tmp_path / "adapter")
    exact, output = tmp_path / "float32", tmp_path / "out"
    shardmerge.merge(base=str(path), adapters=[str(adapter)], output=str(exact), dtype="float32")
    shardmerge.merge(base=str(path), adapters=[str(adapter)], output=str(output))
    merged, ours, theirs = read_output(exact), read_output(output), read_output(path)
    assert ours.keys() == theirs.keys()
    changed = set()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.experts.2.down_proj"):
        value = merged[f"{name}.weight"]
        expected = reference_nvfp4(value) if ".experts." in name else reference_fp8(value)
        for key, tensor in expected.items():
            assert torch.equal(ours[f"{name}.{key}"].view(torch.uint8), tensor.view(torch.uint8)), (name, key)
            changed.add(f"{name}.{key}")
    for name in theirs.keys() - changed:
        if not any(target in name for target in ("q_proj", "down_proj")):
            assert torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)), name


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "two-groups-alike": (
        mixed_config(fp8_targets=[r"re:.*proj$"]),
        "config groups group_0 and group_1 name this module alike: the format it is in cannot be told",
    ),
    "no-group": (
        mixed_config(fp8_targets=[r"re:.*self_attn.*"], nvfp4_targets=[r"re:.*gate_proj$"]),
        "stored as NVFP4 values, as are 15 more tensors, but no config group of config.json declares that format "
        "for its module",
    ),
    "group-covering-nothing-of-its-format": (
        mixed_config(fp8_targets=["lm_head"]),
        "compressed-tensors FP8 (per channel) for config group group_0 (lm_head), but no tensor it covers is stored "
        "in it",
    ),
    "group-without-format": (
        mixed_config() | {"config_groups": {"group_0": {"targets": ["Linear"], "weights": FP8_WEIGHTS}}},
        "config group group_0 names no format of its own",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_declarations_that_overlap_or_leave_a_tensor_out_are_refused(
    case: str, mixed: tuple[Path, Base], tmp_path: Path
) -> None:
    path, dequantized = mixed
    adapter = _adapter(dequantized, tmp_path / "adapter")
    quantization, message = BAD[case]
    done, output = merge_broken_copy(
        path, adapter, lambda _, config: config.update(quantization_config=quantization), tmp_path
    )
    assert_refused(done, message, output)
