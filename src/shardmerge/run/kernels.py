"""Pure tensor math of a merge: one adapter's change applied to a float32 base value.

Every function updates ``value`` (float32) in place and returns it. The caller rounds once,
after the last adapter. An adapter weight w scales additive updates (W + w * s * delta); for
changes that are not additive (DoRA, IA3, replacements, trainable tokens) it interpolates
between the base and the adapter's result, W + w * (W' - W), through ``lerp``, which returns
the end point exactly at w = 1.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..planning.model import MergeOp


def apply_op(
    value: torch.Tensor, op: MergeOp, tensors: list[torch.Tensor | None], rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Apply ``op`` to ``value`` given the op's adapter tensors (float32, same device; None
    for an absent optional factor). With ``rows``, ``value`` holds only those rows of the
    tensor (see ``row_separable``), and a replacement tensor holds the same rows."""
    if op.kind == "replace":
        return value.lerp_(_get(tensors, 0), op.weight)
    if op.kind == "tokens":
        return _tokens(value, op, _get(tensors, 0), rows)
    if op.kind == "bias":
        return value.add_(_get(tensors, 0), alpha=op.scale * op.weight)
    if op.kind == "ia3":
        factor = _get(tensors, 0)
        factor = factor.reshape(-1) if op.layout == "bias" else factor.T if op.layout == "conv1d" else factor
        if rows is not None and factor.dim() == 2 and factor.shape[0] != 1:
            factor = factor[rows[0] : rows[1]]
        return value.mul_(torch.ones_like(factor).lerp_(factor, op.weight))
    if op.kind in ("lora", "dora"):
        lora_a, lora_b = _get(tensors, 0), _get(tensors, 1)
        if op.layout.startswith("experts-"):
            # A fused (E, out, in) or (E, in, out) tensor: each expert's slice in turn, or
            # with ``rows``, rows of the experts' matrices one after another, all in one expert.
            if rows is not None:
                height = lora_b.shape[0] if op.layout == "experts-out-in" else lora_a.shape[1]
                expert = rows[0] // height
                left, right = _factors(for_expert(op, expert), lora_a, lora_b)
                left = left[rows[0] - expert * height : rows[1] - expert * height]
                return value.addmm_(left, right, alpha=op.scale * op.weight)
            for expert in range(op.experts):
                left, right = _factors(for_expert(op, expert), lora_a, lora_b)
                value[expert].addmm_(left, right, alpha=op.scale * op.weight)
            return value
        if op.layout == "conv":
            # A convolution's weight (out, in, *kernel) as the matrix (out, in * kernel): A is
            # (r, in, *kernel), B (out, r, 1, ...), and DoRA's magnitude (1, out, 1, ...).
            matrices = [lora_a.reshape(lora_a.shape[0], -1), lora_b.reshape(lora_b.shape[0], -1)]
            magnitude = [_get(tensors, 2).reshape(-1)] if op.kind == "dora" else []
            apply_op(value.view(value.shape[0], -1), replace(op, layout="linear"), [*matrices, *magnitude], rows)
            return value
        left, right = _factors(op, lora_a, lora_b)
        if rows is not None:
            left = left[rows[0] : rows[1]]
        if op.kind == "dora":
            magnitude = _get(tensors, 2)
            return _dora(value, left, right, magnitude if rows is None else magnitude[rows[0] : rows[1]], op)
        return value.addmm_(left, right, alpha=op.scale * op.weight)
    if op.kind == "loha":
        w1a, w1b, w2a, w2b = (_get(tensors, i) for i in range(4))
        if rows is not None:
            w1a, w2a = w1a[rows[0] : rows[1]], w2a[rows[0] : rows[1]]
        return value.add_((w1a @ w1b).mul_(w2a @ w2b), alpha=op.scale * op.weight)
    if op.kind == "lokr":
        w1 = _dense(tensors[0], tensors[1], tensors[2])
        w2 = _dense(tensors[3], tensors[4], tensors[5])
        return value.add_(torch.kron(w1, w2), alpha=op.scale * op.weight)
    raise ValueError(f"unknown merge op kind {op.kind!r}")


def for_expert(op: MergeOp, expert: int, transposed: bool = False) -> MergeOp:
    """``op`` as it applies to one expert's matrix: a LoRA on fused experts becomes that
    expert's own, laid as ``linear`` or ``conv1d`` in the orientation the matrix is computed
    in (``transposed``: the transpose of the model's parameter). Any other op is itself."""
    if not op.layout.startswith("experts-"):
        return op
    linear = (op.layout == "experts-out-in") != transposed
    return replace(op, expert=expert, layout="linear" if linear else "conv1d")


def apply_lora_columns(
    value: torch.Tensor,
    op: MergeOp,
    tensors: list[torch.Tensor | None],
    rows: tuple[int, int] | None,
    columns: tuple[int, int],
) -> torch.Tensor:
    """A plain LoRA op (``kind == "lora"``, ``layout == "linear"``) applied to ``value``,
    which holds only columns ``columns`` of the rows ``rows`` (None: all) of the tensor."""
    left, right = _factors(op, _get(tensors, 0), _get(tensors, 1))
    if rows is not None:
        left = left[rows[0] : rows[1]]
    return value.addmm_(left, right[:, columns[0] : columns[1]], alpha=op.scale * op.weight)


def by_columns(ops: tuple[MergeOp, ...]) -> bool:
    """Whether every op can be applied to a block's columns piece by piece (plain LoRA)."""
    return all(op.kind == "lora" and op.layout == "linear" for op in ops)


def _tokens(value: torch.Tensor, op: MergeOp, delta: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    indices = torch.tensor(op.indices, device=value.device, dtype=torch.long)
    if rows is not None:
        inside = (indices >= rows[0]) & (indices < rows[1])
        indices, delta = indices[inside] - rows[0], delta[inside]
    return value.index_copy_(0, indices, value.index_select(0, indices).lerp_(delta, op.weight))


def _get(tensors: list[torch.Tensor | None], index: int) -> torch.Tensor:
    tensor = tensors[index]
    assert tensor is not None, "the plan names this factor"
    return tensor


def _dense(whole: torch.Tensor | None, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    if whole is not None:
        return whole
    assert left is not None and right is not None
    return left @ right


def _factors(op: MergeOp, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two matrices whose product is the delta in the base tensor's own layout."""
    if op.expert is not None:
        # Fused experts: A is (r * E, in), B is (out, r * E); expert e owns rows e*r..e*r+r-1
        # of A and columns k*E + e of B.
        rank = lora_a.shape[0] // op.experts
        lora_a = lora_a[op.expert * rank : (op.expert + 1) * rank]
        lora_b = lora_b[:, op.expert :: op.experts]
        if op.rows is not None:
            lora_b = lora_b[op.rows[0] : op.rows[1]]
    if op.layout == "linear":
        return lora_b, lora_a  # (out, r) @ (r, in)
    # conv1d stores (in, out); embedding A is (r, num_embeddings) and B (dim, r): both take
    # the transpose, (B @ A)^T = A^T @ B^T.
    return lora_a.T, lora_b.T


def _dora(
    value: torch.Tensor, left: torch.Tensor, right: torch.Tensor, magnitude: torch.Tensor, op: MergeOp
) -> torch.Tensor:
    """DoRA: V = W + s * delta, rescaled so each output feature's norm equals the magnitude."""
    updated = torch.addmm(value, left, right, alpha=op.scale)
    # Output features are rows for Linear; columns for Conv1D (in, out) and Embedding (vocab, dim).
    feature_dim = 0 if op.layout == "linear" else 1
    norm = torch.linalg.vector_norm(updated, dim=1 - feature_dim)
    updated.mul_((magnitude / norm).unsqueeze(1 - feature_dim))
    return value.lerp_(updated, op.weight)


def all_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` holds no NaN or Inf. A sum is NaN or Inf whenever one of its terms
    is, so one reduction clears the common case; only a sum that is not finite (an overflow,
    or a real NaN or Inf) is looked at element by element. The sum stays in the tensor's own
    dtype: asking for float32 would first copy a 16-bit tensor whole."""
    if values.is_floating_point() and values.element_size() == 1:  # FP8 cannot be summed
        values = values.float()
    if math.isfinite(values.sum().item()):  # the 0-d sum read as a float: no second torch op
        return True
    return bool(torch.isfinite(values).all())
