"""A tiny causal language model shipped as custom modelling code (``auto_map``), written as
the older InternLM, Qwen and MiniCPM releases write theirs: its own attention and MLP, square
``nn.Linear`` weights under their own names, one built by a helper function."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinyConfig(PretrainedConfig):
    model_type = "tiny_custom"

    def __init__(self, vocab_size: int = 96, hidden_size: int = 32, layers: int = 2, **kwargs: object) -> None:
        self.vocab_size, self.hidden_size, self.layers = vocab_size, hidden_size, layers
        super().__init__(**kwargs)


def make_gate(size: int) -> nn.Linear:
    return nn.Linear(size, size, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm = RMSNorm(size)
        self.wqkv = nn.Linear(size, 3 * size, bias=False)
        self.wo = nn.Linear(size, size, bias=False)
        self.w1 = nn.Linear(size, 2 * size, bias=False)
        self.w2 = nn.Linear(2 * size, size, bias=False)
        self.gate = make_gate(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wqkv(self.norm(x)).chunk(3, dim=-1)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
        x = x + self.wo(scores.softmax(-1) @ v)
        return x + self.w2(nn.functional.silu(self.w1(x))) * torch.sigmoid(self.gate(x))


class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config.hidden_size) for _ in range(config.layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> CausalLMOutput:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return CausalLMOutput(logits=self.head(x))
