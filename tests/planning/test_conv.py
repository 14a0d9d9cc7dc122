"""LoRA and DoRA on Conv1d, Conv2d (a 1x1 one too, which PEFT merges by another formula) and
Conv3d layers, against PEFT's own merge of the same module; a grouped convolution is refused,
as PEFT refuses to merge it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import shardmerge
from conftest import assert_within_tolerance
from shardmerge.verify import verify


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Conv1d(4, 6, 3)
        self.image = nn.Conv2d(6, 8, (3, 2))
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.video = nn.Conv3d(3, 8, (2, 3, 3))
        self.grouped = nn.Conv1d(8, 8, 3, groups=2)
        self.head = nn.Linear(8, 5)


def _save(model: nn.Module, folder: Path) -> None:
    folder.mkdir()
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, folder / "model.safetensors")


def _adapter(base: Convs, folder: Path, targets: list[str], **lora: object) -> nn.Module:
    """A PEFT adapter on ``targets`` with random factors, saved in ``folder``; the PEFT model."""
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(param * (1 + 0.25 * noise.abs()) if "magnitude" in name else 0.05 * noise)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    "lora", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora-bias"]
)  # fmt: skip
def test_lora_on_convolutions_matches_peft(tmp_path: Path, lora: dict) -> None:
    torch.manual_seed(0)
    base = Convs()
    _save(base, tmp_path / "base")
    targets = ["audio", "image", "pointwise", "video", "head"]
    model = _adapter(base, tmp_path / "adapter", targets, **lora)
    plan = shardmerge.plan(base=str(tmp_path / "base"), adapters=[str(tmp_path / "adapter")], dtype="float32")
    merged = {tensor.name for tensor in plan.shards[0].tensors if tensor.ops}
    assert {f"{target}.weight" for target in targets} <= merged
    shardmerge.merge(
        base=str(tmp_path / "base"), adapters=[str(tmp_path / "adapter")], output=str(tmp_path / "out"), dtype="float32"
    )
    expected = model.merge_and_unload().state_dict()
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert set(ours) == set(expected)
    for name, value in ours.items():
        assert_within_tolerance(name, value, expected[name])
    before = load_file(tmp_path / "base" / "model.safetensors")
    assert not torch.equal(ours["video.weight"], before["video.weight"])
    report = verify(tmp_path / "out", recompute=len(ours), against_base=True)
    assert report.recomputed == sum(bool(tensor.ops) for tensor in plan.shards[0].tensors)


def test_lora_on_a_grouped_convolution_is_refused_as_peft_refuses_to_merge_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Convs()
    _save(base, tmp_path / "base")
    model = _adapter(base, tmp_path / "adapter", ["grouped", "audio"])
    with pytest.raises(NotImplementedError, match="groups"):
        model.merge_and_unload()
    with pytest.raises(shardmerge.PlanError) as refused:
        shardmerge.plan(base=str(tmp_path / "base"), adapters=[str(tmp_path / "adapter")])
    (problem,) = refused.value.problems
    assert "grouped convolution (2 groups), 'grouped.weight' [8, 4, 3]" in str(problem)


def test_a_conv_adapter_of_another_kernel_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _save(Convs(), tmp_path / "base")
    other = Convs()
    other.image = nn.Conv2d(6, 8, (3, 3))
    _adapter(other, tmp_path / "adapter", ["image"])
    with pytest.raises(shardmerge.PlanError) as refused:
        shardmerge.plan(base=str(tmp_path / "base"), adapters=[str(tmp_path / "adapter")])
    (problem,) = refused.value.problems
    assert "update of [8, 6, 3, 3], base tensor 'image.weight' is [8, 6, 3, 2]" in str(problem)
