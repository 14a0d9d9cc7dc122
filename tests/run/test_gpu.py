"""The CUDA path (pinned buffers, non-blocking copies) against the same PEFT reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardmerge
from conftest import Base, assert_matches_reference, peft_reference, save_adapter


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
