"""Which modules a base's custom modelling code (``auto_map`` in ``config.json``) builds as
``nn.Linear`` and which as transformers' GPT-2 ``Conv1D``: read from its Python files in the
base folder, parsed and never run.

Every assignment ``self.NAME = CALL(...)`` in the files counts: a module name is ``nn.Linear``
when each one builds torch's ``nn.Linear`` (or a class of the files that derives from it alone
and changes nothing of how it stores its weight), and ``Conv1D`` when each one builds
transformers' ``Conv1D``, as the files' imports name them. A name built both ways, by another call (a
helper function, a class of another package, a conditional), or not found at all stays
undecided, and its square weights are refused as before.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShardmergeError
from ..formats.confined import read_input

# A modelling file is read into memory and parsed: its size is the sender's to choose.
MAX_CODE_BYTES = 4 << 20
# Files the code may span: those auto_map names and the local modules they import.
_MAX_FILES = 16
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class CustomCode:
    """What the files say: module name -> whether it is a Conv1D (None: undecided), the files
    read, and why nothing was decided where nothing was."""

    modules: dict[str, bool | None]
    files: tuple[str, ...]
    unread: str = ""


def read_custom_code(folder: Path, config: dict[str, Any]) -> CustomCode:
    """Parse the modelling files ``config``'s ``auto_map`` names, in ``folder``."""
    auto_map = config.get("auto_map")
    names = [value for value in auto_map.values() if isinstance(value, str)] if isinstance(auto_map, dict) else []
    pending = sorted({name.rpartition(".")[0] for name in names if "--" not in name})
    if not pending:
        return CustomCode({}, (), "auto_map names no modelling file in the base folder")
    trees: dict[str, ast.Module] = {}
    while pending and len(trees) < _MAX_FILES:
        module = pending.pop()
        if module in trees:
            continue
        tree = _parse(folder, module)
        if tree is None:
            return CustomCode({}, tuple(sorted(trees)), f"{module}.py is not a readable Python file in the base folder")
        trees[module] = tree
        pending += [name for name in _local_imports(tree) if name not in trees and (folder / f"{name}.py").is_file()]
    local_linear = _linear_subclasses(trees.values())
    kinds: dict[str, set[bool | None]] = {}
    for tree in trees.values():
        imports = _imports(tree)
        for name, call in _assignments(tree):
            kinds.setdefault(name, set()).add(_kind(call, imports, local_linear))
    modules = {name: found.pop() if len(found) == 1 else None for name, found in kinds.items()}
    return CustomCode(modules, tuple(f"{name}.py" for name in sorted(trees)))


def _parse(folder: Path, module: str) -> ast.Module | None:
    if not _MODULE.match(module):
        return None
    try:
        return ast.parse(read_input(folder / f"{module}.py", MAX_CODE_BYTES).decode())
    except (ShardmergeError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _local_imports(tree: ast.Module) -> list[str]:
    """Modules of the same folder that ``tree`` imports (``from .x import ...``)."""
    return [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and _MODULE.match(node.module)
    ]


def _assignments(tree: ast.Module) -> list[tuple[str, ast.expr]]:
    """``(NAME, value)`` for every ``self.NAME = value`` (or annotated assignment)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        found += [
            (target.attr, value)
            for target in targets
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
        ]
    return found


def _called(call: ast.expr) -> str | None:
    """The dotted name ``call`` calls (``nn.Linear(...)`` -> ``nn.Linear``), if a call."""
    if not isinstance(call, ast.Call):
        return None
    parts = []
    func = call.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([func.id, *reversed(parts)])


def _imports(tree: ast.Module) -> dict[str, str]:
    """Names ``tree`` imports with ``from M import N [as A]``: A -> M.N."""
    return {
        alias.asname or alias.name: f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        for alias in node.names
    }


def _linear_subclasses(trees: Any) -> set[str]:
    """Classes of the files that derive from ``Linear`` alone and define no forward or
    weight of their own: they store their weight as nn.Linear does."""
    found: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or len(node.bases) != 1:
                continue
            base = node.bases[0]
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            own = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if name == "Linear" and not own & {"forward", "reset_parameters", "_load_from_state_dict"}:
                found.add(node.name)
    return found


# What a call must name to build an nn.Linear or a Conv1D, once the file's imports are read.
_LINEAR = frozenset({"nn.Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"})
_CONV1D = frozenset({"transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"})


def _kind(value: ast.expr, imports: dict[str, str], local_linear: set[str]) -> bool | None:
    called = _called(value)
    if called is None:
        return None
    if called in local_linear:
        return False
    head, _, rest = called.partition(".")
    full = imports.get(head, head) + (f".{rest}" if rest else "")
    if full in _LINEAR or full.replace("torch.nn.", "nn.") in _LINEAR:
        return False
    return True if full in _CONV1D else None
