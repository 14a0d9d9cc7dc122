"""A checkpoint's tensor names -> the model's, by transformers v5's own conversion rules.

transformers loads some checkpoints under other names and layouts than they have on disk
(DeepSeek-V4's ``attn.wq_b`` is the model's ``self_attn.q_b_proj``; Granite 4.0 stores its
fused experts as ``block_sparse_moe.input_linear``; Qwen3-VL-MoE's releases store fused
experts [experts, in, out]). Its rules per model type, read as data from a snapshot the tests
check against the installed transformers, rename the base's tensors here as transformers
renames them on load, so an adapter's names (the model's) find the tensors on disk. The
output keeps the base's own names and layouts.

Renamings are applied in turn, then at most one converter, as transformers applies them. A
converter is followed only where its inverse is exact and known here: a transpose of fused
experts (the orientation is then decided per checkpoint), and experts stored one by one
(which the expert rules already split into). A tensor any other converter builds (a rotary
permutation, a split, a concatenation of other names) is refused when an adapter targets it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

_SNAPSHOT = "transformers_conversions.json"
# Transforms whose effect is a regular expression and a replacement; any other class (a
# renaming activated by another key, an index offset) is not read, nor the model type's rules.
_PLAIN = frozenset({"WeightRenaming", "PrefixChange", "WeightConverter"})
# Converters that gather experts stored one by one into a fused tensor: the per-expert
# tensors keep their (renamed) names, which the expert rules split a fused update into.
_GATHER = frozenset({"MergeModulelist", "Concatenate"})
_STACKED = "MergeModulelist"


@dataclass(frozen=True)
class Transform:
    kind: str  # "rename" or "convert"
    pattern: re.Pattern[str]
    targets: tuple[str, ...]
    operations: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Transform:
        pattern = re.compile(entry["pattern"])
        return cls(entry["kind"], pattern, tuple(entry["targets"]), tuple(entry["operations"]))

    def apply(self, key: str) -> str | None:
        """``key`` renamed as transformers' ``rename_source_key`` renames it (to the first
        target); None if no match."""
        names = self.apply_all(key)
        return names[0] if names else None

    def apply_all(self, key: str) -> list[str]:
        """Every name the tensor ``key`` becomes (a converter may split it into several)."""
        match = self.pattern.search(key)
        if match is None:
            return []
        names = []
        for replacement in self.targets:
            if "\\1" in replacement:
                group = next(name for name, value in match.groupdict().items() if value is not None)
                replacement = replacement.replace("\\1", match.group(self.pattern.groupindex[group] + 1))
            names.append(key.replace(match.group(0), replacement, 1))
        return names

    def describe(self) -> str:
        return ", ".join(_op(op) for op in self.operations)


def _op(op: dict[str, Any]) -> str:
    args = ", ".join(f"{name}={value}" for name, value in sorted(op.items()) if name != "op")
    return f"{op['op']}({args})"


@cache
def _table() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(_SNAPSHOT).read_text())


def rules_for(config: dict[str, Any] | None) -> tuple[str, tuple[Transform, ...]] | None:
    """The conversion rules transformers applies to the checkpoint of ``config``'s model (its
    class's, else its model type's, as transformers looks them up, and the legacy renamings it
    adds to every model), and the name they are filed under; None where they cannot be read as
    data here."""
    if not isinstance(config, dict):
        return None
    table = _table()
    architectures = config.get("architectures")
    keys = [name for name in architectures if isinstance(name, str)] if isinstance(architectures, list) else []
    keys = [*keys[:1], config.get("model_type")]
    found = next((key for key in keys if isinstance(key, str) and key in table["aliases"]), None)
    if isinstance(config.get("auto_map"), dict):  # custom code: transformers skips its rules
        found = None
    entries = table["rules"][table["aliases"][found]] if found is not None else []
    entries = entries + table["rules"][table["aliases"]["legacy"]]  # transformers adds these to every model
    if any(entry["class"] not in _PLAIN for entry in entries):
        return None
    return found or "every model (legacy)", tuple(Transform.of(entry) for entry in entries)


@dataclass(frozen=True)
class Converted:
    """A model tensor that a converter builds from checkpoint tensors, not inverted here."""

    source: str  # one checkpoint tensor it is built from
    operations: str


@dataclass(frozen=True)
class CheckpointNames:
    """The base's tensors under the model's names where transformers renames them."""

    rules: str = ""  # what the rules are filed under; empty where there are none
    # model name -> checkpoint name, for every tensor the rules rename
    renamed: dict[str, str] = field(default_factory=dict)
    # checkpoint name -> whether the fused expert tensor is stored [experts, in, out]; None
    # where a transpose the loader decides by shape cannot be told from this checkpoint
    transposed: dict[str, bool | None] = field(default_factory=dict)
    converted: dict[str, Converted] = field(default_factory=dict)

    def note(self) -> str | None:
        if not self.renamed and not self.transposed:
            return None
        flipped = sorted(name for name, value in self.transposed.items() if value)
        layout = f"; fused experts stored [experts, in, out]: {len(flipped)} tensors" if flipped else ""
        return (
            f"checkpoint names read with transformers' conversion rules for {self.rules}: "
            f"{len(self.renamed)} tensors stored under other names{layout}; the output keeps the base's names"
        )


def checkpoint_names(
    config: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]], model_transposed: bool | None
) -> CheckpointNames:
    """Apply the rules of ``config``'s model to the base's tensor names (with their
    ``shapes``). ``model_transposed``: whether the model's own fused experts are
    [experts, in, out] (None where unknown)."""
    found = rules_for(config)
    if found is None:
        return CheckpointNames()
    rules, transforms = found
    renamings = [transform for transform in transforms if transform.kind == "rename"]
    converters = [transform for transform in transforms if transform.kind == "convert"]
    renamed: dict[str, list[str]] = defaultdict(list)
    transposes: dict[str, bool] = {}  # checkpoint name -> whether the loader decides by shape
    converted: dict[str, Converted] = {}
    for name in shapes:
        model = name
        for renaming in renamings:
            model = renaming.apply(model) or model
        for converter in converters:
            target = converter.apply(model)
            if target is None:
                continue
            ops = {op["op"] for op in converter.operations}
            if ops == {"Transpose"} and _expert_transpose(converter, shapes[name]):
                transposes[name] = bool(converter.operations[0].get("check_dims"))
                model = target
            elif not (ops <= _GATHER and _STACKED in ops):
                for built in converter.apply_all(model):
                    converted.setdefault(built, Converted(name, converter.describe()))
            break
        if model != name:
            renamed[model].append(name)
    orientation = _orientation(transposes, shapes, model_transposed)
    return CheckpointNames(
        rules,
        {model: names[0] for model, names in renamed.items() if len(names) == 1},
        orientation,
        converted,
    )


def _expert_transpose(converter: Transform, shape: tuple[int, ...]) -> bool:
    """Whether ``converter`` swaps the two matrix dimensions of a fused 3-D expert tensor."""
    ops = converter.operations
    return len(ops) == 1 and len(shape) == 3 and {ops[0].get("dim0"), ops[0].get("dim1")} == {1, 2}


def _orientation(
    transposes: dict[str, bool], shapes: dict[str, tuple[int, ...]], model_transposed: bool | None
) -> dict[str, bool | None]:
    """Whether each fused expert tensor a transpose converter matches is stored
    [experts, in, out]. A transpose applied always is the model's layout swapped. One applied
    only where the stored shape differs from the model's keeps a square tensor as stored (the
    model trained on it as such); any other is decided for the whole checkpoint by each
    layer's pair of fused tensors: [experts, 2 * inter, hidden] and [experts, hidden, inter]
    as [out, in], [experts, hidden, 2 * inter] and [experts, inter, hidden] as [in, out]."""
    result: dict[str, bool | None] = {}
    decided: set[bool] = set()
    for name, by_shape in transposes.items():
        if not by_shape:
            result[name] = None if model_transposed is None else not model_transposed
            continue
        parent, _, leaf = name.rpartition(".")
        pair = {"gate_up_proj": "down_proj", "down_proj": "gate_up_proj"}.get(leaf)
        other = shapes.get(f"{parent}.{pair}") if pair else None
        if other is None or len(other) != 3:
            continue
        gate_up, down = (shapes[name], other) if leaf == "gate_up_proj" else (other, shapes[name])
        out_in = gate_up[2] == down[1] and gate_up[1] != down[2]
        in_out = gate_up[1] == down[2] and gate_up[2] != down[1]
        if out_in != in_out:
            decided.add(in_out)
    checkpoint = decided.pop() if len(decided) == 1 else None
    for name, by_shape in transposes.items():
        if by_shape:
            result[name] = False if shapes[name][1] == shapes[name][2] else checkpoint
    return result
