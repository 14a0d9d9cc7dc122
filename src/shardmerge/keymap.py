"""Adapter tensor names -> base checkpoint tensor names, by an explicit table of rewrite rules.

Each rule turns a name as PEFT saw it (the module path plus ``.weight``/``.bias``) into a name
the checkpoint may hold. A name maps only when the rules, together, find exactly one tensor in
the checkpoint; none or several is an error the planner reports with the closest names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    rewrite: Callable[[str], str | None]
    why: str


RULES: tuple[Rule, ...] = (
    Rule("exact", lambda name: name, "the checkpoint stores the module under the name PEFT saw"),
    Rule(
        "add-model-prefix",
        lambda name: f"model.{name}",
        "adapter trained on the bare backbone (e.g. LlamaModel) merged into a *ForCausalLM checkpoint",
    ),
    Rule(
        "strip-model-prefix",
        lambda name: name.removeprefix("model.") if name.startswith("model.") else None,
        "adapter trained on a *ForCausalLM model merged into a bare backbone checkpoint",
    ),
)


@dataclass(frozen=True)
class Mapping:
    """Where a name went: the base tensor, or the reason it did not map."""

    source: str
    target: str | None
    rule: str | None
    candidates: tuple[str, ...] = ()
    closest: tuple[str, ...] = ()


def map_name(name: str, base_names: Collection[str]) -> Mapping:
    found: dict[str, str] = {}
    for rule in RULES:
        target = rule.rewrite(name)
        if target is not None and target in base_names and target not in found:
            found[target] = rule.name
    if len(found) == 1:
        ((target, rule_name),) = found.items()
        return Mapping(name, target, rule_name)
    if found:
        return Mapping(name, None, None, candidates=tuple(found))
    closest = difflib.get_close_matches(name, list(base_names), n=3, cutoff=0.5)
    return Mapping(name, None, None, closest=tuple(closest))
