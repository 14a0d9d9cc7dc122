"""``--combine``: the job's method and parameters as the plan's Combine, what it refuses, and
the combined tensors marked with their passes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..config import MergeJob
from ..errors import InputError, PlanError, ShardmergeError
from .adapters import Adapter
from .model import Combine, MergeOp, ShardPlan

# What each kind of op is, for a refusal: none is an additive update, a task vector.
_NOT_ADDITIVE = {
    "replace": "replaces the tensor whole (modules_to_save, or a tensor saved whole)",
    "tokens": "replaces rows (trainable tokens)",
    "ia3": "scales the tensor (IA3)",
    "dora": "rescales each output feature to its magnitude vector (DoRA), which depends on the base weight's norms",
}


def combine_of(job: MergeJob, adapters: list[Adapter]) -> Combine | None:
    """The plan's Combine for ``job``; None where the adapters simply apply in turn."""
    if job.combine == "linear" and not job.normalize:
        return None
    count = len(job.adapters)
    weights = [1.0] * count
    densities = [1.0] * count
    for adapter in adapters:
        spec = job.adapters[adapter.index]
        weights[adapter.index] = adapter.weight
        densities[adapter.index] = spec.density or job.density or 1.0
    return Combine(
        method=job.combine,
        weights=tuple(weights),
        densities=tuple(densities),
        seed=job.seed or 0,
        gamma=0.01 if job.gamma is None else job.gamma,
        election=(job.sign_election or "sum") if job.combine.endswith("ties") else None,
        normalize=job.combine == "ties" if job.normalize is None else job.normalize,
    )


def check_combinable(
    combine: Combine, ops: Mapping[str, list[MergeOp]], adapters: list[Adapter], problems: list[ShardmergeError]
) -> None:
    """Refuse, one problem a tensor, what the combination is not defined on: every op must be
    an additive update."""
    files = {adapter.index: adapter.files.weights for adapter in adapters}
    method = combine.method
    for name, tensor_ops in ops.items():
        op = next((op for op in tensor_ops if op.kind in _NOT_ADDITIVE), None)
        if op is not None:
            problems.append(
                InputError(
                    f"adapter {op.adapter}'s {op.module} {_NOT_ADDITIVE[op.kind]}: --combine {method} combines "
                    "additive updates (task vectors) only",
                    file=files[op.adapter],
                    tensor=name,
                    hint="merge with --combine linear, which applies the adapters in turn",
                )
            )


def mark_combined(shards: tuple[ShardPlan, ...], combine: Combine) -> tuple[ShardPlan, ...]:
    """``shards`` with every merged tensor marked combined, with its passes. Refuses a merged
    quantized weight that is written back in its format, or of a packed format: only a
    weight dequantized through a grid of scales is combined."""
    refused = [
        InputError(
            f"--combine {combine.method} merges into a quantized weight only where it is dequantized, and not "
            "into one of a packed format yet",
            tensor=tensor.name,
            hint="merge with --combine linear, or with --dtype bfloat16 into a base of a format with scales "
            "beside its values (FP8)",
        )
        for shard in shards
        for tensor in shard.tensors
        if tensor.ops and tensor.quant is not None and (tensor.requantized or tensor.packed)
    ]
    if refused:
        raise PlanError(refused)
    return tuple(
        dataclasses.replace(
            shard,
            tensors=tuple(
                dataclasses.replace(tensor, combined=True, passes=combine.passes({op.adapter for op in tensor.ops}))
                if tensor.ops
                else tensor
                for tensor in shard.tensors
            ),
        )
        for shard in shards
    )
