"""The model card (``README.md``) of a merged model: Hub metadata, and how the model was made.

The card is written into the output folder, so the model on the Hub and the one on disk are
the same files. It depends only on the plan, never on the time or the machine, so a resumed
merge writes the same bytes. Local paths are reduced to their last component: a card must
not publish where the user keeps files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from ..config import is_hub_id
from ..errors import InputError
from ..formats.confined import open_input
from ..planning.model import AdapterSummary, Plan

CARD_NAME = "README.md"
# Metadata of the base's card that still holds for the merged model: its license binds it.
_INHERITED = ("license", "license_name", "license_link", "language")
# A card's metadata is at its head: this much of it is read.
_FRONT_MATTER_BYTES = 64 * 1024


def render(plan: Plan, base_card: Path | None) -> bytes:
    front: dict[str, Any] = {}
    base_model = hub_base_model(plan)
    if base_model:
        front["base_model"] = base_model
    front["library_name"] = "transformers"
    inherited = _front_matter(base_card) if base_card else {}
    front.update({key: inherited[key] for key in _INHERITED if key in inherited})
    types = sorted({adapter.peft_type.lower() for adapter in plan.adapters})
    front["tags"] = ["shardmerge", "merge", "peft", *types]
    count = len(plan.adapters)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model is `{base_model or display(plan.base)}` with {count} PEFT adapter{'s' if count != 1 else ''} "
        f"merged into its weights by shardmerge {__version__}. It loads as a plain model with `transformers` "
        "or vLLM; PEFT is not needed.",
        "",
        "| # | Adapter | Type | Rank | Weight |",
        "|---|---|---|---|---|",
        *(_row(adapter) for adapter in plan.adapters),
        "",
        f"- Weights: {_weights(plan)}",
        f"- Shards: {len(plan.shards)} safetensors files, {plan.tensor_bytes / 2**30:.2f} GiB of tensors.",
        *(f"- Note: {note}." for note in plan.notes),
        "",
    ]
    return "\n".join(lines).encode()


def _weights(plan: Plan) -> str:
    if plan.quantization and plan.dtype == "base":
        return (
            f"{plan.quantization}, as the base; merged weights dequantized, computed in float32 and requantized once."
        )
    if plan.dtype == "base":
        return "each tensor in the base's dtype, computed in float32 and rounded once."
    return f"{plan.dtype}, computed in float32 and rounded once."


def hub_base_model(plan: Plan) -> str | None:
    """The base's Hub id: the repo it came from, or else the one the adapters recorded, when
    they agree and it is one."""
    if plan.base_repo:
        return plan.base_repo
    names = {adapter.base_model for adapter in plan.adapters}
    if len(names) != 1:
        return None
    name = names.pop()
    return name if name and is_hub_id(name) and not Path(name).exists() else None


def _row(adapter: AdapterSummary) -> str:
    rank = str(adapter.r) if adapter.r is not None else "-"
    flags = "".join(f" ({flag})" for flag, on in (("DoRA", adapter.use_dora), ("rsLoRA", adapter.use_rslora)) if on)
    name = display(adapter.path)
    return f"| {adapter.index} | `{name}` | {adapter.peft_type}{flags} | {rank} | {adapter.weight:g} |"


def display(path: str) -> str:
    """A Hub id without its pinned commit, or a local folder's name."""
    return path.partition("@")[0] if is_hub_id(path) and not Path(path).exists() else Path(path).name


def _front_matter(card: Path) -> dict[str, Any]:
    """The base card's metadata (at the head of the file, read no further), where it is text:
    a license, or a list of languages."""
    try:
        fd = open_input(card)
        try:
            text = os.read(fd, _FRONT_MATTER_BYTES).decode("utf-8", "ignore")  # a character cut at the end
        finally:
            os.close(fd)
    except (OSError, UnicodeDecodeError, InputError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        key: value
        for key, value in data.items()
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))
    }
