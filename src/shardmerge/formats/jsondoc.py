"""JSON from strangers: configs, indexes, safetensors headers and journals, parsed strictly.

Python's parser takes what JSON forbids and what a config never needs: ``NaN`` and
``Infinity`` (a NaN ``lora_alpha`` would merge at another scale) or ``1e999`` (read as
infinity), a key given twice (the last silently wins), text in UTF-16 or UTF-32, and
nesting as deep as the interpreter's stack (100,000 levels raise a ``RecursionError``).
``parse`` refuses each with a ``ValueError`` of one line, which the reader of each file turns
into an error naming it. A real config nests a few levels; 64 is far beyond any.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64


def parse(data: str | bytes) -> Any:
    """``data`` (bytes: UTF-8, as JSON files are) as a JSON document: standard JSON only, no
    number out of float range (``1e999``), no key twice in an object, at most MAX_DEPTH levels
    deep."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, object_pairs_hook=_object)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(value)
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a number")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in one object")
            seen.add(key)
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
