"""JSON from strangers: configs, indexes, safetensors headers and journals, parsed strictly.

Python's parser takes what JSON forbids and what a config never needs: ``NaN`` and
``Infinity`` (a NaN ``lora_alpha`` would merge at another scale), a key given twice (the last
silently wins), and nesting as deep as the interpreter's stack (100,000 levels raise a
``RecursionError``). ``parse`` refuses each with a ``ValueError`` of one line, which the
reader of each file turns into an error naming it. A real config nests a few levels; 64 is
far beyond any.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64


def parse(data: str | bytes) -> Any:
    """``data`` as a JSON document: standard JSON only, no key twice in an object, at most
    MAX_DEPTH levels deep."""
    try:
        value = json.loads(data, parse_constant=_constant, object_pairs_hook=_object)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(value)
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        keys = [key for key, _ in pairs]
        twice = next(key for index, key in enumerate(keys) if key in keys[:index])
        raise ValueError(f"key {twice!r} appears twice in one object")
    return value


def _check_depth(value: Any) -> None:
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return
    raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
