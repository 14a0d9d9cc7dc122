"""transformers' checkpoint conversion rules, read as data: the snapshot is the installed
transformers' own, the base's names are renamed exactly as transformers renames them on load,
and an adapter on a tensor that a converter builds in a way shardmerge does not invert is
refused in one line."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_families import EXPERTS, _deepseek_v4, _experts_in_out, _granite_hybrid, _qwen3vl_moe, _republish
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key

import shardmerge
from conftest import Base, peft_reference, read_output, save_adapter
from shardmerge.planning.conversions import checkpoint_names

ROOT = Path(__file__).resolve().parents[2]


def _script() -> object:
    spec = importlib.util.spec_from_file_location("transformers_tables", ROOT / "scripts" / "transformers_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_conversion_snapshot_is_transformers_own() -> None:
    snapshot = ROOT / "src" / "shardmerge" / "planning" / "transformers_conversions.json"
    assert snapshot.read_text() == _script().conversions(), "run python scripts/transformers_tables.py"


FAMILIES: dict[str, tuple[type[tf.PreTrainedModel], Callable[[], object]]] = {
    "deepseek-v4": (tf.DeepseekV4ForCausalLM, _deepseek_v4),
    "granite-4.0-hybrid": (tf.GraniteMoeHybridForCausalLM, _granite_hybrid),
    "qwen3-vl-moe": (tf.Qwen3VLMoeForConditionalGeneration, _qwen3vl_moe),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_checkpoint_names_are_renamed_as_transformers_renames_them(name: str, tmp_path: Path) -> None:
    model_class, config = FAMILIES[name]
    torch.manual_seed(0)
    model_class(config()).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    names = checkpoint_names(json.loads((tmp_path / "config.json").read_text()), shapes, False)
    transforms = get_model_conversion_mapping(model_class.from_pretrained(tmp_path))
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    model_name = {stored: model for model, stored in names.renamed.items()}
    for key in shapes:
        theirs, converter = rename_source_key(key, renamings, converters)
        if converter is None or key in names.transposed:
            assert model_name.get(key, key) == theirs, key
        else:  # experts stored one by one: the names before the converter gathers them
            assert model_name.get(key, key) == rename_source_key(key, renamings, [])[0], key
    assert names.renamed or names.transposed


def test_an_adapter_on_a_tensor_transformers_splits_on_load_is_refused(tmp_path: Path) -> None:
    """HRM stores gate and up in one gate_up_proj that transformers chunks on load."""
    config = tf.HrmTextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    tf.HrmTextForCausalLM(config).save_pretrained(tmp_path / "base")
    base = Base(tmp_path / "base", torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"])
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, config=lora, model_class=tf.HrmTextForCausalLM)
    with pytest.raises(shardmerge.PlanError) as refused:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    problems = [str(problem) for problem in refused.value.problems]
    assert len(problems) == 2  # the H and the L module's layer
    assert "'model.H_module.layers.0.mlp.up_proj.weight' is built from checkpoint tensors such as " in problems[0]
    assert "'model.H_module.layers.0.mlp.gate_up_proj.weight' by transformers' Chunk(dim=0" in problems[0]


@pytest.mark.parametrize(
    ("gate_up", "down", "transposed"),
    [
        ((4, 48, 32), (4, 32, 24), (False, False, False)),  # as transformers saves them: [experts, out, in]
        ((4, 32, 48), (4, 24, 32), (True, True, True)),  # as Qwen3-VL-MoE is published: [experts, in, out]
        # A square tensor is loaded as stored (transformers transposes only another shape).
        ((4, 32, 32), (4, 16, 32), (False, True, True)),
        ((4, 32, 32), (4, 32, 16), (False, False, False)),
        ((4, 32, 32), (4, 32, 32), (False, False, None)),  # nothing tells layer 1's: refused if square
    ],
)
def test_the_orientation_of_published_experts_is_decided_per_checkpoint(
    gate_up: tuple[int, ...], down: tuple[int, ...], transposed: tuple[bool | None, ...]
) -> None:
    config = {"model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"]}
    layer = "model.language_model.layers.{}.mlp.experts."
    # layer 1 stores only a non-square gate_up_proj: the checkpoint's orientation decides it
    lone = (4, 32, 48) if transposed[2] is not False else (4, 48, 32)
    shapes = {layer.format(0) + "gate_up_proj": gate_up, layer.format(0) + "down_proj": down}
    shapes[layer.format(1) + "gate_up_proj"] = lone
    names = checkpoint_names(config, shapes, False)
    assert tuple(names.transposed[name] for name in shapes) == transposed


def test_a_square_published_expert_merges_as_transformers_loads_it(tmp_path: Path) -> None:
    """hidden = 2 x intermediate: transformers keeps the square gate_up_proj as stored and
    transposes down_proj; the adapter is trained on (and the output loaded as) that."""
    torch.manual_seed(0)
    model_class = tf.Qwen3VLMoeForConditionalGeneration
    model_class(_qwen3vl_moe(16)).save_pretrained(tmp_path / "base")
    _republish(tmp_path / "base", _experts_in_out)
    base = Base(tmp_path / "base", torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, config=lora, model_class=model_class)
    reference = peft_reference(base, [(adapter, 1.0)], model_class=model_class).eval()
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "out"), dtype="float32")
    ours = model_class.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12) % 90
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    merged = read_output(tmp_path / "out")
    assert merged["model.language_model.layers.0.mlp.experts.down_proj"].shape == (4, 16, 32)


def test_an_incomplete_adapter_is_refused_on_a_renamed_checkpoint(tmp_path: Path) -> None:
    """The adapter's config targets kv_proj, which the checkpoint stores as attn.wkv, and the
    weights hold no kv_proj tensor: PEFT would leave those modules untrained."""
    torch.manual_seed(0)
    tf.DeepseekV4ForCausalLM(_deepseek_v4()).save_pretrained(tmp_path / "base")
    base = Base(tmp_path / "base", torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_b_proj", "kv_proj"])
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, config=lora, model_class=tf.DeepseekV4ForCausalLM)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".kv_proj." not in k}, weights)
    with pytest.raises(shardmerge.PlanError) as refused:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    (problem,) = refused.value.problems
    assert "target_modules names 'kv_proj', which 4 modules of the base answer to" in str(problem)
