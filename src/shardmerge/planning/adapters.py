"""PEFT adapters: ``adapter_config.json`` and the weights' header, read into per-module specs.

Only headers are read here. Problems are collected, not raised one at a time, so that the
planner can report every one of them together.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterError, ShardmergeError
from ..formats.checkpoint import read_checkpoint_header
from ..formats.confined import read_input
from ..formats.jsondoc import parse
from ..formats.safetensors import SafetensorsHeader
from ..inputs.resolve import AdapterFiles

PEFT_PREFIX = "base_model.model."
# The most a config (config.json, adapter_config.json) may hold: a real one is a few KB.
MAX_CONFIG_BYTES = 64 * 2**20
SUPPORTED_TYPES = ("LORA", "LOHA", "LOKR", "IA3", "TRAINABLE_TOKENS")
# Config keys holding r and alpha, per adapter type.
_RANK_KEYS = {"LORA": ("r", "lora_alpha"), "LOHA": ("r", "alpha"), "LOKR": ("r", "alpha")}

# init_lora_weights values that change the base weights during training: the saved adapter
# alone does not reproduce the fine-tuned model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config keys that switch on variants whose effect is not a fixed weight change.
_UNMERGEABLE_OPTIONS = {
    "layer_replication": "it shares layers between positions of the model, which a weight merge cannot express",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between adapters per token",
    "use_qalora": "QA-LoRA targets a quantized base",
    "use_bdlora": "block-diagonal LoRA is not supported yet",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_effective_conv2d": "the CP-decomposed convolution form is not supported",
}

_NAME = r"(?:\.[^.]+)?"  # an adapter name left in keys by old PEFT versions (".default")
_KEY_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("lora_A", re.compile(rf"^(?P<path>.+)\.lora_A{_NAME}\.weight$")),
    ("lora_B", re.compile(rf"^(?P<path>.+)\.lora_B{_NAME}\.weight$")),
    ("lora_B_bias", re.compile(rf"^(?P<path>.+)\.lora_B{_NAME}\.bias$")),
    ("embedding_A", re.compile(rf"^(?P<path>.+)\.lora_embedding_A{_NAME}$")),
    ("embedding_B", re.compile(rf"^(?P<path>.+)\.lora_embedding_B{_NAME}$")),
    ("magnitude", re.compile(rf"^(?P<path>.+)\.lora_magnitude_vector{_NAME}(?:\.weight)?$")),
    *(
        (role, re.compile(rf"^(?P<path>.+)\.{role}{_NAME}$"))
        for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    ),
    *((role, re.compile(rf"^(?P<path>.+)\.{role}{_NAME}$")) for role in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "ia3_l")),
    ("tokens", re.compile(rf"^(?P<path>.+?)(?:\.token_adapter)?\.trainable_tokens_delta{_NAME}$")),
    ("base_layer", re.compile(r"^(?P<path>.+)\.base_layer\.(?P<param>weight|bias)$")),
    # PEFT saves a resized embedding layer's whole wrapper too (save_embedding_layers): its
    # trained copy without the adapter name, beside the same copy saved as X.weight, and the
    # wrapped module: the base parameter as PEFT loads it (resized), which a tied head uses.
    ("saved_copy", re.compile(r"^(?P<path>.+)\.modules_to_save\.(?P<param>weight|bias)$")),
    ("original_module", re.compile(r"^(?P<path>.+)\.original_module\.(?P<param>weight|bias)$")),
    ("modules_to_save", re.compile(r"^(?P<path>.+)\.modules_to_save\.[^.]+\.(?P<param>.+)$")),
]
# Substrings of adapter tensors that no pattern above may leave unexplained.
_ADAPTER_MARKERS = ("lora_", "hada_", "lokr_", "ia3_", "token_adapter", "trainable_tokens", "vera_", "oft_", "boft_")


@dataclass
class AdapterModule:
    """The tensors of one adapted module, by role (``lora_A``, ``hada_w1_a`` ...) -> key.

    ``path`` is the module path in the model the adapter was trained on. PEFT nests wrappers
    when it targets several parameters of one module (``experts.base_layer.lora_A``), so
    ``key_path`` (unique) keeps the ``.base_layer`` parts that ``path`` drops.
    """

    path: str
    key_path: str
    keys: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def is_embedding(self) -> bool:
        return "embedding_A" in self.keys or "embedding_B" in self.keys

    @property
    def first_key(self) -> str:
        return next(iter(self.keys.values()))


@dataclass(frozen=True)
class FullTensor:
    """A whole tensor saved in the adapter that replaces the base tensor ``target``.

    ``shared`` marks ``.base_layer`` tensors: PEFT loads those into the base parameter itself,
    which tied weights share; ``modules_to_save`` tensors belong to the module's own copy."""

    target: str
    key: str
    shape: tuple[int, ...]
    shared: bool
    copy: bool = False  # a modules_to_save copy saved without the adapter name


@dataclass(frozen=True)
class Adapter:
    index: int
    files: AdapterFiles
    header: SafetensorsHeader
    weight: float
    config: dict[str, Any]
    modules: tuple[AdapterModule, ...]
    full_tensors: tuple[FullTensor, ...]

    @property
    def peft_type(self) -> str:
        return str(self.config["peft_type"])

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha for module ``path``: the first matching pattern key wins, as in PEFT."""
        rank_key, alpha_key = _RANK_KEYS[self.peft_type]
        return (
            int(_pattern_value(self.config.get("rank_pattern") or {}, path, self.config[rank_key])),
            float(_pattern_value(self.config.get("alpha_pattern") or {}, path, self.config[alpha_key])),
        )

    def scale(self, path: str) -> float:
        r, alpha = self.rank_and_alpha(path)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def token_indices(self, path: str) -> list[int] | None:
        """Rows that trainable tokens replace in module ``path``."""
        if self.peft_type == "TRAINABLE_TOKENS":
            return list(self.config.get("token_indices") or [])
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, list):
            return list(spec)
        if isinstance(spec, dict):
            for name, indices in spec.items():
                if path == name or path.endswith(f".{name}"):
                    return list(indices)
        return None


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(index: int, files: AdapterFiles, weight: float, problems: list[ShardmergeError]) -> Adapter | None:
    """Read an adapter's config and header. Appends problems; returns None if unusable."""
    try:
        config = parse(read_input(files.config, MAX_CONFIG_BYTES))
    except ValueError as exc:
        problems.append(AdapterError(f"unreadable adapter config ({exc})", file=files.config))
        return None
    except ShardmergeError as exc:
        problems.append(exc)
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
    modules: dict[str, AdapterModule] = {}
    full: list[FullTensor] = []
    for key, info in header.tensors.items():
        local = key.removeprefix(PEFT_PREFIX)
        role, match = _classify(local)
        if match is None:
            if any(marker in local for marker in _ADAPTER_MARKERS):
                problems.append(
                    AdapterError(
                        "tensor of an adapter variant shardmerge cannot merge",
                        file=files.weights,
                        tensor=key,
                        hint="see the README for the supported adapter types; merge this one with PEFT",
                    )
                )
                continue
            full.append(FullTensor(local, key, info.shape, shared=False))
        elif role in ("base_layer", "original_module", "modules_to_save", "saved_copy"):
            target = f"{match['path']}.{match['param']}"
            shared = role in ("base_layer", "original_module")
            full.append(FullTensor(target, key, info.shape, shared=shared, copy=role == "saved_copy"))
        else:
            key_path = match["path"]
            path = re.sub(r"(\.base_layer)+$", "", key_path)
            module = modules.setdefault(key_path, AdapterModule(path, key_path))
            module.keys[role] = key
            module.shapes[role] = info.shape
    # A trained copy saved twice: PEFT loads X.weight into the module, as merged here.
    plain = {tensor.target for tensor in full if not tensor.copy}
    full = [tensor for tensor in full if not (tensor.copy and tensor.target in plain)]
    return Adapter(index, files, header, weight, config, tuple(modules.values()), tuple(full))


def _classify(local_key: str) -> tuple[str, re.Match[str] | None]:
    for role, pattern in _KEY_PATTERNS:
        match = pattern.match(local_key)
        if match:
            return role, match
    return "", None


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _positive_number(value: Any) -> bool:
    """A finite number above zero (``true`` is not one, though Python counts it as 1)."""
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _check_values(config: dict[str, Any], peft_type: str, problem: Callable[[str], None]) -> None:
    """Every value of the config that the merge computes with, of the type PEFT gives it: r a
    positive integer, alpha a finite positive number, the patterns regular expressions mapping
    to those, module lists lists of names (or one expression), token indices integers."""
    rank_key, alpha_key = _RANK_KEYS.get(peft_type, (None, None))
    for key, valid, what in (
        (rank_key, _positive_int, "a positive integer"),
        (alpha_key, _positive_number, "a finite positive number"),
    ):
        if key is None:
            continue
        if not valid(config.get(key)):
            problem(f"{key} must be {what}, found {config.get(key)!r}")
        pattern_key = "rank_pattern" if key == rank_key else "alpha_pattern"
        patterns = config.get(pattern_key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problem(f"{pattern_key} must map module patterns to values, found {patterns!r}")
            continue
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                problem(f"{pattern_key} key {pattern!r} is not a regular expression ({exc})")
            if not valid(value):
                problem(f"{pattern_key}[{pattern!r}] must be {what}, found {value!r}")
    for key in ("target_modules", "exclude_modules", "feedforward_modules", "target_parameters"):
        value = config.get(key)
        if isinstance(value, str) and key != "target_parameters":
            try:
                re.compile(value)
            except re.error as exc:
                problem(f"{key} {value!r} is not a regular expression ({exc})")
        elif value is not None and not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
            problem(f"{key} must be a list of names, found {value!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        type(layers) is int or (isinstance(layers, list) and all(type(layer) is int for layer in layers))
    ):
        problem(f"layers_to_transform must be a layer index or a list of them, found {layers!r}")
    pattern = config.get("layers_pattern")
    for expression in [pattern] if isinstance(pattern, str) else pattern if isinstance(pattern, list) else []:
        try:
            re.compile(rf"(?:^|.*?\.){expression}\.(?P<index>\d+)\.")
        except (re.error, TypeError) as exc:
            problem(f"layers_pattern {expression!r} is not a regular expression ({exc})")
    for key in ("token_indices", "trainable_token_indices"):
        value = config.get(key)
        lists = list(value.values()) if isinstance(value, dict) else [value]
        if value is not None and not all(
            isinstance(indices, list) and all(type(index) is int and index >= 0 for index in indices)
            for indices in lists
        ):
            problem(f"{key} must be lists of token indices (integers of 0 or more), found {value!r}")


def _check_config(files: AdapterFiles, config: dict[str, Any], problems: list[ShardmergeError]) -> None:
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        problems.append(
            AdapterError(
                f"unsupported peft_type {peft_type!r}",
                file=files.config,
                hint=f"shardmerge merges {', '.join(SUPPORTED_TYPES)} adapters; merge this one with PEFT",
            )
        )
        return
    _check_values(config, peft_type, lambda message: problems.append(AdapterError(message, file=files.config)))
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
