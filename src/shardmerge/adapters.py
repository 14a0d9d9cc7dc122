"""PEFT adapters: ``adapter_config.json`` and the weights' header, read into per-module specs.

Only headers are read here. Problems are collected, not raised one at a time, so that the
planner can report every one of them together.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterError, ShardmergeError
from .resolve import AdapterFiles
from .st_io import SafetensorsHeader, read_checkpoint_header

PEFT_PREFIX = "base_model.model."

# init_lora_weights values that change the base weights during training: the saved adapter
# alone does not reproduce the fine-tuned model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config keys that switch on LoRA variants whose effect is not a fixed weight delta.
_UNMERGEABLE_OPTIONS = {
    "layer_replication": "it duplicates layers, which a weight merge cannot express",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between adapters per token",
    "use_qalora": "QA-LoRA targets a quantized base",
    "use_bdlora": "block-diagonal LoRA is not supported yet",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported yet",
    "trainable_token_indices": "trainable tokens are not supported yet",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
}

_KEY_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("lora_A", re.compile(r"^(?P<path>.+)\.lora_A(?:\.[^.]+)?\.weight$")),
    ("lora_B", re.compile(r"^(?P<path>.+)\.lora_B(?:\.[^.]+)?\.weight$")),
    ("lora_B_bias", re.compile(r"^(?P<path>.+)\.lora_B(?:\.[^.]+)?\.bias$")),
    ("embedding_A", re.compile(r"^(?P<path>.+)\.lora_embedding_A(?:\.[^.]+)?$")),
    ("embedding_B", re.compile(r"^(?P<path>.+)\.lora_embedding_B(?:\.[^.]+)?$")),
    ("magnitude", re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")),
    ("base_layer", re.compile(r"^(?P<path>.+)\.base_layer\.(?P<param>weight|bias)$")),
    ("modules_to_save", re.compile(r"^(?P<path>.+)\.modules_to_save\.[^.]+\.(?P<param>.+)$")),
]


@dataclass
class LoraModule:
    """The LoRA tensors of one adapted module, by role (``lora_A``, ``lora_B`` ...) -> key."""

    path: str
    keys: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def is_embedding(self) -> bool:
        return "embedding_A" in self.keys or "embedding_B" in self.keys


@dataclass(frozen=True)
class FullTensor:
    """A whole tensor saved in the adapter that replaces the base tensor ``target``."""

    target: str
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Adapter:
    index: int
    files: AdapterFiles
    header: SafetensorsHeader
    weight: float
    config: dict[str, Any]
    modules: tuple[LoraModule, ...]
    full_tensors: tuple[FullTensor, ...]

    @property
    def name(self) -> str:
        return str(self.files.folder)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """r and lora_alpha for module ``path``: first matching pattern key wins, as in PEFT."""
        return (
            int(_pattern_value(self.config.get("rank_pattern") or {}, path, self.config["r"])),
            float(_pattern_value(self.config.get("alpha_pattern") or {}, path, self.config["lora_alpha"])),
        )

    def scale(self, path: str) -> float:
        r, alpha = self.rank_and_alpha(path)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(index: int, files: AdapterFiles, weight: float, problems: list[ShardmergeError]) -> Adapter | None:
    """Read an adapter's config and header. Appends problems; returns None if unusable."""
    try:
        config = json.loads(files.config.read_text())
    except (OSError, ValueError) as exc:
        problems.append(AdapterError(f"unreadable adapter config ({exc})", file=files.config))
        return None
    if not isinstance(config, dict):
        problems.append(AdapterError("adapter config is not a JSON object", file=files.config))
        return None
    before = len(problems)
    _check_config(files, config, problems)
    try:
        header = read_checkpoint_header(files.weights)
    except ShardmergeError as exc:
        problems.append(exc)
        return None
    if len(problems) > before:
        return None
    modules: dict[str, LoraModule] = {}
    full: list[FullTensor] = []
    for key, info in header.tensors.items():
        local = key.removeprefix(PEFT_PREFIX)
        role, match = _classify(local)
        if match is None:
            if "lora_" in local or "token_adapter" in local:
                problems.append(
                    AdapterError(
                        "tensor of an adapter variant shardmerge cannot merge",
                        file=files.weights,
                        tensor=key,
                        hint="only LoRA (with DoRA, rslora, lora_bias, modules_to_save) is supported",
                    )
                )
                continue
            full.append(FullTensor(local, key, info.shape, info.dtype))
        elif role in ("base_layer", "modules_to_save"):
            full.append(FullTensor(f"{match['path']}.{match['param']}", key, info.shape, info.dtype))
        else:
            module = modules.setdefault(match["path"], LoraModule(match["path"]))
            module.keys[role] = key
            module.shapes[role] = info.shape
    return Adapter(index, files, header, weight, config, tuple(modules.values()), tuple(full))


def _classify(local_key: str) -> tuple[str, re.Match[str] | None]:
    for role, pattern in _KEY_PATTERNS:
        match = pattern.match(local_key)
        if match:
            return role, match
    return "", None


def _check_config(files: AdapterFiles, config: dict[str, Any], problems: list[ShardmergeError]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(
            AdapterError(
                f"unsupported peft_type {peft_type!r}",
                file=files.config,
                hint="shardmerge merges LoRA adapters (peft_type LORA)",
            )
        )
        return
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            problems.append(
                AdapterError(f"{key} must be a positive number, found {config.get(key)!r}", file=files.config)
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        problems.append(
            AdapterError(
                f"init_lora_weights={init!r} changed the base weights during training, so this adapter "
                "cannot be merged into the original base",
                file=files.config,
                hint="convert it to a plain LoRA adapter first with PEFT "
                "(save_pretrained(path_initial_model_for_weight_conversion=...))",
            )
        )
    for key, why in _UNMERGEABLE_OPTIONS.items():
        if config.get(key):
            problems.append(
                AdapterError(f"{key} is set: {why}", file=files.config, hint="merge this adapter with PEFT instead")
            )
