"""bitsandbytes (QLoRA) bases, as transformers' ``BitsAndBytesConfig`` and ``save_pretrained``
write them on the CPU: the output is PEFT's float32 merge on bitsandbytes' own dequantization,
rounded once to bfloat16; the bad inputs are one line each."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import shardmerge
from bnb_checkpoints import bnb_checkpoint, bnb_config
from conftest import (
    Base,
    assert_matches_saved,
    assert_refused,
    assert_same_logits,
    edit_tensor,
    llama_config,
    merge_broken_copy,
    peft_reference,
    read_output,
    read_output_like_base,
    save_adapter,
    save_base,
    saved_reference,
)
from shardmerge.planning import planner
from shardmerge.verify import verify

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))
Q = "model.layers.0.self_attn.q_proj"


class BnbBase:
    def __init__(self, path: Path, dequantized: Base, quantized: tuple[str, ...]) -> None:
        self.path, self.dequantized, self.quantized = path, dequantized, quantized


@pytest.fixture(scope="module")
def bnb_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], BnbBase]:
    """Bases by kind, quantized by transformers from one bfloat16 Llama whose MLP weights hold
    512 blocks of 64 values each (two nested blocks of 256)."""
    root = tmp_path_factory.mktemp("bnb")
    source = save_base(llama_config(hidden=128), root / "bf16", torch.bfloat16, seed=5, shard_kb=None)
    built: dict[str, BnbBase] = {}

    def get(kind: str) -> BnbBase:
        if kind not in built:
            dequantized, quantized = bnb_checkpoint(source, root / kind, kind)
            built[kind] = BnbBase(root / kind, dequantized, quantized)
        return built[kind]

    return get


def _adapter(base: BnbBase, folder: Path) -> Path:
    return save_adapter(
        base.dequantized, folder, seed=41, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]
    )


@pytest.mark.parametrize(("kind", "blocks"), [("nf4-double", True), ("fp4", False), ("int8", True)])
def test_output_is_peft_on_the_bitsandbytes_values_in_bfloat16(
    kind: str, blocks: bool, bnb_base: Callable[[str], BnbBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``blocks``, a few rows at a time: spans of absmax values that cross nested blocks."""
    base = bnb_base(kind)
    adapter = _adapter(base, tmp_path / "adapter")
    if blocks:  # 3 rows at a time: rows 126 to 128 take absmax values from both nested blocks
        monkeypatch.setattr(planner, "PACKED_BLOCK_ELEMENTS", 3 * 128)
    output = tmp_path / "out"
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    assert plan.dtype == "bfloat16", "auto writes a bitsandbytes base in bfloat16"
    assert any("weights are not written back" in note for note in plan.notes)
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    reference = peft_reference(base.dequantized, [(adapter, 1.0)])
    expected = saved_reference(reference, tmp_path / "reference")
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert_matches_saved(output, expected, torch.bfloat16)
    assert_same_logits(output, reference, torch.bfloat16)
    assert verify(output, recompute=100, against_base=True).recomputed >= 4


def test_the_fixture_loads_through_transformers_as_bitsandbytes_reads_it(
    bnb_base: Callable[[str], BnbBase],
) -> None:
    base = bnb_base("nf4-double")
    model = AutoModelForCausalLM.from_pretrained(base.path, device_map="cpu")
    model.dequantize(dtype=torch.bfloat16)  # bitsandbytes' float32 values, rounded once
    expected = read_output_like_base(base.dequantized.path)
    state = model.state_dict()
    assert base.quantized
    for name in base.quantized:
        assert torch.equal(state[name], expected[name].bfloat16()), name


def test_the_plan_says_which_base_a_qlora_adapter_was_trained_against(
    bnb_base: Callable[[str], BnbBase], tmp_path: Path
) -> None:
    base = bnb_base("fp4")
    adapter = _adapter(base, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/m-bnb-4bit"}))
    plain = shardmerge.plan(base=str(base.dequantized.path), adapters=[str(adapter)])
    assert any("trained against org/m-bnb-4bit, a bitsandbytes model" in note for note in plain.notes)
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/m"}))
    quantized = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    assert any("trained against org/m, a 16-bit model by its name" in note for note in quantized.notes)


def _edit_state(folder: Path, name: str, **changes: object) -> None:
    """Change keys of a quantization state (JSON in uint8), as a writer of the file could."""
    stored = read_output(folder)[name]
    state = json.loads(bytes(stored.tolist())) | changes
    edit_tensor(folder, name, torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8))


BAD: dict[str, tuple[str, Callable[[Path, dict[str, Any]], None], str]] = {
    "dtype-base": ("fp4", lambda folder, config: None, "weights cannot be written back in their format"),
    "missing-absmax": (
        "fp4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight.absmax", None),
        f"{Q}.weight.quant_state.bitsandbytes__fp4: a bitsandbytes 4-bit weight without its weight.absmax",
    ),
    "state-does-not-parse": (
        "fp4",
        lambda folder, config: edit_tensor(
            folder,
            f"{Q}.weight.quant_state.bitsandbytes__fp4",
            torch.tensor(list(b'{"quant_type": '), dtype=torch.uint8),
        ),
        "the quantization state does not parse",
    ),
    "state-too-large": (
        "fp4",
        lambda folder, config: edit_tensor(
            folder, f"{Q}.weight.quant_state.bitsandbytes__fp4", torch.full((5000,), 32, dtype=torch.uint8)
        ),
        "the quantization state holds 5000 bytes, more than the 4096 a state of a few keys takes",
    ),
    "nested-offset-beyond-float32": (
        "nf4-double",
        lambda folder, config: _edit_state(folder, f"{Q}.weight.quant_state.bitsandbytes__nf4", nested_offset=1e39),
        "nested blocks of 256 with offset 1e+39 are not supported",
    ),
    "state-of-another-type": (
        "fp4",
        lambda folder, config: config["quantization_config"].update(bnb_4bit_quant_type="nf4"),
        "a quantization state of another type than the config's nf4",
    ),
    "nested-half-present": (
        "nf4-double",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight.nested_absmax", None),
        "disagree on nesting",
    ),
    "int8-weights-declared-4-bit": (
        "int8",
        lambda folder, config: config.update(quantization_config=bnb_config("nf4")),
        f"{Q}.weight: an 8-bit bitsandbytes weight, but the config declares 4 bits",
    ),
    "4-bit-weights-declared-8-bit": (
        "fp4",
        lambda folder, config: config.update(quantization_config=bnb_config("int8")),
        f"{Q}.weight: a 4-bit bitsandbytes tensor, but the config declares 8 bits",
    ),
    "int8-misshapen-scb": (
        "int8",
        lambda folder, config: edit_tensor(folder, f"{Q}.SCB", torch.ones(3)),
        f"{Q}.SCB: SCB F32 [3] does not match the weight [128, 128]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bitsandbytes_inputs_are_one_line_and_nothing_is_written(
    case: str, bnb_base: Callable[[str], BnbBase], tmp_path: Path
) -> None:
    kind, change, message = BAD[case]
    base = bnb_base(kind)
    adapter = _adapter(base, tmp_path / "adapter")
    options = ("--dtype", "base") if case == "dtype-base" else ()
    done, output = merge_broken_copy(base.path, adapter, change, tmp_path, *options)
    assert_refused(done, message, output)
