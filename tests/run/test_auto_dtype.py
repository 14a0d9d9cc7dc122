"""The default dtype keeps every tensor at least at the base's precision: a 16-bit base's
float32 tensors (GLM's router bias, which transformers keeps in float32) stay float32, and
only an explicit ``--dtype`` converts every tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig
from safetensors import safe_open

import shardmerge
from conftest import (
    Base,
    assert_within_tolerance,
    peft_reference,
    read_output_like_base,
    save_adapter,
    saved_reference,
)

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def _glm_moe() -> tf.Glm4MoeConfig:
    return tf.Glm4MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=64, n_group=1, topk_group=1,
    )  # fmt: skip


def _dtypes(folder: Path) -> dict[str, str]:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Base, Path]:
    """A GLM-4.5 MoE saved as transformers saves it in 16 bits: bfloat16, with the router's
    correction bias in float32 (``_keep_in_fp32_modules_strict``)."""
    folder = tmp_path_factory.mktemp("glm")
    torch.manual_seed(0)
    model = tf.Glm4MoeForCausalLM(_glm_moe())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.randn(param.shape) / 3)
    model.save_pretrained(folder / "fp32")
    tf.Glm4MoeForCausalLM.from_pretrained(folder / "fp32", dtype=torch.bfloat16).save_pretrained(folder / "base")
    base = Base(folder / "base", torch.bfloat16)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return base, save_adapter(base, folder / "adapter", seed=1, config=lora)


def test_the_default_keeps_float32_tensors_of_a_16_bit_base(glm: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = glm
    dtypes = _dtypes(base.path)
    assert dtypes[BIAS] == "F32" and dtypes["model.layers.0.self_attn.q_proj.weight"] == "BF16"
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    assert plan.dtype == "base"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "out"))
    assert _dtypes(tmp_path / "out") == dtypes
    ours, before = read_output_like_base(tmp_path / "out"), read_output_like_base(base.path)
    assert torch.equal(ours[BIAS], before[BIAS])
    state = saved_reference(peft_reference(base, [(adapter, 1.0)]), tmp_path / "reference")
    merged = [name for name in ours if not torch.equal(ours[name], before[name])]
    assert any(".experts." in name for name in merged) and any("q_proj" in name for name in merged)
    for name in merged:
        assert_within_tolerance(name, ours[name], state[name])
    loaded = tf.Glm4MoeForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_an_explicit_dtype_converts_every_tensor(glm: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = glm
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "out"), dtype="bfloat16")
    assert set(_dtypes(tmp_path / "out").values()) == {"BF16"}
