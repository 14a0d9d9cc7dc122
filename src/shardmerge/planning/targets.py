"""Which modules an adapter's config targets, as PEFT decides it, against the modules its
weights hold.

PEFT builds an adapter's layers from ``adapter_config.json`` and then loads the weights into
them, ignoring weights of modules it did not build and leaving modules without weights as
they were initialised: a config whose ``target_modules`` matches no module is refused
(``Target modules ... not found in the base model``), one that targets a module the weights
do not cover loads with a warning and that module untrained (or random, with
``init_lora_weights: false``), and weights of a module the config does not target are
dropped. So the config and the weights must agree, or the adapter is not what it says:
shardmerge refuses both ways. Matching follows PEFT's ``check_target_module_exists``: a
string is a regular expression the whole module name must match, a list holds names a module
name equals or ends with (after a dot); ``exclude_modules``, ``modules_to_save`` and
``layers_to_transform`` narrow it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

_LAYER = re.compile(r".*?\.[^.]*\.(?P<index>\d+)\.")
_EXPERT = re.compile(r"\.experts\.\d+\.")


def named(path: str, name: str) -> bool:
    """Whether module ``path`` is the one a list of module names calls ``name``, as PEFT reads
    it: the whole path, or its end after a dot."""
    return path == name or path.endswith(f".{name}")


def targeted(config: dict[str, Any], path: str) -> bool:
    """Whether PEFT would put an adapter layer on module ``path`` of the model by this config's
    ``target_modules`` (``all-linear`` counts every module)."""
    if _excluded(config, path):
        return False
    spec = config.get("target_modules")
    if isinstance(spec, str):
        return spec.lower() == "all-linear" or re.fullmatch(spec, path) is not None
    if not spec:
        return False
    if path in spec:
        return True
    return any(named(path, name) for name in spec) and _in_layers(config, path)


def uncovered(
    config: dict[str, Any], base_modules: Collection[str], covered: Iterable[str]
) -> list[tuple[str, list[str]]]:
    """The names of a list ``target_modules`` that modules of the base answer to (checkpoint
    names: matched by their end, which checkpoints and models share) while no module the
    weights cover does, each with those base modules. Experts stored one by one
    (``experts.3.gate_proj``) do not count: transformers v5 fuses them into parameters of one
    module, which a name in ``target_modules`` does not reach."""
    spec = config.get("target_modules")
    if not isinstance(spec, list):
        return []
    covered = set(covered)
    found = []
    for name in spec:
        if any(named(module, name) for module in covered):
            continue
        modules = [
            module
            for module in base_modules
            if named(module, name) and not _excluded(config, module) and not _EXPERT.search(module)
        ]
        if modules and any(_in_layers(config, module) for module in modules):
            found.append((name, sorted(modules)))
    return found


def _excluded(config: dict[str, Any], path: str) -> bool:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, path):
        return True
    if isinstance(exclude, list) and any(named(path, name) for name in exclude):
        return True
    saved = config.get("modules_to_save") or []
    return isinstance(saved, list) and any(
        isinstance(name, str) and re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", path) for name in saved
    )


def _in_layers(config: dict[str, Any], path: str) -> bool:
    """Whether ``path`` is in a layer ``layers_to_transform`` keeps (every one, without it)."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns:
        matches = [re.match(rf"(?:^|.*?\.){pattern}\.(?P<index>\d+)\.", path) for pattern in patterns]
        match = next((m for m in matches if m), None)
    else:
        match = _LAYER.match(path)
    if match is None:
        return False
    index = int(match["index"])
    return index == layers if isinstance(layers, int) else index in layers
