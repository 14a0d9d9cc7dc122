"""Which modules a base's custom modelling code (``auto_map`` in ``config.json``) builds as
``nn.Linear`` and which as transformers' GPT-2 ``Conv1D``: read from its Python files in the
base folder, parsed and never run.

Every assignment ``self.NAME = CALL(...)`` in the files counts: a module name is ``nn.Linear``
when each one builds torch's ``nn.Linear`` (or a class of the files that derives from it alone
and changes nothing of how it stores its weight), and ``Conv1D`` when each one builds
transformers' ``Conv1D``, as the files' imports name them. A name built both ways, by another
call (a helper function, a conditional), or not found at all stays undecided, and its square
weights are refused as before. Files that build modules with code they do not hold (a class of
another package, transformers' GPT-2 family) or under names computed at run time
(``add_module``, ``setattr``, ``ModuleDict``) decide nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from ..errors import ShardmergeError
from ..formats.confined import read_input
from .layouts import CustomCode

# Modelling files are read into memory and parsed: their sizes are the sender's to choose.
MAX_CODE_BYTES = 4 << 20
_MAX_TOTAL_BYTES = 8 << 20
# Files the code may span: those auto_map names and the local modules they import.
_MAX_FILES = 16
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LINEAR = frozenset({"torch.nn.Linear", "torch.nn.modules.linear.Linear"})
_CONV1D = frozenset({"transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"})
# transformers' models whose classes build Conv1D layers: their folders and class prefixes.
_CONV1D_FOLDERS = ("gpt2", "openai", "imagegpt", "decision_transformer", "clvp")
_CONV1D_CLASSES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer", "Clvp")
# Calls that give modules names computed at run time.
_DYNAMIC = frozenset({"add_module", "register_module", "setattr", "ModuleDict"})


def read_custom_code(folder: Path, config: dict[str, Any]) -> CustomCode:
    """Parse the modelling files ``config``'s ``auto_map`` names, in ``folder``, and the files
    of the folder they import."""
    auto_map = config.get("auto_map")
    names = [value for value in auto_map.values() if isinstance(value, str)] if isinstance(auto_map, dict) else []
    if any("--" in name for name in names):
        return CustomCode({}, (), "auto_map names modelling code of another repo, which is not in the base folder")
    pending = sorted({name.rpartition(".")[0] for name in names})
    if not pending:
        return CustomCode({}, (), "auto_map names no modelling file in the base folder")
    trees: dict[str, ast.Module] = {}
    total = 0
    while pending:
        module = pending.pop()
        if module in trees:
            continue
        if len(trees) == _MAX_FILES:
            return CustomCode({}, (), f"the modelling code spans more than {_MAX_FILES} files")
        source = _read(folder, module)
        tree = _parse(source) if source is not None else None
        if source is None or tree is None:
            return CustomCode({}, (), f"{module}.py is not a readable Python file in the base folder")
        total += len(source)
        if total > _MAX_TOTAL_BYTES:
            return CustomCode({}, (), f"the modelling code holds more than {_MAX_TOTAL_BYTES} bytes")
        trees[module] = tree
        pending += [name for name in _local_imports(tree) if name not in trees and (folder / f"{name}.py").is_file()]
    files = tuple(f"{name}.py" for name in sorted(trees))
    defined = {node.name for tree in trees.values() for node in tree.body if isinstance(node, _DEFINITIONS)}
    bindings = {module: _bindings(tree) for module, tree in trees.items()}
    local_linear = _linear_subclasses(trees, bindings)
    kinds: dict[str, set[bool | None]] = {}
    for module, tree in trees.items():
        for called in _calls(tree):
            full = _resolve(called, bindings[module])
            outside = _outside(full, defined, set(trees))
            if outside:
                return CustomCode({}, files, f"{files[0]} builds modules with {outside}, whose code is not there")
        for name, value in _assignments(tree):
            kinds.setdefault(name, set()).add(_kind(value, bindings[module], local_linear))
    modules = {name: found.pop() if len(found) == 1 else None for name, found in kinds.items()}
    return CustomCode(modules, files)


_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _read(folder: Path, module: str) -> bytes | None:
    if not _MODULE.match(module):
        return None
    try:
        return read_input(folder / f"{module}.py", MAX_CODE_BYTES)
    except ShardmergeError:
        return None


def _parse(source: bytes) -> ast.Module | None:
    """The syntax tree of ``source`` (bytes: a BOM or coding line is honoured), never run."""
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _local_imports(tree: ast.Module) -> list[str]:
    """Modules of the same folder that ``tree`` imports (``from .x import ...``,
    ``from . import x``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found += [node.module] if node.module else [alias.name for alias in node.names]
    return [name for name in found if _MODULE.match(name)]


def _bindings(tree: ast.Module) -> dict[str, str]:
    """What each imported name stands for: ``import torch.nn as nn`` binds ``nn`` to
    ``torch.nn``, ``from .layers import Linear`` binds ``Linear`` to ``.layers.Linear``."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.partition(".")[0]
                names[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level + (f"{node.module}." if node.module else "")
            for alias in node.names:
                names[alias.asname or alias.name] = prefix + alias.name
    return names


def _dotted(func: ast.expr) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    return ".".join([func.id, *reversed(parts)]) if isinstance(func, ast.Name) else None


def _calls(tree: ast.Module) -> list[str]:
    return [name for node in ast.walk(tree) if isinstance(node, ast.Call) and (name := _dotted(node.func))]


def _resolve(called: str, bindings: dict[str, str]) -> str:
    head, _, rest = called.partition(".")
    bound = bindings.get(head, head)
    return f"{bound}.{rest}" if rest else bound


def _outside(full: str, defined: set[str], local: set[str]) -> str | None:
    """Why the call ``full`` builds modules whose names the files do not show; None if not."""
    last = full.rpartition(".")[2]
    if last in _DYNAMIC:
        return f"{last} (module names computed at run time)"
    root = full.split(".")[0]
    if full.startswith("transformers."):
        family = any(f".models.{folder}." in full for folder in _CONV1D_FOLDERS) or last.startswith(_CONV1D_CLASSES)
        return f"{full} (transformers' GPT-2 family, with Conv1D layers)" if family and last[:1].isupper() else None
    if full.startswith(".") or root in defined or root in local or root in ("torch", "self", "super"):
        return None
    # A class of another package (a call of a capitalised name): its modules are not in the files.
    return full if last[:1].isupper() and root[:1].islower() and "." in full else None


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


def _linear_subclasses(trees: dict[str, ast.Module], bindings: dict[str, dict[str, str]]) -> set[str]:
    """Classes of the files that derive from torch's ``nn.Linear`` alone and define no
    forward, initialisation of parameters or loading of their own: they store their weight as
    nn.Linear does."""
    found: set[str] = set()
    for module, tree in trees.items():
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or len(node.bases) != 1:
                continue
            base = _dotted(node.bases[0])
            own = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if base and _resolve(base, bindings[module]) in _LINEAR and not own & _OVERRIDES:
                found.add(node.name)
    return found


_OVERRIDES = frozenset({"forward", "reset_parameters", "_load_from_state_dict", "__init__"})


def _kind(value: ast.expr, bindings: dict[str, str], local_linear: set[str]) -> bool | None:
    """Whether ``value`` builds a Conv1D (True) or an nn.Linear (False); None if neither or
    not known."""
    called = _dotted(value.func) if isinstance(value, ast.Call) else None
    if called is None:
        return None
    if called in local_linear and called not in bindings:
        return False
    full = _resolve(called, bindings)
    return False if full in _LINEAR else True if full in _CONV1D else None
