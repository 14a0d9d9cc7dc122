"""Merges that would write NaN or Inf, and merges that change nothing: refused or reported,
never passed silently."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import shardmerge
from conftest import Base, llama_config, load_fp32, read_output, save_adapter, save_base, unmerged_logits
from shardmerge.verify import verify

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))
MERGED = "model.layers.0.self_attn.q_proj.weight"
COPIED = "model.layers.1.mlp.up_proj.weight"


def with_values(base: Base, folder: Path, name: str, value: float) -> Base:
    """A copy of ``base`` whose tensor ``name`` holds ``value`` at [0, 0]."""
    shutil.copytree(base.path, folder)
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][0, 0] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return Base(folder, base.dtype)


def merge(base: Base, adapter: Path, output: Path, dtype: str = "float16") -> shardmerge.run.jobs.MergeReport:
    return shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype=dtype)


def assert_nothing_final(output: Path) -> None:
    assert not (output / "model.safetensors.index.json").exists()
    assert not list(output.glob("*.tmp"))


@pytest.mark.parametrize("name", [MERGED, COPIED], ids=["merged", "converted"])
def test_values_out_of_range_for_the_output_dtype_are_refused(
    models: Callable[[str], Base], tmp_path: Path, name: str
) -> None:
    base = with_values(models("llama-bf16"), tmp_path / "base", name, 1e5)  # above float16's 65504
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, r=4, target_modules=["q_proj"])

    with pytest.raises(shardmerge.NonFiniteError) as caught:
        merge(base, adapter, tmp_path / "out")

    line = caught.value.one_line()
    assert f"{name}: 1 values would be NaN or Inf in the output (out of range for F16: choose --dtype bfloat16" in line
    assert line.startswith(str(tmp_path / "out" / "model-"))
    assert_nothing_final(tmp_path / "out")
    merge(base, adapter, tmp_path / "bf16", dtype="bfloat16")  # the way out
    assert torch.isfinite(read_output(tmp_path / "bf16")[name].float()).all()


def test_non_finite_adapter_values_are_refused(models: Callable[[str], Base], tmp_path: Path) -> None:
    base = models("llama-bf16")
    adapter = save_adapter(base, tmp_path / "adapter", seed=2, r=4, target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})

    result = subprocess.run(
        [SHARDMERGE, "merge", str(base.path), str(adapter), "-o", str(tmp_path / "out"), "--quiet"],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert "model.layers.1.self_attn.q_proj.weight: 32 values would be NaN or Inf" in result.stderr
    assert "(non-finite values in adapter 0: a diverged training run?)" in result.stderr
    assert_nothing_final(tmp_path / "out")


def test_non_finite_values_of_the_base_are_kept_and_reported(models: Callable[[str], Base], tmp_path: Path) -> None:
    base = with_values(models("llama-bf16"), tmp_path / "base", MERGED, float("inf"))
    base = Base(with_values(base, tmp_path / "base2", COPIED, float("nan")).path, base.dtype)
    adapter = save_adapter(base, tmp_path / "adapter", seed=3, r=4, target_modules=["q_proj"])

    report = merge(base, adapter, tmp_path / "out")

    assert set(report.non_finite_kept) == {MERGED, COPIED}
    ours = read_output(tmp_path / "out")
    assert ours[MERGED][0, 0].isinf() and ours[COPIED][0, 0].isnan()
    assert verify(tmp_path / "out").non_finite_kept == 2


def test_verify_checks_converted_tensors(models: Callable[[str], Base], tmp_path: Path) -> None:
    base = models("llama-bf16")
    adapter = save_adapter(base, tmp_path / "adapter", seed=4, r=4, target_modules=["q_proj"])
    output = tmp_path / "out"
    merge(base, adapter, output)
    shard = output / json.loads((output / "model.safetensors.index.json").read_text())["weight_map"][COPIED]
    tensors = load_file(shard)
    tensors[COPIED][1, 1] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})

    with pytest.raises(shardmerge.VerifyError) as caught:
        verify(output)

    lines = [problem.one_line() for problem in caught.value.problems]
    assert any(f"{COPIED}: converted tensor holds NaN or Inf" in line for line in lines), lines


@pytest.fixture
def untrained(models: Callable[[str], Base], tmp_path: Path) -> tuple[Base, Path]:
    """A freshly initialised LoRA adapter: every lora_B is zero."""
    base = models("llama-bf16")
    model = get_peft_model(load_fp32(base.path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "untrained")
    return base, tmp_path / "untrained"


def test_a_merge_that_changes_nothing_warns_and_strict_refuses(untrained: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = untrained
    command = [SHARDMERGE, "merge", str(base.path), str(adapter), "--quiet", "--dtype", "bfloat16"]

    warned = subprocess.run([*command, "-o", str(tmp_path / "out")], capture_output=True, text=True)
    strict = subprocess.run([*command, "-o", str(tmp_path / "strict"), "--strict"], capture_output=True, text=True)

    assert warned.returncode == 0
    assert warned.stderr.count("\n") == 1
    assert "warning: the adapters changed none of the 4 tensors they target: the output equals the base" in (
        warned.stderr
    )
    assert strict.returncode == 1
    assert "error: " + str(tmp_path / "strict") + ": the adapters changed none of the 4 tensors" in strict.stderr
    assert not (tmp_path / "strict" / "model.safetensors.index.json").exists()
    with pytest.raises(shardmerge.VerifyError) as caught:
        verify(tmp_path / "out", against_base=True)
    lines = [problem.one_line() for problem in caught.value.problems]
    assert len(lines) == 4 and all("merged tensor is identical to the base" in line for line in lines), lines


def test_verify_against_base_and_changes_per_adapter(models: Callable[[str], Base], tmp_path: Path) -> None:
    base = models("llama-bf16")
    first = save_adapter(base, tmp_path / "a", seed=5, r=4, target_modules=["q_proj", "v_proj"])
    second = save_adapter(base, tmp_path / "b", seed=6, r=4, target_modules=["v_proj", "o_proj", "down_proj"])
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(first), str(second)], output=str(output))

    report = verify(output, against_base=True)

    assert [count for _, count in report.changes] == [4, 6]
    assert report.against_base == len(read_output(base.path)) and report.unchanged == 0
    result = subprocess.run([SHARDMERGE, "verify", str(output), "--against-base"], capture_output=True, text=True)
    assert result.returncode == 0 and "changes 6 base tensors" in result.stdout

    shard = output / json.loads((output / "model.safetensors.index.json").read_text())["weight_map"][COPIED]
    tensors = load_file(shard)
    tensors[COPIED][0, 0] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(shardmerge.VerifyError) as caught:
        verify(output, against_base=True)
    assert any(f"{COPIED}: copied tensor differs from the base" in p.one_line() for p in caught.value.problems)


def test_an_untied_head_says_what_happened_to_the_embedding_the_adapter_saved_whole(
    models: Callable[[str], Base], tmp_path: Path
) -> None:
    """LoRA on the head of a tied model: PEFT saves the embedding whole, with the base's values.
    Written as it is, which is right: said so, not reported as an update of zero."""
    config = llama_config()
    config.tie_word_embeddings = True
    base = save_base(config, tmp_path / "base", torch.bfloat16, shard_kb=None)
    adapter = save_adapter(base, tmp_path / "adapter", seed=7, r=4, target_modules=["lm_head"])
    output = tmp_path / "out"
    result = subprocess.run(
        [SHARDMERGE, "merge", str(base.path), str(adapter), "-o", str(output), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and not result.stderr
    assert "came out equal to the base" not in result.stdout
    assert "1 tensor saved whole in the adapter holds the base's own values (model.embed_tokens.weight)" in (
        result.stdout
    )
    ids = torch.arange(24).reshape(2, 12) % config.vocab_size
    merged = load_fp32(output).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged_logits(base, adapter, ids), rtol=2e-2, atol=2e-2)
    assert verify(output, against_base=True).against_base == len(read_output(output))
