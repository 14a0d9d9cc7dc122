"""Adapter tensor names -> base checkpoint tensor names, by an explicit table of rewrite rules.

A name is what PEFT saw: the module path in the model the adapter was trained on, plus
``.weight``/``.bias``. transformers v5 loads some checkpoints under other names than the ones
on disk (vision-language models, MoE blocks), and adapters trained on older versions carry
the older names, so a name may need one prefix rule and one infix rule to reach the
checkpoint. Every combination is tried; the name maps only when exactly one base tensor fits.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    replacement: str
    why: str

    def apply(self, name: str) -> str | None:
        rewritten, count = self.pattern.subn(self.replacement, name, count=1)
        return rewritten if count else None


def _rule(name: str, pattern: str, replacement: str, why: str) -> Rule:
    return Rule(name, re.compile(pattern), replacement, why)


# At most one of these rewrites the start of a name.
PREFIX_RULES: tuple[Rule, ...] = (
    _rule(
        "add-model-prefix", r"^", "model.", "adapter trained on the bare backbone (LlamaModel), base is *ForCausalLM"
    ),
    _rule("strip-model-prefix", r"^model\.", "", "adapter trained on *ForCausalLM, base is the bare backbone"),
    _rule(
        "llava-language-model",
        r"^model\.language_model\.",
        "language_model.model.",
        "LLaVA-style VLM: transformers v5 module model.language_model.* is stored as language_model.model.*",
    ),
    _rule(
        "llava-lm-head",
        r"^lm_head\.",
        "language_model.lm_head.",
        "LLaVA-style VLM: v5 lm_head is stored under language_model",
    ),
    _rule("llava-vision-tower", r"^model\.vision_tower\.", "vision_tower.", "LLaVA-style VLM: v5 model.vision_tower.*"),
    _rule(
        "gemma3-vision-model",
        r"^model\.vision_tower\.(?!vision_model\.)",
        "vision_tower.vision_model.",
        "Gemma 3's published checkpoints: v5 model.vision_tower.* is stored as vision_tower.vision_model.*",
    ),
    _rule(
        "backbone-prefix",
        r"^model\.",
        "backbone.",
        "Nemotron-H / Mamba-style checkpoints: v5 model.* is stored as backbone.*",
    ),
    _rule(
        "llava-projector",
        r"^model\.multi_modal_projector\.",
        "multi_modal_projector.",
        "LLaVA-style VLM: v5 model.multi_modal_projector.*",
    ),
    _rule(
        "qwen2vl-language-model",
        r"^model\.language_model\.",
        "model.",
        "Qwen2-VL-style VLM: v5 module model.language_model.* is stored as model.*",
    ),
    _rule(
        "qwen2vl-visual", r"^model\.visual\.", "visual.", "Qwen2-VL-style VLM: v5 model.visual.* is stored as visual.*"
    ),
    _rule(
        "llava-language-model-v5-checkpoint",
        r"^language_model\.model\.",
        "model.language_model.",
        "adapter from before transformers v5, LLaVA-style checkpoint saved in the v5 layout",
    ),
    _rule(
        "llava-lm-head-v5-checkpoint",
        r"^language_model\.lm_head\.",
        "lm_head.",
        "adapter from before transformers v5, LLaVA-style checkpoint saved in the v5 layout",
    ),
    _rule(
        "llava-vision-tower-v5-checkpoint",
        r"^vision_tower\.",
        "model.vision_tower.",
        "adapter from before transformers v5, checkpoint saved in the v5 layout",
    ),
    _rule(
        "llava-projector-v5-checkpoint",
        r"^multi_modal_projector\.",
        "model.multi_modal_projector.",
        "adapter from before transformers v5, checkpoint saved in the v5 layout",
    ),
    _rule(
        "qwen2vl-visual-v5-checkpoint",
        r"^visual\.",
        "model.visual.",
        "adapter from before transformers v5, Qwen2-VL-style checkpoint saved in the v5 layout",
    ),
    _rule(
        "qwen2vl-language-model-v5-checkpoint",
        r"^model\.(?!language_model\.|visual\.)",
        "model.language_model.",
        "adapter from before transformers v5, Qwen2-VL-style checkpoint saved in the v5 layout",
    ),
)

# At most one of these rewrites the inside of a name.
INFIX_RULES: tuple[Rule, ...] = (
    _rule(
        "mixtral-moe-block",
        r"\.mlp\.",
        ".block_sparse_moe.",
        "Mixtral: transformers v5 module mlp.* is stored as block_sparse_moe.*",
    ),
    _rule(
        "mixtral-moe-block-v5-checkpoint",
        r"\.block_sparse_moe\.",
        ".mlp.",
        "Mixtral adapter from before transformers v5, checkpoint saved in the v5 layout",
    ),
)


@dataclass(frozen=True)
class Mapping:
    """Where a name went: the base tensor and the rule that took it there, or every candidate."""

    target: str | None
    rule: str | None
    candidates: tuple[str, ...] = ()


def candidates(name: str) -> dict[str, str]:
    """Every name the rules can turn ``name`` into, with the rule (or rules) that did it."""
    found = {name: "exact"}
    for prefix in (None, *PREFIX_RULES):
        head = prefix.apply(name) if prefix else name
        if head is None:
            continue
        for infix in (None, *INFIX_RULES):
            full = infix.apply(head) if infix else head
            if full is not None and full not in found:
                found[full] = "+".join(rule.name for rule in (prefix, infix) if rule)
    return found


def map_name(name: str, base_names: Collection[str], renamed: dict[str, str] | None = None) -> Mapping:
    """The base tensor ``name`` maps to. ``renamed``: the model's names of base tensors that
    transformers' conversion rules rename on load (see ``conversions``), to their own names."""
    found = candidates(name)
    hits = {target: rule for target, rule in found.items() if target in base_names}
    for target, rule in found.items():
        stored = renamed.get(target) if renamed else None
        if stored is not None and stored in base_names:
            hits.setdefault(stored, "transformers-rules" if rule == "exact" else f"{rule}+transformers-rules")
    if len(hits) == 1:
        ((target, rule),) = hits.items()
        return Mapping(target, rule)
    return Mapping(None, None, candidates=tuple(hits))


def closest_names(name: str, base_names: Collection[str], count: int = 3) -> list[str]:
    """Base names most like ``name``, for error messages; searches names with the same last
    two components first, which keeps this fast on checkpoints with 100k tensors."""
    tail = ".".join(name.split(".")[-2:])
    pool = [base for base in base_names if base.endswith(tail)] or list(base_names)
    return difflib.get_close_matches(name, pool, n=count, cutoff=0.5)
