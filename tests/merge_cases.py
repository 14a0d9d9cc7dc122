"""Merges of every kind of tensor a GPU merge must get right, built small: LoRA, DoRA on the
embedding, FP8 requantized, MXFP4 and INT4 requantized. Each builder makes a base and its
adapters in a folder and returns their paths."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from conftest import llama_config, save_adapter, save_base
from fp8_checkpoints import fine_grained, quantize_checkpoint
from packed_checkpoints import gpt_oss_config, int_checkpoint, int_config, mxfp4_checkpoint
from planning.test_architectures import olmoe_config


def llama_case(root: Path) -> tuple[Path, list[Path]]:
    base = save_base(llama_config(), root / "llama", torch.bfloat16, seed=5)
    lora = save_adapter(
        base, root / "lora", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    dora = save_adapter(
        base, root / "dora", seed=7, r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "embed_tokens"]
    )
    return base.path, [lora, dora]


def _fp8(root: Path) -> tuple[Path, list[Path]]:
    source = save_base(llama_config(hidden=64), root / "llama-bf16", torch.bfloat16, seed=3)
    base = quantize_checkpoint(source.path, root / "fp8", fine_grained())
    targets = ["q_proj", "v_proj", "down_proj"]
    return base.path, [
        save_adapter(base.dequantized, root / "adapter", seed=44, r=4, lora_alpha=8, target_modules=targets)
    ]


def _packed(root: Path, config: Callable[[], object], quantization: dict[str, Any] | None) -> tuple[Path, list[Path]]:
    source = save_base(config(), root / "bf16", torch.bfloat16, seed=3)
    if quantization is None:
        base = mxfp4_checkpoint(source.path, root / "packed")
    else:
        base = int_checkpoint(source.path, root / "packed", quantization)
    parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=parameters)
    return base.path, [save_adapter(base.dequantized, root / "adapter", seed=31, config=lora)]


CASES: dict[str, Callable[[Path], tuple[Path, list[Path]]]] = {
    "lora-dora-embedding": llama_case,
    "fp8-requantized": _fp8,
    "mxfp4-requantized": lambda root: _packed(root, gpt_oss_config, None),
    "int4-requantized": lambda root: _packed(root, olmoe_config, int_config(4, symmetric=False, group=8)),
}
