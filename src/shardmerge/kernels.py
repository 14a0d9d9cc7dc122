"""Pure tensor math of a merge: one adapter's change applied to a float32 base value.

Every function updates ``value`` (float32) in place and returns it. The caller rounds once,
after the last adapter.
"""

from __future__ import annotations

import torch

from .planner import MergeOp

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPES: dict[torch.dtype, str] = {value: key for key, value in TORCH_DTYPES.items()}


def apply_op(value: torch.Tensor, op: MergeOp, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply ``op`` to ``value`` given the op's adapter tensors (float32, same device)."""
    if op.kind == "replace":
        # lerp with weight 1 returns the end point exactly, so a full replacement stays exact.
        return value.lerp_(tensors[0], op.weight)
    if op.kind == "bias":
        return value.add_(tensors[0], alpha=op.scale * op.weight)
    left, right = _factors(op.layout, tensors[0], tensors[1])
    if op.kind == "lora":
        return value.addmm_(left, right, alpha=op.scale * op.weight)
    if op.kind == "dora":
        return _dora(value, left, right, tensors[2], op)
    raise ValueError(f"unknown merge op kind {op.kind!r}")


def _factors(layout: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two matrices whose product is the delta in the base tensor's own layout."""
    if layout == "linear":
        return lora_b, lora_a  # (out, r) @ (r, in)
    # conv1d stores (in, out); embedding A is (r, num_embeddings) and B (dim, r): both take
    # the transpose, (B @ A)^T = A^T @ B^T.
    return lora_a.T, lora_b.T


def _dora(
    value: torch.Tensor, left: torch.Tensor, right: torch.Tensor, magnitude: torch.Tensor, op: MergeOp
) -> torch.Tensor:
    """DoRA: V = W + s * delta, rescaled so each output feature's norm equals the magnitude.

    An adapter weight w interpolates between the base and the DoRA result, W + w * (W' - W),
    so that w = 1 is exactly DoRA and w = 0 leaves the base unchanged.
    """
    updated = torch.addmm(value, left, right, alpha=op.scale)
    # Output features are rows for Linear; columns for Conv1D (in, out) and Embedding (vocab, dim).
    feature_dim = 0 if op.layout == "linear" else 1
    norm = torch.linalg.vector_norm(updated, dim=1 - feature_dim)
    factor = magnitude / norm
    updated.mul_(factor.unsqueeze(1 - feature_dim))
    return value.lerp_(updated, op.weight)
