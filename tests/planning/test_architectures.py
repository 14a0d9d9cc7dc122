"""Real-world adapters and architectures, each against PEFT's own merge (or, where PEFT's
merge is itself wrong, against the adapter's unmerged forward pass)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, TrainableTokensConfig
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    GptOssConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3MoeConfig,
)

import shardmerge
from conftest import (
    Base,
    assert_matches_reference,
    assert_matches_saved,
    assert_same_logits,
    gpt2_config,
    llama_config,
    peft_reference,
    read_output,
    save_adapter,
    save_base,
    saved_reference,
    unmerged_logits,
)
from shardmerge.planning import planner
from shardmerge.planning.layouts import INTERLEAVED_GATE_UP, TRANSPOSED_EXPERTS

IDS = torch.arange(24).reshape(2, 12) % 90


def merge(base: Base, adapters: list[Path], output: Path, dtype: str = "float32") -> shardmerge.Plan:
    plan = shardmerge.plan(base=str(base.path), adapters=[str(a) for a in adapters], output=str(output), dtype=dtype)
    shardmerge.merge(base=str(base.path), adapters=[str(a) for a in adapters], output=str(output), dtype=dtype)
    return plan


# --- mixture of experts -------------------------------------------------------------------


def mixtral_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip


def olmoe_config() -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def fused_expert_adapter(base: Base, folder: Path) -> Path:
    """A transformers v5 adapter: LoRA on the fused expert parameters and on attention."""
    return save_adapter(
        base, folder, seed=21, r=4, lora_alpha=8, target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip


def per_expert_adapter(fused: Path, folder: Path, experts: int, names: tuple[str, str, str], block: str) -> Path:
    """The same adapter as a pre-v5 one, on one Linear per expert (LoRA's algebra written out
    independently here: expert e's update is B[:, k*E + e] @ A[e*r:(e+1)*r])."""
    config = json.loads((fused / "adapter_config.json").read_text())
    tensors = load_file(fused / "adapter_model.safetensors")
    r = config["r"]
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if ".experts." not in key:
            out[key] = value
    layers = {key.split(".layers.")[1].split(".")[0] for key in tensors if ".experts." in key}
    for layer in layers:
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts"
        pieces = {
            "gate_up": (tensors[f"{prefix}.base_layer.lora_A.weight"], tensors[f"{prefix}.base_layer.lora_B.weight"]),
            "down": (tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]),
        }
        target = f"base_model.model.model.layers.{layer}.{block}.experts"
        for expert in range(experts):
            for part, (lora_a, lora_b) in pieces.items():
                a_e = lora_a[expert * r : (expert + 1) * r]
                b_e = lora_b[:, [k * experts + expert for k in range(r)]]
                half = b_e.shape[0] // 2
                splits = {names[0]: b_e[:half], names[1]: b_e[half:]} if part == "gate_up" else {names[2]: b_e}
                for name, b_part in splits.items():
                    out[f"{target}.{expert}.{name}.lora_A.weight"] = a_e.clone()
                    out[f"{target}.{expert}.{name}.lora_B.weight"] = b_part.clone()
    folder.mkdir()
    save_file(out, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config.update(target_parameters=None, target_modules=["q_proj", *names])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("family", "names", "block"),
    [("mixtral", ("w1", "w3", "w2"), "block_sparse_moe"), ("olmoe", ("gate_proj", "up_proj", "down_proj"), "mlp")],
)
def test_moe_fused_and_per_expert_adapters(
    tmp_path: Path, family: str, names: tuple[str, str, str], block: str
) -> None:
    config = mixtral_config() if family == "mixtral" else olmoe_config()
    base = save_base(config, tmp_path / "base", torch.float32, seed=3, shard_kb=64)
    assert f"model.layers.0.{block}.experts.3.{names[0]}.weight" in read_output(base.path), "one tensor per expert"
    fused = fused_expert_adapter(base, tmp_path / "fused")
    per_expert = per_expert_adapter(fused, tmp_path / "per-expert", 4, names, block)
    reference = peft_reference(base, [(fused, 1.0)])
    expected = saved_reference(reference, tmp_path / "reference")

    for adapter in (fused, per_expert):
        output = tmp_path / f"out-{adapter.name}"
        plan = merge(base, [adapter], output)
        merged = {t.name for shard in plan.shards for t in shard.tensors if t.ops}
        expert_tensors = {name for name in expected if ".experts." in name}
        assert expert_tensors and expert_tensors <= merged, "every expert tensor is merged"
        assert_matches_saved(output, expected, torch.float32)
        assert_same_logits(output, peft_reference(base, [(fused, 1.0)]), torch.float32)
    assert read_output(tmp_path / "out-fused").keys() == read_output(tmp_path / "out-per-expert").keys()


def test_the_everyday_qwen3_moe_recipe_matches_peft(tmp_path: Path) -> None:
    """``target_modules`` = q, k, v, o, gate, up, down on Qwen3-MoE: PEFT 0.21 moves the MLP
    part onto the fused experts as bare ``target_parameters`` (``gate_up_proj``,
    ``down_proj``), with rank and alpha patterns (``.*\\.gate_up_proj``: twice each) that
    decide the scale; the checkpoint stores one tensor per expert."""
    config = Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, mlp_only_layers=[1],
    )  # fmt: skip
    base = save_base(config, tmp_path / "base", torch.float32, seed=3, shard_kb=64)
    recipe = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *_MLP])
    adapter = save_adapter(base, tmp_path / "adapter", seed=5, config=recipe)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["down_proj", "gate_up_proj"], "bare names"
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    plan = merge(base, [adapter], tmp_path / "out")
    scales = {op.scale for shard in plan.shards for t in shard.tensors for op in t.ops if ".experts." in t.name}
    assert scales == {2.0}, "alpha / r of the pattern (32 / 16) and of the config (16 / 8)"
    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_saved(tmp_path / "out", saved_reference(reference, tmp_path / "reference"), torch.float32)
    assert_same_logits(tmp_path / "out", reference, torch.float32)


_MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("blocks", [False, True])
def test_gpt_oss_experts_with_hidden_equal_to_intermediate_match_peft(
    tmp_path: Path, blocks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpt-oss stores its fused experts [experts, in, out] (interleaved gate and up columns,
    with biases), and its hidden and intermediate sizes are equal, as in the real 2880 = 2880:
    down_proj is square, so only the architecture can say which way PEFT's delta lies. With
    ``blocks``, each expert's matrix is merged 5 or 10 rows at a time (as a 128-expert tensor of
    8.5 GB in float32 is), never the whole fused tensor at once."""
    if blocks:
        monkeypatch.setattr(planner, "MERGE_BLOCK_ELEMENTS", 5 * 64)
    config = GptOssConfig(
        vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    base = save_base(config, tmp_path / "base", torch.float32, seed=5, shard_kb=64)
    stored = read_output(base.path)
    assert stored["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 32)
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in stored
    adapter = fused_expert_adapter(base, tmp_path / "adapter")
    output = tmp_path / "out"
    plan = merge(base, [adapter], output)
    layouts = {
        t.name: t.ops[0].layout for shard in plan.shards for t in shard.tensors if ".experts." in t.name and t.ops
    }
    assert set(layouts.values()) == {"experts-in-out"} and len(layouts) == 4
    experts = [t for shard in plan.shards for t in shard.tensors if t.name in layouts]
    expected = {t.name: 5 * 64 // t.shape[2] if blocks else t.shape[1] for t in experts}  # 5 or 10 rows
    assert all(t.expert_rows for t in experts) and {t.name: t.block_rows for t in experts} == expected
    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_saved(output, saved_reference(reference, tmp_path / "reference"), torch.float32)
    assert_same_logits(output, peft_reference(base, [(adapter, 1.0)]), torch.float32)


def test_a_fused_adapter_is_not_split_into_gpt_oss_experts_stored_one_by_one(tmp_path: Path) -> None:
    """gpt-oss interleaves gate and up columns: were its experts stored one by one, which rows
    of the fused adapter are gate's could not be told from a [gate | up] split. Refused."""
    config = GptOssConfig(
        vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64,
        layer_types=["full_attention"],
    )  # fmt: skip
    base = save_base(config, tmp_path / "base", torch.float32, seed=5, shard_kb=None)
    adapter = save_adapter(base, tmp_path / "adapter", seed=21, r=2, target_parameters=["mlp.experts.gate_up_proj"])
    tensors = load_file(base.path / "model.safetensors")
    prefix = "model.layers.0.mlp.experts"
    fused = tensors.pop(f"{prefix}.gate_up_proj")
    for expert in range(2):
        weight = fused[expert].T  # [out, in]
        tensors[f"{prefix}.{expert}.gate_proj.weight"] = weight[::2].contiguous()
        tensors[f"{prefix}.{expert}.up_proj.weight"] = weight[1::2].contiguous()
    save_file(tensors, base.path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(shardmerge.PlanError) as raised:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    problems = [str(problem) for problem in raised.value.problems]
    assert len(problems) == 1 and "interleaves gate and up columns in its fused gate_up_proj" in problems[0]


def test_the_table_of_interleaved_gate_up_is_transformers_own() -> None:
    """The model types whose experts split a fused gate_up as [..., ::2] and [..., 1::2]."""
    assert _model_types_whose_modelling_says("gate_up[..., ::2]") == INTERLEAVED_GATE_UP


def test_the_table_of_transposed_experts_is_transformers_own() -> None:
    """The model types whose experts transformers declares ``is_transposed`` (the flag PEFT
    reads) are those of TRANSPOSED_EXPERTS."""
    assert _model_types_whose_modelling_says("is_transposed=True") == TRANSPOSED_EXPERTS


def _model_types_whose_modelling_says(text: str) -> set[str]:
    """The model types of every transformers model whose modelling code contains ``text``."""
    root = Path(transformers.__file__).parent / "models"
    folders = {path.parent.name for path in root.glob("*/modeling_*.py") if text in path.read_text()}
    model_types = set()
    for folder in folders:
        module = importlib.import_module(f"transformers.models.{folder}.configuration_{folder}")
        model_types |= {
            value.model_type
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, PretrainedConfig) and value.model_type
        }
    return model_types


# --- vision-language models ---------------------------------------------------------------


def llava_base(folder: Path) -> Base:
    text = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14,
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(4)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=95))
    model.save_pretrained(folder, max_shard_size="40KB")
    return Base(folder, torch.float32)


def qwen2vl_base(folder: Path) -> Base:
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}, "bos_token_id": 1, "eos_token_id": 2,
        },
        vision_config={
            "depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2, "in_chans": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        image_token_id=95, video_token_id=94, vision_start_token_id=93,
    )  # fmt: skip
    torch.manual_seed(5)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder, max_shard_size="40KB")
    return Base(folder, torch.float32)


@pytest.mark.parametrize(
    ("builder", "model_class", "targets", "stored"),
    [
        (
            llava_base,
            LlavaForConditionalGeneration,
            r".*(language_model.*\.(q_proj|v_proj)|vision_tower.*\.(k_proj|fc1)|multi_modal_projector\.linear_1)",
            ("language_model.model.layers.0.self_attn.q_proj.weight", "vision_tower."),
        ),
        (
            qwen2vl_base,
            Qwen2VLForConditionalGeneration,
            r".*(language_model.*\.(q_proj|down_proj)|visual.*\.(qkv|fc1))",
            ("model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"),
        ),
    ],
)
def test_vision_language_adapters_reach_both_towers(
    tmp_path: Path, builder: object, model_class: type, targets: str, stored: tuple[str, str]
) -> None:
    base = builder(tmp_path / "base")  # type: ignore[operator]
    on_disk = set(read_output(base.path))
    assert stored[0] in on_disk and any(name.startswith(stored[1]) for name in on_disk), "the pre-v5 layout on disk"
    adapter = save_adapter(base, tmp_path / "adapter", seed=8, model_class=model_class, r=4, target_modules=targets)
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    assert any(".language_model." in key for key in keys) and any(".vision" in key or ".visual." in key for key in keys)

    plan = merge(base, [adapter], tmp_path / "out")

    merged = {t.name for shard in plan.shards for t in shard.tensors if t.ops}
    assert any(name.startswith(stored[1]) for name in merged), "the vision tower is merged"
    assert stored[0] in merged, "the language tower is merged"
    assert {op.rule for shard in plan.shards for t in shard.tensors for op in t.ops} - {"exact"}
    reference = peft_reference(base, [(adapter, 1.0)], model_class)
    assert_matches_saved(tmp_path / "out", saved_reference(reference, tmp_path / "reference"), torch.float32)
    ours = model_class.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, reference.eval()(input_ids=IDS).logits)


# --- tied embeddings ----------------------------------------------------------------------


@pytest.fixture
def tied_llama(tmp_path: Path) -> Base:
    config = llama_config()
    config.tie_word_embeddings = True
    base = save_base(config, tmp_path / "tied", torch.float32, seed=9, shard_kb=None)
    assert "lm_head.weight" not in load_file(base.path / "model.safetensors")
    return base


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["lm_head", "q_proj"]},
        {"target_modules": ["embed_tokens", "v_proj"]},
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-on-lm_head", "lora-on-embed_tokens", "modules_to_save-lm_head"],
)
def test_adapters_on_tied_embeddings_untie_them(tied_llama: Base, tmp_path: Path, lora: dict) -> None:
    adapter = save_adapter(tied_llama, tmp_path / "adapter", seed=10, r=4, lora_alpha=8, **lora)
    output = tmp_path / "out"
    plan = merge(tied_llama, [adapter], output)

    assert plan.notes and "untied" in plan.notes[0]
    ours = read_output(output)
    base = load_file(tied_llama.path / "model.safetensors")
    assert "lm_head.weight" in ours
    assert not torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    adapted = "model.embed_tokens.weight" if "embed_tokens" in lora["target_modules"] else "lm_head.weight"
    other = "lm_head.weight" if adapted == "model.embed_tokens.weight" else "model.embed_tokens.weight"
    assert torch.equal(ours[other], base["model.embed_tokens.weight"]), "the other use keeps the base tensor"
    assert json.loads((output / "config.json").read_text())["tie_word_embeddings"] is False
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == "model.safetensors"

    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, unmerged_logits(tied_llama, adapter, IDS), rtol=1e-4, atol=1e-4)


def test_trainable_tokens_on_tied_embeddings_keep_them_tied(tied_llama: Base, tmp_path: Path) -> None:
    adapter = save_adapter(
        tied_llama, tmp_path / "adapter", seed=11, r=4, target_modules=["q_proj"], trainable_token_indices=[3, 17, 40]
    )
    output = tmp_path / "out"
    plan = merge(tied_llama, [adapter], output)

    assert not plan.notes
    ours = read_output(output)
    assert "lm_head.weight" not in ours
    reference = peft_reference(tied_llama, [(adapter, 1.0)])
    assert_matches_reference(output, tied_llama, reference, torch.float32)
    assert (output / "config.json").read_bytes() == (tied_llama.path / "config.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged_logits(tied_llama, adapter, IDS), rtol=1e-4, atol=1e-4)


def test_trainable_tokens_adapter_type(models: object, tmp_path: Path) -> None:
    base = models("llama-bf16")  # type: ignore[operator]
    adapter = save_adapter(
        base,
        tmp_path / "adapter",
        seed=12,
        config=TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[0, 5, 9]),
    )
    merge(base, [adapter], tmp_path / "out", dtype="bfloat16")
    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_reference(tmp_path / "out", base, reference, torch.bfloat16)
    ours = read_output(tmp_path / "out")["model.embed_tokens.weight"]
    original = read_output(base.path)["model.embed_tokens.weight"]
    changed = (ours != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 5, 9]
    assert_same_logits(tmp_path / "out", reference, torch.bfloat16)


# --- LoHa, LoKr, IA3 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_name", "config"),
    [
        ("llama-bf16", LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})),
        ("llama-bf16", LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "up_proj"], decompose_both=True)),
        ("llama-bf16", LoKrConfig(r=16, alpha=4, target_modules=["o_proj", "gate_proj"])),
        ("llama-bf16", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
        (
            "gpt2-bf16",
            IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
        ),
    ],
    ids=["loha", "lokr-decomposed", "lokr-full", "ia3-llama", "ia3-gpt2-conv1d"],
)
def test_other_adapter_types_match_peft(models: object, tmp_path: Path, base_name: str, config: object) -> None:
    base = models(base_name)  # type: ignore[operator]
    adapter = save_adapter(base, tmp_path / "adapter", seed=13, config=config)  # type: ignore[arg-type]
    plan = merge(base, [adapter], tmp_path / "out", dtype="bfloat16")
    kinds = {op.kind for shard in plan.shards for t in shard.tensors for op in t.ops}
    assert kinds == {type(config).__name__.removesuffix("Config").lower()}
    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_reference(tmp_path / "out", base, reference, torch.bfloat16)
    assert_same_logits(tmp_path / "out", reference, torch.bfloat16)


# --- pickle-format files ------------------------------------------------------------------


def test_bin_base_and_adapter_merge_like_safetensors(models: object, tmp_path: Path) -> None:
    base = models("llama-bf16")  # type: ignore[operator]
    adapter = save_adapter(
        base, tmp_path / "adapter", seed=14, r=4, target_modules=["q_proj", "down_proj", "embed_tokens"]
    )
    bin_base = tmp_path / "bin-base"
    bin_base.mkdir()
    index = json.loads((base.path / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
        torch.save(load_file(base.path / shard), bin_base / name)
        weight_map.update(dict.fromkeys(load_file(base.path / shard), name))
    (bin_base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in ("config.json", "generation_config.json"):
        (bin_base / extra).write_bytes((base.path / extra).read_bytes())
    bin_adapter = tmp_path / "bin-adapter"
    bin_adapter.mkdir()
    torch.save(load_file(adapter / "adapter_model.safetensors"), bin_adapter / "adapter_model.bin")
    (bin_adapter / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())

    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "from-safetensors"))
    shardmerge.merge(base=str(bin_base), adapters=[str(bin_adapter)], output=str(tmp_path / "from-bin"))

    expected = {p.name: p.read_bytes() for p in (tmp_path / "from-safetensors").glob("*.safetensors")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "from-bin").glob("*.safetensors")} == expected
    assert not list((tmp_path / "from-bin").glob("*.bin"))
    reference = peft_reference(base, [(adapter, 1.0)])
    assert_matches_reference(tmp_path / "from-bin", base, reference, torch.bfloat16)
    assert_same_logits(tmp_path / "from-bin", reference, torch.bfloat16)


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora' changed the base weights"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda' changed the base weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq' changed the base weights"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga' changed the base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changed the base weights"),
        ({"layer_replication": [[0, 1], [0, 2]]}, "layer_replication is set"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens is set: activated LoRA"),
        ({"use_qalora": True}, "use_qalora is set"),
    ],
)
def test_refusals_name_the_cause(models: object, tmp_path: Path, changes: dict, expected: str) -> None:
    base = models("llama-bf16")  # type: ignore[operator]
    adapter = save_adapter(base, tmp_path / "adapter", seed=16, r=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(shardmerge.PlanError) as caught:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    (problem,) = caught.value.problems
    assert expected in problem.one_line()
    assert "\n" not in problem.one_line()


def test_gpt2_tied_head_with_lora_is_untied(models: object, tmp_path: Path) -> None:
    base = models("gpt2-bf16")  # type: ignore[operator]
    assert gpt2_config().tie_word_embeddings
    adapter = save_adapter(base, tmp_path / "adapter", seed=17, r=4, target_modules=["lm_head", "c_attn"])
    plan = merge(base, [adapter], tmp_path / "out")
    assert plan.notes
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, unmerged_logits(base, adapter, IDS), rtol=1e-3, atol=1e-3)
