"""``--combine`` against mergekit's rules applied to full models that PEFT merged one adapter
at a time (task vectors tau_i = merged_i - base), tensor by tensor and by logits.

mergekit itself is not installed (it pins a newer transformers and brings datasets and
pandas): ``mergekit_merge`` below restates its rules from its source, release 0.1.5, with the
file and function of each. Two choices are shardmerge's and the oracle follows them: equal
magnitudes rank by position (mergekit's ``torch.argsort`` leaves their order to torch), and
DARE's mask is the documented generator of ``shardmerge.run.random_mask``, drawn here for the
whole tensor at once from its description.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import shardmerge
from conftest import (
    Base,
    assert_same_logits,
    assert_within_tolerance,
    load_fp32,
    peft_reference,
    read_output,
    save_adapter,
)

ADAPTERS = {  # overlapping (q_proj, down_proj) and disjoint (gate_proj, up_proj, k_proj) targets
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "b": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"]},
    "c": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "gate_proj", "up_proj"]},
}


@dataclass(frozen=True)
class Inputs:
    base: Base
    adapters: dict[str, Path]
    base_tensors: dict[str, torch.Tensor]
    task_vectors: dict[str, dict[str, torch.Tensor]]  # by adapter: merged_i - base, every tensor


def _inputs(base: Base, root: Path, dyadic: bool) -> Inputs:
    adapters = {
        name: save_adapter(base, root / name, seed=11 + i, **config)
        for i, (name, config) in enumerate(ADAPTERS.items())
    }
    if dyadic:
        for folder in adapters.values():
            _round(folder / "adapter_model.safetensors", 2**-5)
    base_tensors = load_file(base.path / "model.safetensors")
    task_vectors = {}
    for name, folder in adapters.items():
        merged = peft_reference(base, [(folder, 1.0)]).state_dict()
        task_vectors[name] = {key: merged[key] - value for key, value in base_tensors.items()}
    return Inputs(base, adapters, base_tensors, task_vectors)


def _round(file: Path, step: float) -> None:
    """Every value of ``file`` a small multiple of ``step``: sums and products of them are exact,
    and many magnitudes are equal."""
    save_file({key: (value / step).round().clamp(-6, 6) * step for key, value in load_file(file).items()}, file)


@pytest.fixture(scope="module")
def inputs(models, tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return _inputs(models("llama-fp32"), tmp_path_factory.mktemp("combine"), dyadic=False)


@pytest.fixture(scope="module")
def dyadic(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """A base and adapters of few distinct values, so that PEFT's merge is exact and thresholds
    fall among many equal magnitudes."""
    from conftest import llama_config, save_base

    root = tmp_path_factory.mktemp("dyadic")
    base = save_base(llama_config(), root / "base", torch.float32, seed=5, shard_kb=None)
    _round(base.path / "model.safetensors", 2**-10)
    return _inputs(base, root, dyadic=True)


# --- mergekit's rules (release 0.1.5) -----------------------------------------------------


def _descending(tau: torch.Tensor) -> torch.Tensor:
    """Flat positions by magnitude, largest first; equal magnitudes by position."""
    return torch.sort(-tau.abs().reshape(-1), stable=True).indices


def _dare_mask(seed: int, adapter: int, name: str, count: int, density: float) -> torch.Tensor:
    """shardmerge's documented DARE mask of a whole tensor: Philox4x64-10 keyed by sha256 of
    "seed:adapter:name", 64-bit outputs from the stream's start cut into 16-bit numbers, the
    lowest bits first."""
    key = np.frombuffer(hashlib.sha256(f"{seed}:{adapter}:{name}".encode()).digest()[:16], dtype="<u8")
    raw = np.random.Philox(key=key).random_raw((count + 3) // 4)
    numbers = [(int(word) >> (16 * lane)) & 0xFFFF for word in raw for lane in range(4)][:count]
    return torch.tensor(numbers) < math.ceil(density * 2**16)


def _sparsify(
    tau: torch.Tensor, density: float, method: str, gamma: float, seed: int, adapter: int, name: str
) -> torch.Tensor:
    """mergekit/sparsify.py, ``sparsify``: ``magnitude``, ``magnitude_outliers`` and ``bernoulli``
    (the last with ``rescaled_masked_tensor``'s L1 rescale, mergekit's ``rescale: true``)."""
    if density >= 1:
        return tau
    count = tau.numel()
    mask = torch.zeros(count)
    if method == "magnitude":
        k = max(1, int(density * count))
        mask[_descending(tau)[:k]] = 1
    elif method == "magnitude_outliers":
        target, top = int(density * count), int(gamma * count)
        bottom = max(0, count - target - top)
        mask[_descending(tau).flip(0)[bottom : bottom + target]] = 1
    else:
        masked = tau * _dare_mask(seed, adapter, name, count, density).reshape(tau.shape)
        before, after = tau.abs().sum(), masked.abs().sum()
        return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)
    return tau * mask.reshape(tau.shape)


# mergekit/merge_methods/registry.py: each method's pruning, sign consensus and default normalize
_METHODS = {
    "linear": (None, None, False),  # task_arithmetic
    "ties": ("magnitude", "sum", True),
    "dare_linear": ("bernoulli", None, False),
    "dare_ties": ("bernoulli", "sum", False),
    "breadcrumbs": ("magnitude_outliers", None, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False),
}


def mergekit_merge(
    base: torch.Tensor,
    taus: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    method: str,
    name: str,
    *,
    seed: int = 0,
    gamma: float = 0.01,
    sign_election: str | None = None,
    normalize: bool | None = None,
) -> torch.Tensor:
    """mergekit/merge_methods/generalized_task_arithmetic.py, ``GTATask.execute`` and
    ``get_mask``: prune each task vector, weight it, keep where its sign agrees with the
    elected one, sum, divide by the weights summed alike."""
    pruning, consensus, default_normalize = _METHODS[method]
    if consensus is not None and sign_election is not None:
        consensus = sign_election
    normalize = default_normalize if normalize is None else normalize
    deltas = torch.stack(
        [
            tau if pruning is None else _sparsify(tau, d, pruning, gamma, seed, adapter, name)
            for adapter, (tau, d) in enumerate(zip(taus, densities, strict=True))
        ]
    )
    weight = torch.tensor(weights).reshape(-1, *[1] * base.dim())
    weighted = deltas * weight
    if consensus is not None:
        sign = weighted.sign()
        votes = weighted if consensus == "sum" else sign
        majority = (votes.sum(dim=0) >= 0).float() * 2 - 1
        mask = sign == majority
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weight * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + mixed


# --- the tests --------------------------------------------------------------------------------


def _expected(inputs: Inputs, names: list[str], weights: list[float], densities: list[float], method: str, **options):
    return {
        key: mergekit_merge(
            base, [inputs.task_vectors[n][key] for n in names], weights, densities, method, key, **options
        )
        for key, base in inputs.base_tensors.items()
    }


def _merge(inputs: Inputs, out: Path, names: list[str], weights: list[float], densities: list[float], **job) -> Path:
    adapters = [
        {"path": str(inputs.adapters[n]), "weight": w, "density": d}
        for n, w, d in zip(names, weights, densities, strict=True)
    ]
    if job.get("combine", "linear") == "linear":
        adapters = [{k: v for k, v in adapter.items() if k != "density"} for adapter in adapters]
    shardmerge.merge(base=str(inputs.base.path), adapters=adapters, output=str(out), **job)
    return out


CASES = [
    ("ties", ["a", "b", "c"], [1.0, 0.7, 0.5], [0.5, 0.5, 0.5], {}),
    ("ties", ["a", "b"], [1.0, -0.6], [0.3, 0.7], {"sign_election": "count", "normalize": False}),
    ("breadcrumbs", ["a", "b"], [0.8, 0.6], [0.6, 0.4], {"gamma": 0.05}),
    ("breadcrumbs_ties", ["a", "b", "c"], [1.0, 1.0, 1.0], [0.7, 0.5, 0.9], {}),
    ("dare_ties", ["a", "b", "c"], [1.0, 0.7, 0.5], [0.5, 0.3, 0.6], {"seed": 7}),
    ("dare_linear", ["a", "b"], [0.5, 0.5], [0.4, 0.4], {"normalize": True}),
    ("linear", ["a", "b", "c"], [1.0, 0.5, 0.5], [1.0, 1.0, 1.0], {"normalize": True}),
    ("linear", ["a", "b", "c"], [1.0, 0.5, -0.5], [1.0, 1.0, 1.0], {}),  # task_arithmetic: in turn, as always
]


@pytest.mark.parametrize(("method", "names", "weights", "densities", "options"), CASES, ids=lambda c: str(c))
def test_combined_as_mergekit_combines_the_merged_models(
    inputs: Inputs, tmp_path: Path, small_blocks: None, method, names, weights, densities, options
) -> None:
    out = _merge(inputs, tmp_path / "out", names, weights, densities, combine=method, **options)
    expected = _expected(inputs, names, weights, densities, method, **options)
    ours = read_output(out)
    assert set(ours) == set(expected)
    changed = 0
    for key, value in ours.items():
        assert_within_tolerance(key, value, expected[key])
        changed += not torch.equal(value, inputs.base_tensors[key])
    targets = {module for name in names for module in ADAPTERS[name]["target_modules"]}
    assert changed == 2 * len(targets)  # in each of the two layers


def test_the_combined_model_gives_the_oracle_logits(inputs: Inputs, tmp_path: Path) -> None:
    names, weights, densities = ["a", "b", "c"], [1.0, 0.7, 0.5], [0.5, 0.4, 0.6]
    out = _merge(inputs, tmp_path / "out", names, weights, densities, combine="ties", dtype="bfloat16")
    reference = load_fp32(inputs.base.path)
    reference.load_state_dict(_expected(inputs, names, weights, densities, "ties"), strict=False)
    assert_same_logits(out, reference, torch.bfloat16)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_thresholds_among_equal_magnitudes_keep_the_earliest(
    dyadic: Inputs, tmp_path: Path, small_blocks: None, method: str
) -> None:
    names, weights, densities = ["a", "b", "c"], [1.0, 0.5, 0.25], [0.35, 0.5, 0.2]
    options = {"gamma": 0.1} if method.startswith("breadcrumbs") else {}
    out = _merge(dyadic, tmp_path / "out", names, weights, densities, combine=method, **options)
    expected = _expected(dyadic, names, weights, densities, method, **options)
    for key, value in read_output(out).items():
        assert torch.equal(value, expected[key]), key  # every step exact: the same bits
