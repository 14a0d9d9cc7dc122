"""Minimal edits of a JSON document: a config.json rewritten with only the keys that must
change, every other byte (order, indentation, escapes, number spelling) as it was.

``rewrite(text, wanted)`` finds the members that differ between the document and ``wanted``
(in objects nested to any depth), and edits their text alone: a changed value is replaced, a
removed member is cut with its comma, a new member is added after the last one with its
indentation. The result is checked by parsing it; where it would not parse to ``wanted``
(a shape of document this cannot edit in place), the whole document is written anew, keys in
their order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_SPACE = re.compile(r"\s*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SCALAR = re.compile(r"-?[0-9][0-9eE.+-]*|true|false|null")


@dataclass(frozen=True)
class _Member:
    key: str
    start: int  # the key's opening quote
    value_start: int
    value_end: int


def rewrite(text: str, wanted: dict[str, Any]) -> str:
    """``text`` (a JSON object) edited to hold ``wanted``, as little changed as can be."""
    try:
        edits: list[tuple[int, int, str]] = []
        _diff(text, _skip(text, 0), json.loads(text), wanted, edits)
        for begin, end, replacement in sorted(edits, reverse=True):
            text = text[:begin] + replacement + text[end:]
        if _same(json.loads(text), wanted):
            return text
    except (ValueError, IndexError):
        pass
    return json.dumps(wanted, indent=2) + "\n"


def _diff(text: str, at: int, old: dict[str, Any], new: dict[str, Any], edits: list[tuple[int, int, str]]) -> None:
    """The edits that turn the object at ``at`` (holding ``old``) into ``new``."""
    members, close = _members(text, at)
    by_key = {member.key: member for member in members}
    for index, member in enumerate(members):
        if member.key not in new:
            if index > 0:  # from the end of the previous value: its comma goes too
                edits.append((members[index - 1].value_end, member.value_end, ""))
            else:  # the first: up to the next member's key
                end = members[1].start if len(members) > 1 else close
                edits.append((member.start, end, ""))
            continue
        before, after = old[member.key], new[member.key]
        if _same(before, after):
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            _diff(text, member.value_start, before, after, edits)
        else:
            edits.append((member.value_start, member.value_end, json.dumps(after)))
    added = [key for key in new if key not in by_key]
    if added:
        kept = [member for member in members if member.key in new]
        if not kept:
            raise ValueError("an object whose every member changes name is written anew")
        last = kept[-1]
        line = text.rfind("\n", 0, last.start)
        indent = text[line + 1 : last.start] if line >= 0 and not text[line + 1 : last.start].strip() else " "
        separator = "\n" + indent if line >= 0 else " "
        insert = "".join(f",{separator}{json.dumps(key)}: {json.dumps(new[key])}" for key in added)
        edits.append((last.value_end, last.value_end, insert))


def _same(one: Any, other: Any) -> bool:
    """Equal as JSON values: true is not 1, nor 1.0 the integer 1, at any depth."""
    return json.dumps(one, sort_keys=True) == json.dumps(other, sort_keys=True)


def _members(text: str, at: int) -> tuple[list[_Member], int]:
    """The members of the object whose ``{`` is at ``at``, and where its ``}`` is."""
    if text[at] != "{":
        raise ValueError("not an object")
    members = []
    position = _skip(text, at + 1)
    if text[position] == "}":
        return members, position
    while True:
        match = _STRING.match(text, position)
        if match is None:
            raise ValueError("a key is not a string")
        key = json.loads(match.group())
        position = _skip(text, match.end())
        if text[position] != ":":
            raise ValueError("no colon after a key")
        value_start = _skip(text, position + 1)
        value_end = _value_end(text, value_start)
        members.append(_Member(key, match.start(), value_start, value_end))
        position = _skip(text, value_end)
        if text[position] == "}":
            return members, position
        if text[position] != ",":
            raise ValueError("no comma between members")
        position = _skip(text, position + 1)


def _value_end(text: str, at: int) -> int:
    """Where the JSON value beginning at ``at`` ends."""
    if text[at] == '"':
        match = _STRING.match(text, at)
        if match is None:
            raise ValueError("an unterminated string")
        return match.end()
    if text[at] in "{[":
        closing = "}" if text[at] == "{" else "]"
        position = _skip(text, at + 1)
        if text[position] == closing:
            return position + 1
        while True:
            if closing == "}":
                match = _STRING.match(text, position)
                if match is None:
                    raise ValueError("a key is not a string")
                position = _skip(text, match.end()) + 1
                position = _skip(text, position)
            position = _skip(text, _value_end(text, position))
            if text[position] == closing:
                return position + 1
            position = _skip(text, position + 1)
    match = _SCALAR.match(text, at)
    if match is None:
        raise ValueError("not a JSON value")
    return match.end()


def _skip(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    assert match is not None
    return match.end()
