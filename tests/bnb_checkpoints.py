"""bitsandbytes bases made by the library itself: tensors quantized by its own functions (for
the codec's conformance cases), and whole checkpoints written by transformers'
``BitsAndBytesConfig`` and ``save_pretrained`` on the CPU, with the float32 values
bitsandbytes reads them as (the base PEFT's reference merge runs on)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from bitsandbytes import functional as bnb
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import Base

KINDS = ("nf4", "nf4-double", "fp4", "int8")


def bnb_config(kind: str) -> dict[str, Any]:
    """The quantization_config transformers saves for ``kind``."""
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True).to_dict()
    quant_type = kind.split("-")[0]
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=kind.endswith("double"),
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return config.to_dict()


def reference_bnb(value: torch.Tensor, kind: str, module: str = "m") -> dict[str, torch.Tensor]:
    """``value`` (float32) quantized by bitsandbytes' own functions from its bfloat16 copy, as
    stored: the weight first, then its companions in the order the codec reads them (scales,
    quantization state, nested scales and table), then the tensors it leaves out."""
    if kind == "int8":
        codes, scales, _ = bnb.int8_vectorwise_quant(value.half())
        return {f"{module}.weight": codes, f"{module}.SCB": scales, f"{module}.weight_format": torch.tensor(0).byte()}
    quant_type = kind.split("-")[0]
    packed, state = bnb.quantize_4bit(value.bfloat16(), quant_type=quant_type, compress_statistics="double" in kind)
    stored = {f"{module}.weight.{key}": tensor for key, tensor in state.as_dict(packed=True).items()}
    order = ["absmax", f"quant_state.bitsandbytes__{quant_type}", "nested_absmax", "nested_quant_map", "quant_map"]
    companions = {
        f"{module}.weight.{key}": stored[f"{module}.weight.{key}"]
        for key in order
        if f"{module}.weight.{key}" in stored
    }
    return {f"{module}.weight": packed, **companions}


def library_bnb_values(stored: dict[str, torch.Tensor], kind: str, module: str = "m") -> torch.Tensor:
    """bitsandbytes' own dequantization of ``stored``, in float32."""
    weight = stored[f"{module}.weight"]
    if kind == "int8":
        return bnb.int8_vectorwise_dequant(weight, stored[f"{module}.SCB"])
    prefix = f"{module}.weight."
    state = bnb.QuantState.from_dict(
        {key[len(prefix) :]: tensor for key, tensor in stored.items() if key.startswith(prefix)}, torch.device("cpu")
    )
    wide = copy.copy(state)
    wide.dtype = torch.float32
    return bnb.dequantize_4bit(weight, wide)


def bnb_checkpoint(source: Base, folder: Path, kind: str) -> tuple[Base, tuple[str, ...]]:
    """``source`` (a bfloat16 checkpoint) quantized and saved by transformers in ``kind``; the
    values bitsandbytes reads its weights as, in float32 beside it, and the quantized names."""
    config = BitsAndBytesConfig.from_dict(bnb_config(kind))
    model = AutoModelForCausalLM.from_pretrained(source.path, quantization_config=config, device_map="cpu")
    # in shards, some weights apart from their companions; before any forward pass, which
    # may repack the weights in place
    model.save_pretrained(folder, max_shard_size="100KB")
    stored = {name: tensor for shard in folder.glob("*.safetensors") for name, tensor in load_file(shard).items()}
    plain = dict(load_file(source.path / "model.safetensors"))
    quantized = []
    for name in list(plain):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and stored[name].dtype in (torch.uint8, torch.int8):
            parts = {key: tensor for key, tensor in stored.items() if key.startswith(f"{module}.")}
            plain[name] = library_bnb_values(parts, kind, module).float()
            quantized.append(name)
        else:
            plain[name] = plain[name].float()
    dequantized = folder.with_name(folder.name + "-dequantized")
    dequantized.mkdir()
    save_file(plain, dequantized / "model.safetensors", metadata={"format": "pt"})
    base_config = json.loads((source.path / "config.json").read_text())
    (dequantized / "config.json").write_text(json.dumps(base_config | {"dtype": "float32"}, indent=2))
    return Base(dequantized, torch.float32), tuple(quantized)
