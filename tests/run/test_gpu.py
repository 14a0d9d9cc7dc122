"""The CUDA path (pinned buffers, non-blocking copies) against the same PEFT reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardmerge
from conftest import Base, assert_matches_reference, peft_reference, save_adapter
from merge_cases import CASES
from shardmerge.verify import verify


@pytest.mark.gpu
@pytest.mark.parametrize("dora", [False, True])
def test_cuda_merge_matches_peft(models: Callable[[str], Base], tmp_path: Path, dora: bool) -> None:
    base = models("llama-bf16")
    adapter = save_adapter(
        base,
        tmp_path / "a",
        seed=11,
        r=8,
        lora_alpha=16,
        use_dora=dora,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    )
    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "o"), device="cuda")
    assert report.device.startswith("cuda")
    assert_matches_reference(tmp_path / "o", base, peft_reference(base, [(adapter, 1.0)]), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_cuda_merge_of_tensors_in_many_blocks_is_the_cpu_merge_within_the_tolerance(
    case: str, tmp_path: Path, small_blocks: None
) -> None:
    """Every merged tensor recomputed on the CPU by verify, each shard by the tolerance of
    the device it was computed on (see verify._within_tolerance): values within the float32
    error of the merge, requantized codes within one step; every other tensor the base's."""
    base, adapters = CASES[case](tmp_path)
    output = tmp_path / "gpu"
    report = shardmerge.merge(base=str(base), adapters=[str(a) for a in adapters], output=str(output), device="cuda")
    assert report.device == "cuda:0" and report.device_bytes > 0 and report.locked_bytes > 0
    checked = verify(output, recompute=10**6, against_base=True)
    assert checked.recomputed == checked.merged_checked > 0
