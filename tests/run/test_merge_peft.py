"""Every merge feature against PEFT's own merge_and_unload() in float32, rounded once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardmerge
from conftest import (
    DTYPES,
    Base,
    assert_matches_reference,
    assert_same_logits,
    peft_reference,
    read_output,
    save_adapter,
)

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (base, LoraConfig arguments, output dtype)
FEATURES: dict[str, tuple[str, dict[str, object], str]] = {
    "linear": ("llama-bf16", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR}, "bfloat16"),
    "rslora-patterns": (
        "llama-bf16",
        {
            "r": 8,
            "lora_alpha": 12,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 4, "layers.1.self_attn.q_proj": 2},
            "alpha_pattern": {"down_proj": 3},
        },
        "bfloat16",
    ),
    "embedding": ("llama-bf16", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}, "bfloat16"),
    "dora-linear-embedding": (
        "llama-bf16",
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["embed_tokens", "q_proj", "up_proj"]},
        "bfloat16",
    ),
    "modules-to-save": (
        "llama-bf16",
        {"r": 4, "lora_alpha": 4, "target_modules": ["o_proj"], "modules_to_save": ["lm_head"]},
        "bfloat16",
    ),
    "conv1d-lora-bias": (
        "gpt2-bf16",
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "lora_bias": True},
        "bfloat16",
    ),
    "conv1d-bias-all": (
        "gpt2-bf16",
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "bias": "all"},
        "bfloat16",
    ),
    "conv1d-dora": (
        "gpt2-bf16",
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        "bfloat16",
    ),
    "fp32-base-to-fp32": ("llama-fp32", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR}, "float32"),
    "fp32-base-to-fp16": (
        "llama-fp32",
        {"r": 8, "lora_alpha": 16, "use_dora": True, "target_modules": ["q_proj", "down_proj"]},
        "float16",
    ),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_matches_peft(feature: str, models: Callable[[str], Base], tmp_path: Path) -> None:
    base_name, lora, dtype_name = FEATURES[feature]
    base = models(base_name)
    adapter = save_adapter(base, tmp_path / "adapter", seed=len(feature), **lora)
    output = tmp_path / "out"

    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype=dtype_name)

    assert report.tensors_merged > 0
    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_reference(output, base, reference, DTYPES[dtype_name])
    assert_same_logits(output, reference, DTYPES[dtype_name])


def test_two_weighted_adapters_in_order(models: Callable[[str], Base], tmp_path: Path) -> None:
    base = models("llama-bf16")
    first = save_adapter(base, tmp_path / "a", seed=1, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)
    second = save_adapter(
        base, tmp_path / "b", seed=2, dtype=torch.bfloat16, r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"]
    )
    output = tmp_path / "out"

    shardmerge.merge(
        base=str(base.path),
        adapters=[{"path": str(first), "weight": 0.7}, {"path": str(second), "weight": -0.4}],
        output=str(output),
    )

    reference = peft_reference(base, [(first, 0.7), (second, -0.4)])
    assert_matches_reference(output, base, reference, torch.bfloat16)
    assert_same_logits(output, reference, torch.bfloat16)


def test_weighted_dora_and_replacement_follow_the_float64_formula(
    models: Callable[[str], Base], tmp_path: Path
) -> None:
    """PEFT has no weight for DoRA or modules_to_save; the spec's W + w * (W' - W) in float64."""
    from safetensors.torch import load_file

    base = models("llama-fp32")
    adapter = save_adapter(
        base,
        tmp_path / "a",
        seed=3,
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    weight = 0.3
    output = tmp_path / "out"
    shardmerge.merge(
        base=str(base.path), adapters=[{"path": str(adapter), "weight": weight}], output=str(output), dtype="float32"
    )

    ours = read_output(output)
    base_tensors = load_file(base.path / "model.safetensors")
    saved = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
    }
    for layer in range(2):
        path = f"model.layers.{layer}.self_attn.q_proj"
        w0 = base_tensors[f"{path}.weight"].double()
        updated = w0 + 2.0 * saved[f"{path}.lora_B.weight"] @ saved[f"{path}.lora_A.weight"]
        dora = updated * (saved[f"{path}.lora_magnitude_vector"] / updated.norm(dim=1))[:, None]
        expected = w0 + weight * (dora - w0)
        torch.testing.assert_close(ours[f"{path}.weight"].double(), expected, rtol=1e-6, atol=1e-7)
    head = base_tensors["lm_head.weight"].double()
    expected_head = head + weight * (saved["lm_head.weight"] - head)
    torch.testing.assert_close(ours["lm_head.weight"].double(), expected_head, rtol=1e-6, atol=1e-7)


def test_untouched_tensors_are_copied_byte_for_byte(models: Callable[[str], Base], tmp_path: Path) -> None:
    base = models("llama-bf16")
    adapter = save_adapter(base, tmp_path / "a", seed=4, r=4, lora_alpha=8, target_modules=["q_proj"])
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))

    ours = read_output(output)
    original = read_output(base.path)
    untouched = [name for name in original if ".q_proj." not in name]
    assert untouched
    for name in untouched:
        assert torch.equal(ours[name].view(torch.int16), original[name].view(torch.int16)), name
    assert sorted(p.name for p in output.glob("*.safetensors")) == sorted(
        p.name for p in base.path.glob("*.safetensors")
    )
    for extra in ("config.json", "generation_config.json"):
        assert (output / extra).read_bytes() == (base.path / extra).read_bytes()


def test_saved_base_layer_replaces_the_base_tensor(models: Callable[[str], Base], tmp_path: Path) -> None:
    """PEFT saves targeted embeddings whole (``.base_layer.weight``); a changed one must win."""
    from safetensors.torch import load_file, save_file

    base = models("llama-bf16")
    adapter = save_adapter(base, tmp_path / "a", seed=6, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, weights, metadata={"format": "pt"})
    output = tmp_path / "out"

    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))

    reference = peft_reference(base, [(adapter, 1.0)])
    assert not torch.equal(reference.state_dict()["model.embed_tokens.weight"], load_fp32_embedding(base))
    assert_matches_reference(output, base, reference, torch.bfloat16)


def load_fp32_embedding(base: Base) -> torch.Tensor:
    return read_output(base.path)["model.embed_tokens.weight"].float()


BLOCK_CASES: dict[str, tuple[str, dict[str, object]]] = {
    "lora-dora-linear": ("llama-bf16", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "down_proj"]}),
    "conv1d-bias": ("gpt2-bf16", {"r": 4, "target_modules": ["c_attn", "c_fc"], "lora_bias": True}),
    "embedding-replace": ("llama-bf16", {"r": 4, "target_modules": ["embed_tokens"], "modules_to_save": ["lm_head"]}),
    "trainable-tokens": ("llama-bf16", {"r": 4, "target_modules": ["v_proj"], "trainable_token_indices": [1, 40, 77]}),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_row_blocks_give_the_same_bytes_as_whole_tensors(
    case: str, models: Callable[[str], Base], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors are merged in blocks of rows. Blocks of 3 rows still match PEFT; bit for
    bit they may differ from whole tensors, where the BLAS takes another kernel for tiny
    products, so the block size is fixed (planner.MERGE_BLOCK_ELEMENTS) and resumes stay identical."""
    from shardmerge.planning import planner

    base_name, lora = BLOCK_CASES[case]
    base = models(base_name)
    adapter = save_adapter(base, tmp_path / "adapter", seed=41, **lora)
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "whole"))
    monkeypatch.setattr(planner, "MERGE_BLOCK_ELEMENTS", 3 * 32)
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "blocks"))

    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_reference(tmp_path / "whole", base, reference, torch.bfloat16)
    assert_matches_reference(tmp_path / "blocks", base, reference, torch.bfloat16)
