"""Storage layouts of square weights: GPT-2's Conv1D ([in, out]) beside nn.Linear ([out, in])
in one model, decided per module and never from the adapter's ``fan_in_fan_out``.

The references are PEFT's own merge in float32 and the adapter's unmerged forward pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, PeftModel
from transformers import (
    ClvpDecoderConfig,
    ClvpForCausalLM,
    DecisionTransformerConfig,
    DecisionTransformerModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    OpenAIGPTConfig,
    OpenAIGPTLMHeadModel,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

import shardmerge
from conftest import Base, assert_matches_saved, peft_reference, read_output, save_adapter, saved_reference
from shardmerge.planning.layouts import CONV1D_MODULES, find_layouts, transformers_model_types

IDS = torch.arange(24).reshape(2, 12) % 32


@dataclass(frozen=True)
class Family:
    """A tiny model that mixes Conv1D and nn.Linear layers, and its modules by kind."""

    model_class: type[PreTrainedModel]
    build: Callable[[], PreTrainedModel]
    linear: list[str]
    conv1d: list[str]
    feedforward: list[str]
    embedding: str


FAMILIES = {
    # PEFT wraps the Conv1D layers first and the square classification head last.
    "gpt2-classifier": Family(
        GPT2ForSequenceClassification,
        lambda: GPT2ForSequenceClassification(
            GPT2Config(
                vocab_size=64,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                num_labels=32,
                pad_token_id=0,
                tie_word_embeddings=False,
            )
        ),
        ["score"],
        ["c_attn", "c_proj", "c_fc"],
        ["mlp.c_proj"],
        "wte",
    ),
    # Square nn.Linear attention first, Conv1D feed-forward layers after it in every layer.
    "clvp-decoder": Family(
        ClvpForCausalLM,
        lambda: ClvpForCausalLM(
            ClvpDecoderConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                n_inner=64,
                max_position_embeddings=64,
                max_text_tokens=32,
                bos_token_id=1,
                eos_token_id=2,
            )
        ),
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        ["c_fc", "c_proj"],
        ["mlp.c_proj"],
        "input_embeds_layer",
    ),
}


def features(family: Family) -> dict[str, PeftConfig]:
    """Every adapter type the README claims, each on the family's Conv1D and Linear layers
    where PEFT supports them there."""
    mixed = family.linear + family.conv1d
    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=mixed),
        "lora-all-linear": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        "rslora-patterns": LoraConfig(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=mixed,
            rank_pattern={family.conv1d[-1]: 2},
            alpha_pattern={family.linear[0]: 3},
        ),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=mixed),
        # GPT-2's score layer has no bias for lora_B.bias to go to (PEFT cannot merge that either).
        "lora-bias": LoraConfig(
            r=4, lora_alpha=8, lora_bias=True, target_modules=[name for name in mixed if name != "score"]
        ),
        "embedding-modules-to-save-tokens": LoraConfig(
            r=4,
            target_modules=[family.embedding, *mixed],
            modules_to_save=[family.linear[-1]],
        ),
        "trainable-tokens": LoraConfig(
            r=4, target_modules=mixed, trainable_token_indices={family.embedding: [1, 7, 30]}
        ),
        "ia3": IA3Config(target_modules=mixed + family.feedforward, feedforward_modules=family.feedforward),
        "loha": LoHaConfig(r=4, alpha=6, target_modules=family.linear),
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=family.linear, decompose_both=True),
    }


CASES = [(family, feature) for family in FAMILIES for feature in features(FAMILIES[family])]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    root = tmp_path_factory.mktemp("mixed")
    built = {}
    for name, family in FAMILIES.items():
        torch.manual_seed(len(name))
        family.build().save_pretrained(root / name)
        built[name] = Base(root / name, torch.float32)
    return built


def unmerged_logits(family: Family, base: Base, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(family.model_class.from_pretrained(base.path), adapter).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(("family_name", "feature"), CASES, ids=[f"{f}-{x}" for f, x in CASES])
def test_mixed_conv1d_and_linear_match_peft(
    family_name: str, feature: str, bases: dict[str, Base], tmp_path: Path
) -> None:
    family, base = FAMILIES[family_name], bases[family_name]
    config = features(family)[feature]
    adapter = save_adapter(base, tmp_path / "adapter", seed=len(feature), config=config, model_class=family.model_class)

    report = shardmerge.merge(
        base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "out"), dtype="float32"
    )

    assert report.tensors_merged > 0
    reference = peft_reference(base, [(adapter, 1.0)], family.model_class)
    assert_matches_saved(tmp_path / "out", saved_reference(reference, tmp_path / "reference"), torch.float32)
    ours = family.model_class.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, unmerged_logits(family, base, adapter))


def test_saved_fan_in_fan_out_is_not_trusted(bases: dict[str, Base], tmp_path: Path) -> None:
    """The issue's case: PEFT leaves fan_in_fan_out as the last wrapped module set it (False
    for the Linear head), while the square attn.c_proj layers are Conv1D."""
    family, base = FAMILIES["gpt2-classifier"], bases["gpt2-classifier"]
    adapter = save_adapter(
        base,
        tmp_path / "adapter",
        seed=3,
        config=LoraConfig(r=4, target_modules="all-linear"),
        model_class=family.model_class,
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False

    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])

    layouts = {op.module.rpartition(".")[2]: op.layout for s in plan.shards for t in s.tensors for op in t.ops}
    assert layouts == {"c_attn": "conv1d", "c_proj": "conv1d", "c_fc": "conv1d", "score": "linear"}
    assert any("Conv1D layout" in note and "gpt2" in note for note in plan.notes)


def _with_config(base: Base, folder: Path, **changes: object) -> Base:
    folder.mkdir()
    for path in base.path.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return Base(folder, base.dtype)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomModel"}}, "custom modelling code (auto_map)"),
        ({"model_type": "my-gpt"}, "model type 'my-gpt' is not one that transformers implements"),
    ],
    ids=["auto-map", "unknown-model-type"],
)
def test_unknown_architecture_refuses_square_weights_until_declared(
    bases: dict[str, Base], tmp_path: Path, changes: dict[str, object], reason: str
) -> None:
    family, known = FAMILIES["clvp-decoder"], bases["clvp-decoder"]
    base = _with_config(known, tmp_path / "base", **changes)
    config = LoraConfig(r=4, target_modules=family.linear + family.conv1d)
    adapter = save_adapter(known, tmp_path / "adapter", seed=5, config=config, model_class=family.model_class)

    with pytest.raises(shardmerge.PlanError) as caught:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)])

    lines = [problem.one_line() for problem in caught.value.problems]
    # One line per square module (4 attention projections x 2 layers); the non-square
    # Conv1D layers are told apart by their shapes.
    assert len(lines) == 8, lines
    assert all(reason in line and "--conv1d-modules none" in line for line in lines)
    assert all(re.search(r"layers\.\d\.attn\.(q|k|v|out)_proj", line) for line in lines)

    shardmerge.merge(
        base=str(base.path),
        adapters=[str(adapter)],
        output=str(tmp_path / "out"),
        dtype="float32",
        conv1d_modules=family.conv1d,
    )
    reference = peft_reference(known, [(adapter, 1.0)], family.model_class)
    assert_matches_saved(tmp_path / "out", saved_reference(reference, tmp_path / "reference"), torch.float32)


def test_declared_layouts_that_contradict_the_shapes_are_refused(bases: dict[str, Base], tmp_path: Path) -> None:
    family, base = FAMILIES["clvp-decoder"], bases["clvp-decoder"]
    adapter = save_adapter(
        base,
        tmp_path / "adapter",
        seed=6,
        config=LoraConfig(r=4, target_modules=["c_fc"]),
        model_class=family.model_class,
    )
    with pytest.raises(shardmerge.PlanError) as caught:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)], conv1d_modules=[])
    lines = [problem.one_line() for problem in caught.value.problems]
    assert len(lines) == 2 and all("stored as nn.Linear [out, in]" in line for line in lines), lines


def test_cli_declares_conv1d_modules(bases: dict[str, Base], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from shardmerge.cli import main

    family, known = FAMILIES["clvp-decoder"], bases["clvp-decoder"]
    base = _with_config(known, tmp_path / "base", model_type="my-gpt")
    adapter = save_adapter(
        known,
        tmp_path / "adapter",
        seed=7,
        config=LoraConfig(r=4, target_modules=["q_proj"]),
        model_class=family.model_class,
    )
    assert main(["plan", str(base.path), str(adapter)]) == 1
    assert "--conv1d-modules" in capsys.readouterr().err
    assert main(["plan", str(base.path), str(adapter), "--conv1d-modules", "none"]) == 0
    assert "q_proj.weight  <- [0] lora linear" in capsys.readouterr().out


# --- the table against transformers' own code ---------------------------------------------


def test_model_type_snapshot_is_transformers_own() -> None:
    assert transformers_model_types() == frozenset(CONFIG_MAPPING_NAMES), "refresh transformers_model_types.txt"


def test_conv1d_table_names_every_family_that_uses_conv1d() -> None:
    models = Path(transformers.__file__).parent / "models"
    users = {path.parent.name for path in models.glob("*/modeling_*.py") if re.search(r"\bConv1D\(", path.read_text())}
    folder_of = {"openai-gpt": "openai", "clvp_decoder": "clvp"}
    assert {folder_of.get(kind, kind) for kind in CONV1D_MODULES} == users


@pytest.mark.parametrize(
    "build",
    [
        lambda: GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, add_cross_attention=True)),
        lambda: FAMILIES["gpt2-classifier"].build(),
        lambda: OpenAIGPTLMHeadModel(OpenAIGPTConfig(n_embd=16, n_layer=1, n_head=2, vocab_size=32)),
        lambda: ImageGPTForCausalImageModeling(ImageGPTConfig(n_embd=16, n_layer=1, n_head=2, vocab_size=32)),
        lambda: DecisionTransformerModel(DecisionTransformerConfig(hidden_size=16, n_layer=1, n_head=2)),
        lambda: FAMILIES["clvp-decoder"].build(),
    ],
    ids=["gpt2-cross-attention", "gpt2-classifier", "openai-gpt", "imagegpt", "decision-transformer", "clvp"],
)
def test_conv1d_table_matches_the_module_types(build: Callable[[], PreTrainedModel]) -> None:
    model = build()
    layouts = find_layouts(model.config.to_dict(), None)
    weights = [(n, m) for n, m in model.named_modules() if isinstance(m, (Conv1D, torch.nn.Linear))]
    assert any(isinstance(m, Conv1D) for _, m in weights) and any(isinstance(m, torch.nn.Linear) for _, m in weights)
    for name, module in weights:
        assert layouts.is_conv1d(name) == isinstance(module, Conv1D), name


# --- several adapters on the same trainable tokens -----------------------------------------


def test_overlapping_trainable_tokens_apply_in_order(models: Callable[[str], Base], tmp_path: Path) -> None:
    """PEFT refuses to merge these together ("undefined merging behavior"); applied in order,
    as PEFT's merges one after the other give, the later adapter's rows win."""
    base = models("llama-bf16")
    first = save_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj"], trainable_token_indices=[3, 9])
    second = save_adapter(base, tmp_path / "b", seed=2, r=4, target_modules=["v_proj"], trainable_token_indices=[9, 20])

    plan = shardmerge.plan(base=str(base.path), adapters=[str(first), str(second)])
    assert any("same trainable token rows (1 rows, e.g. 9)" in note and "last adapter" in note for note in plan.notes)
    shardmerge.merge(base=str(base.path), adapters=[str(first), str(second)], output=str(tmp_path / "out"))

    ours = read_output(tmp_path / "out")["model.embed_tokens.weight"]
    reference = peft_reference(base, [(first, 1.0), (second, 1.0)]).state_dict()["model.embed_tokens.weight"]
    assert torch.equal(ours, reference.to(torch.bfloat16))
    only_first = peft_reference(base, [(first, 1.0)]).state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(ours[9], only_first[9].to(torch.bfloat16)), "the later adapter's row 9 wins"
