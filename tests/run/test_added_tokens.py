"""Adapters saved after ``resize_token_embeddings`` (added tokens): the resized embedding and
head replace the base's, ``vocab_size`` follows, and LoRA on a resized layer applies to the
resized tensor. The reference is PEFT on the resized model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import shardmerge
from conftest import (
    Base,
    assert_matches_saved,
    llama_config,
    load_fp32,
    read_output,
    read_output_like_base,
    save_base,
    saved_reference,
    shard_bytes,
)
from shardmerge.verify import verify

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))
ROWS = 100  # the base has 96


def _base(folder: Path, tied: bool) -> Base:
    config = llama_config()
    config.tie_word_embeddings = tied
    return save_base(config, folder, torch.float32, seed=8)


def _resized(base: Base) -> AutoModelForCausalLM:
    model = load_fp32(base.path)
    model.resize_token_embeddings(ROWS, mean_resizing=False)
    return model


def _adapter(base: Base, folder: Path, *, trained_copies: bool = True, **lora: object) -> Path:
    """An adapter trained on the resized model, its parameters set at random (the saved whole
    layers' too, unless not ``trained_copies``: then only their new rows differ from the
    base's); PEFT saves the resized embedding (and head) whole."""
    model = get_peft_model(_resized(base), LoraConfig(r=4, lora_alpha=8, **lora))
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (trained_copies or "modules_to_save" not in name):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def _peft(base: Base, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(_resized(base), adapter).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = (torch.arange(24).reshape(2, 12) * 7) % ROWS  # new tokens among them
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_added_tokens_match_peft_on_the_resized_model(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(
        base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    reference = _peft(base, adapter).merge_and_unload()
    assert_matches_saved(output, saved_reference(reference, tmp_path / "reference"), torch.float32)
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == ROWS and config["tie_word_embeddings"] is False
    ours = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=1e-5, atol=1e-5)
    assert verify(output, recompute=20, against_base=True).recomputed >= 4


def test_verify_knows_a_resized_tensor_is_not_the_base_though_its_old_rows_are(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(
        base, tmp_path / "adapter", trained_copies=False, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    )
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    ours, theirs = read_output(output), read_output_like_base(base.path)
    assert torch.equal(ours["model.embed_tokens.weight"][:96], theirs["model.embed_tokens.weight"])
    assert verify(output, against_base=True).against_base > 0


@pytest.mark.parametrize("head_lora", [False, True])
def test_added_tokens_on_a_tied_model_untie_and_match_peft_forward(head_lora: bool, tmp_path: Path) -> None:
    """A tied model whose embedding is saved whole (modules_to_save): PEFT's forward pass
    reads the embedding's trained copy, and for the head the resized shared parameter (saved
    as the wrapper's original_module), with ``head_lora`` plus its LoRA update. The output
    keeps both, untied (PEFT's merge would change the embedding through the tie: its unmerged
    forward pass is the oracle)."""
    base = _base(tmp_path / "base", tied=True)
    targets = ["q_proj", "lm_head"] if head_lora else ["q_proj"]
    adapter = _adapter(base, tmp_path / "adapter", target_modules=targets, modules_to_save=["embed_tokens"])
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    tensors = read_output(output)
    assert tensors["model.embed_tokens.weight"].shape == tensors["lm_head.weight"].shape == (ROWS, 32)
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == ROWS and config["tie_word_embeddings"] is False
    ours = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(ours), _logits(_peft(base, adapter)), rtol=1e-4, atol=1e-4)


def test_a_resizing_adapter_needs_weight_one_and_a_vocabulary_sized_tensor(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(
        base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    done = subprocess.run(
        [SHARDMERGE, "merge", str(base.path), str(adapter), "--weights", "0.5", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert (
        "resizes 'model.embed_tokens.weight' from 96 to 100 rows (added tokens), which only a weight of 1"
        in done.stderr
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_batch_pass_writes_a_resized_and_a_plain_job_as_single_merges(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    resized = _adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    plain = tmp_path / "b"
    get_peft_model(
        load_fp32(base.path), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).save_pretrained(plain)
    jobs = {
        "jobs": [
            {"name": a.name, "base": str(base.path), "adapters": [str(a)], "output": str(tmp_path / f"out-{a.name}")}
            for a in (resized, plain)
        ]
    }
    (tmp_path / "batch.yaml").write_text(json.dumps(jobs))
    done = subprocess.run([SHARDMERGE, "run", str(tmp_path / "batch.yaml"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for adapter in (resized, plain):
        single = tmp_path / f"single-{adapter.name}"
        shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(single))
        assert shard_bytes(single) == shard_bytes(tmp_path / f"out-{adapter.name}")


def _refused(base: Base, adapters: list[Path]) -> list[str]:
    """The one-line problems of planning ``adapters`` on ``base`` (none: not refused)."""
    try:
        shardmerge.plan(base=str(base.path), adapters=[str(a) for a in adapters])
    except shardmerge.PlanError as exc:
        return [str(problem) for problem in exc.problems]
    return []


def test_an_adapter_on_the_old_vocabulary_does_not_mix_with_a_resizing_one(tmp_path: Path) -> None:
    """After a resizing adapter, an adapter trained on the old vocabulary does not fit the
    resized head; before it, its change would be discarded by the whole replacement."""
    base = _base(tmp_path / "base", tied=False)
    resizing = _adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    old = tmp_path / "b"
    model = get_peft_model(load_fp32(base.path), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    model.save_pretrained(old)
    after = _refused(base, [resizing, old])
    assert any("fits neither base tensor 'lm_head.weight' [100, 32]" in problem for problem in after), after
    before = _refused(base, [old, resizing])
    assert any("discarding the change of adapter 0 before it" in problem for problem in before), before


@pytest.mark.parametrize("tied", [False, True])
def test_a_resize_that_leaves_a_vocabulary_tensor_unknown_is_refused(tied: bool, tmp_path: Path) -> None:
    """Untied: LoRA on the resized embedding, where PEFT saves the embedding alone. Tied: an
    adapter whose only resized tensor is the embedding's own copy, so the (untied) head's new
    rows are nowhere. Either output would not load, or would hold rows nobody trained."""
    base = _base(tmp_path / "base", tied=tied)
    if tied:
        adapter = _adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
        tensors = load_file(adapter / "adapter_model.safetensors")
        kept = {k: v for k, v in tensors.items() if not re.search(r"original_module|modules_to_save|lm_head", k)}
        save_file(kept, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    else:
        adapter = _adapter(base, tmp_path / "a", target_modules=["q_proj", "embed_tokens"])
        assert "base_model.model.lm_head.weight" not in load_file(adapter / "adapter_model.safetensors")
    problems = _refused(base, [adapter])
    assert any("but not 'lm_head.weight' (96 rows): its new rows cannot be told" in p for p in problems), problems
