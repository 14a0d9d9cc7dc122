"""Refresh the snapshots of transformers' tables that shardmerge reads as data: the model
types it implements, and its checkpoint conversion rules (how a checkpoint's tensor names and
layouts become the model's when it loads them). The tests check both against the installed
transformers; after raising its pin, run ``python scripts/transformers_tables.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLANNING = Path(__file__).resolve().parent.parent / "src" / "shardmerge" / "planning"
MODEL_TYPES = PLANNING / "transformers_model_types.txt"
CONVERSIONS = PLANNING / "transformers_conversions.json"


def model_types() -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return "".join(f"{name}\n" for name in sorted(CONFIG_MAPPING_NAMES))


def _operation(op: Any) -> dict[str, Any]:
    fields = {name: getattr(op, name) for name in getattr(op, "__slots__", ()) if hasattr(op, name)}
    if hasattr(op, "__dict__"):
        fields |= {name: value for name, value in vars(op).items() if not name.startswith("_")}
    simple = {name: value for name, value in fields.items() if isinstance(value, (bool, int, float, str, type(None)))}
    listed = {name: list(value) for name, value in fields.items() if isinstance(value, (tuple, list))}
    return {"op": type(op).__name__, **simple, **listed}


def _transform(transform: Any) -> dict[str, Any]:
    from transformers.core_model_loading import WeightConverter

    return {
        "kind": "convert" if isinstance(transform, WeightConverter) else "rename",
        "class": type(transform).__name__,
        "pattern": transform.compiled_sources.pattern,
        "targets": list(transform.target_patterns),
        "operations": [_operation(op) for op in getattr(transform, "operations", ())],
    }


def conversions() -> str:
    """Every model type's and class's rules, each distinct list once: ``aliases`` names the
    list (by its first key) that each key has."""
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping, get_checkpoint_conversion_mapping

    rules: dict[str, list[dict[str, Any]]] = {}
    aliases: dict[str, str] = {}
    for key in sorted(_build_checkpoint_conversion_mapping()):
        entries = [_transform(transform) for transform in get_checkpoint_conversion_mapping(key)]
        aliases[key] = next((name for name, known in rules.items() if known == entries), key)
        rules.setdefault(aliases[key], entries)
    lines = [
        f" {json.dumps(key)}: [\n" + ",\n".join(f"  {json.dumps(entry, sort_keys=True)}" for entry in entries) + "\n ]"
        for key, entries in rules.items()
    ]
    return '{"aliases": ' + json.dumps(aliases, indent=1) + ',\n"rules": {\n' + ",\n".join(lines) + "\n}}\n"


def main() -> None:
    MODEL_TYPES.write_text(model_types())
    CONVERSIONS.write_text(conversions())


if __name__ == "__main__":
    main()
