"""Generate the bundled demo: a small Llama-shaped base in three shards and a LoRA adapter.

Both are built with transformers and peft, seeded, so every run makes the same files. The
adapter's parameters are random (its B matrices included), as after some training.

    python scripts/make_demo.py demo
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write base/ and adapter/ (replaced)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # peft's notes on a fresh adapter are not for demo users
    shutil.rmtree(args.folder, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    base.save_pretrained(args.folder / "base", max_shard_size="3MB")

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(args.folder / "base", dtype=torch.float32),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(args.folder / "adapter")
    shards = sorted(path.name for path in (args.folder / "base").glob("*.safetensors"))
    print(f"demo: base with {len(shards)} shards in {args.folder / 'base'}, adapter in {args.folder / 'adapter'}")


if __name__ == "__main__":
    main()
