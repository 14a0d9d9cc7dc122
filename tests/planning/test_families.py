"""The model families people fine-tune now, each a tiny real transformers model saved as
``save_pretrained`` saves it (or in the layout of its published checkpoints), with a PEFT
adapter on every kind of module it has: the merge matches PEFT's float32 merge, and the
output loads with the family's own class and gives the reference's logits."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

import shardmerge
from conftest import Base, assert_matches_saved, peft_reference, read_output, read_output_like_base, save_adapter

SMALL = {
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Family:
    """A tiny model: its class and config, the adapter's LoRA config, the layout its published
    checkpoints use if transformers saves another (a renaming of checkpoint names), and parts
    of tensor names the adapter must reach (vision tower, experts, ...)."""

    model_class: type[PreTrainedModel]
    config: Callable[[], object]
    lora: Callable[[], LoraConfig]
    reaches: tuple[str, ...]
    published: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    extra: dict[str, tuple[int, ...]] | None = None  # tensors the class does not load


def _lora(modules: list[str] | str, parameters: list[str] | None = None) -> Callable[[], LoraConfig]:
    return lambda: LoraConfig(r=4, lora_alpha=8, target_modules=modules, target_parameters=parameters)


def _gemma3() -> object:
    text = tf.Gemma3TextConfig(**SMALL, head_dim=8)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    return tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=95, boi_token_index=93,
        eoi_token_index=94,
    )  # fmt: skip


def _renamed(rename: Callable[[str], str]) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda tensors: {rename(name): value for name, value in tensors.items()}


def _gemma3_published(name: str) -> str:
    """Gemma 3's releases store the vision tower as vision_tower.vision_model.*, where
    transformers v5 saves vision_tower.*."""
    return "vision_tower.vision_model." + name[len("vision_tower.") :] if name.startswith("vision_tower.") else name


def _qwen25vl() -> object:
    return tf.Qwen2_5_VLConfig(
        text_config=dict(**SMALL, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, window_size=28, fullatt_block_indexes=[0],
        ),
    )  # fmt: skip


def _qwen3vl() -> object:
    return tf.Qwen3VLConfig(
        text_config=dict(
            **SMALL,
            head_dim=8,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
    )  # fmt: skip


def _qwen_vl_published(name: str) -> str:
    """Qwen-VL checkpoints from before transformers v5: model.* and visual.*."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _qwen3_moe() -> object:
    return tf.Qwen3MoeConfig(
        **{**SMALL, "hidden_size": 64}, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[1],
    )  # fmt: skip


def _fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tensor per expert (as transformers v5 saves Qwen3-MoE) fused as the v5 model holds
    them: gate_up_proj [experts, 2 * intermediate, hidden] ([gate | up]), down_proj
    [experts, hidden, intermediate]."""
    out = {name: value for name, value in tensors.items() if not re.search(r"\.experts\.\d+\.", name)}
    layers = sorted({name.split(".experts.")[0] for name in tensors if re.search(r"\.experts\.\d+\.", name)})
    for layer in layers:
        count = len(
            {name for name in tensors if name.startswith(f"{layer}.experts.") and name.endswith("down_proj.weight")}
        )
        part = [
            [tensors[f"{layer}.experts.{e}.{kind}.weight"] for e in range(count)] for kind in ("gate_proj", "up_proj")
        ]
        out[f"{layer}.experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(*part, strict=True)])
        out[f"{layer}.experts.down_proj"] = torch.stack(
            [tensors[f"{layer}.experts.{e}.down_proj.weight"] for e in range(count)]
        )
    return out


def _llama4() -> object:
    text = tf.Llama4TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        max_position_embeddings=64, interleave_moe_layer_step=1, no_rope_layers=[1, 1],
    )  # fmt: skip
    vision = tf.Llama4VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28,
        patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
    )  # fmt: skip
    return tf.Llama4Config(text_config=text, vision_config=vision)


def _mistral3() -> object:
    vision = tf.PixtralVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14,
        head_dim=8,
    )  # fmt: skip
    return tf.Mistral3Config(text_config=tf.MistralConfig(**SMALL, head_dim=8), vision_config=vision)


def _deepseek_v3() -> object:
    return tf.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, max_position_embeddings=64, n_group=1, topk_group=1,
    )  # fmt: skip


def _nemotron_h() -> object:
    return tf.NemotronHConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, hybrid_override_pattern="M*-",
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
        ssm_state_size=8, n_groups=1, max_position_embeddings=64,
    )  # fmt: skip


def _deepseek_v4() -> object:
    return tf.DeepseekV4Config(
        vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16, q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, o_groups=2,
        o_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4, max_position_embeddings=64,
        num_nextn_predict_layers=0, sliding_window=8, hc_mult=2,
    )  # fmt: skip


def _granite_hybrid() -> object:
    return tf.GraniteMoeHybridConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
        layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        max_position_embeddings=64,
    )  # fmt: skip


def _qwen3vl_moe(intermediate: int = 24) -> object:
    text = dict(
        **SMALL, head_dim=8, moe_intermediate_size=intermediate, num_experts=4, num_experts_per_tok=2,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=14,
        spatial_merge_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0],
    )  # fmt: skip
    return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision)


def _experts_in_out(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-VL-MoE's published checkpoints store the fused experts [experts, in, out]."""
    return {
        name: value.transpose(1, 2).contiguous()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        else value
        for name, value in tensors.items()
    }


def _glm45v() -> object:
    text = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=64, n_group=1, topk_group=1,
        rope_parameters={
            "rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4, "partial_rotary_factor": 1.0
        },
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=14,
        spatial_merge_size=2, image_size=28,
    )  # fmt: skip
    return tf.Glm4vMoeConfig(text_config=text, vision_config=vision)


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VISION = ["fc1", "fc2", "out_proj", "qkv", "proj", "linear_fc1", "linear_fc2", "attn.proj"]
FAMILIES: dict[str, Family] = {
    "gemma3-text": Family(
        tf.Gemma3ForCausalLM, lambda: tf.Gemma3TextConfig(**SMALL, head_dim=8), _lora(ATTENTION + MLP), ("layers",)
    ),
    "gemma3": Family(
        tf.Gemma3ForConditionalGeneration, _gemma3, _lora("all-linear"), ("vision_tower", "language_model")
    ),
    "gemma3-published": Family(
        tf.Gemma3ForConditionalGeneration,
        _gemma3,
        _lora("all-linear"),
        ("vision_tower.vision_model", "language_model.model"),
        published=_renamed(_gemma3_published),
    ),
    "qwen2.5-vl": Family(tf.Qwen2_5_VLForConditionalGeneration, _qwen25vl, _lora("all-linear"), ("visual", "layers")),
    "qwen2.5-vl-v4-layout": Family(
        tf.Qwen2_5_VLForConditionalGeneration,
        _qwen25vl,
        _lora("all-linear"),
        ("visual.", "model.layers"),
        published=_renamed(_qwen_vl_published),
    ),
    "qwen3-vl": Family(tf.Qwen3VLForConditionalGeneration, _qwen3vl, _lora("all-linear"), ("visual", "layers")),
    "qwen3-vl-conv3d": Family(
        tf.Qwen3VLForConditionalGeneration,
        _qwen3vl,
        _lora(["patch_embed.proj", "qkv", "q_proj"]),
        ("patch_embed.proj", "visual.blocks.0.attn.qkv", "q_proj"),
    ),
    "qwen3": Family(
        tf.Qwen3ForCausalLM, lambda: tf.Qwen3Config(**SMALL, head_dim=8), _lora(ATTENTION + MLP), ("layers",)
    ),
    "qwen3-moe": Family(tf.Qwen3MoeForCausalLM, _qwen3_moe, _lora(ATTENTION + MLP), (".experts.", "self_attn")),
    "qwen3-moe-fused": Family(
        tf.Qwen3MoeForCausalLM,
        _qwen3_moe,
        _lora(ATTENTION + MLP),
        (".experts.gate_up_proj", ".experts.down_proj"),
        published=_fused_experts,
    ),
    "llama4": Family(
        tf.Llama4ForConditionalGeneration,
        _llama4,
        _lora("all-linear", ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]),
        (".experts.", "shared_expert", "vision_model"),
    ),
    "mistral3": Family(
        tf.Mistral3ForConditionalGeneration, _mistral3, _lora("all-linear"), ("vision_tower", "language_model")
    ),
    "deepseek-v3": Family(
        tf.DeepseekV3ForCausalLM,
        _deepseek_v3,
        # PEFT 0.21 moves every gate/up/down_proj target onto the fused experts (its MoE
        # conversion): the shared experts and the dense layer's MLP cannot be targeted with them.
        _lora(["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *MLP]),
        ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", ".experts."),
        extra={"model.layers.2.eh_proj.weight": (32, 64), "model.layers.2.enorm.weight": (32,)},
    ),
    "deepseek-v4": Family(
        tf.DeepseekV4ForCausalLM,
        _deepseek_v4,
        _lora(["q_a_proj", "q_b_proj", "kv_proj", "o_b_proj"], EXPERTS),
        ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.experts.3.w1", "ffn.experts.3.w3", "ffn.experts.0.w2"),
    ),
    "granite-4.0-hybrid": Family(
        tf.GraniteMoeHybridForCausalLM,
        _granite_hybrid,
        _lora(
            ["in_proj", "out_proj", *ATTENTION, "input_linear", "output_linear"],
            ["experts.gate_up_proj", "experts.down_proj"],
        ),
        ("block_sparse_moe.input_linear", "block_sparse_moe.output_linear", "shared_mlp.input_linear", "mamba.in_proj"),
    ),
    # PEFT's all-linear wraps the vision tower's Conv3d patch embedding too.
    "glm-4.5v": Family(
        tf.Glm4vMoeForConditionalGeneration,
        _glm45v,
        _lora("all-linear"),
        ("visual.patch_embed.proj", "visual.blocks.0", "language_model.layers.1.mlp.experts"),
    ),
    "qwen3-vl-moe": Family(
        tf.Qwen3VLMoeForConditionalGeneration,
        _qwen3vl_moe,
        _lora(["q_proj", "v_proj", "qkv"], EXPERTS),
        ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "visual"),
    ),
    "qwen3-vl-moe-published": Family(
        tf.Qwen3VLMoeForConditionalGeneration,
        _qwen3vl_moe,
        _lora(["q_proj", "v_proj", "qkv"], EXPERTS),
        ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "visual"),
        published=_experts_in_out,
    ),
    "phi3": Family(
        tf.Phi3ForCausalLM, lambda: tf.Phi3Config(**SMALL, pad_token_id=0), _lora("all-linear"), ("qkv_proj",)
    ),
    "nemotron-h": Family(
        tf.NemotronHForCausalLM,
        _nemotron_h,
        _lora(["in_proj", *ATTENTION, "up_proj", "down_proj"]),
        ("backbone.layers",),
    ),
}


def _republish(folder: Path, published: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Store the checkpoint in ``folder`` in another layout (the published one), shard by
    shard."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("model*.safetensors"))
    weight_map = {}
    for file in files:
        tensors = published(load_file(file))
        save_file(tensors, file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    if index.exists():
        body = json.loads(index.read_text())
        body["weight_map"] = weight_map
        index.write_text(json.dumps(body))


def _add_tensors(folder: Path, extra: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors the model class does not load (a multi-token-prediction layer), in a shard of
    their own."""
    generator = torch.Generator().manual_seed(9)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in extra.items()}
    save_file(tensors, folder / "model-extra.safetensors", metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        names = load_file(folder / "model.safetensors").keys()
        body = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    else:
        body = json.loads(index.read_text())
    body["weight_map"].update(dict.fromkeys(tensors, "model-extra.safetensors"))
    index.write_text(json.dumps(body))
    return tensors


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_peft_and_loads_with_its_own_class(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    torch.manual_seed(0)
    family.model_class(family.config()).save_pretrained(tmp_path / "saved")
    base = Base(tmp_path / "saved", torch.float32)
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, config=family.lora(), model_class=family.model_class)
    reference = peft_reference(base, [(adapter, 1.0)], model_class=family.model_class)
    reference.save_pretrained(tmp_path / "reference")
    expected = read_output_like_base(tmp_path / "reference")
    if family.published:
        _republish(base.path, family.published)
        expected = family.published(expected)
    if family.extra:
        expected |= _add_tensors(base.path, family.extra)
    output = tmp_path / "out"
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)], dtype="float32")
    merged = {t.name for shard in plan.shards for t in shard.tensors if t.ops}
    for part in family.reaches:
        assert any(part in tensor for tensor in merged), f"the adapter reaches {part}"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    assert_matches_saved(output, expected, torch.float32)
    ours = family.model_class.from_pretrained(output, dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12) % 90
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, reference.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    if family.extra:
        assert re.search(r"model\.layers\.2\.", " ".join(read_output(output)))
