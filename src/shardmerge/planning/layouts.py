"""Which base modules store their weight as transformers' GPT-2 ``Conv1D`` ([in, out]) and
which as ``nn.Linear`` ([out, in]).

A square weight fits an update both ways, so its layout must come from evidence about that
module: the module types of the architecture named by ``config.json`` (``model_type``, and
those of its sub-configs), or the job's ``conv1d_modules``. Never from the adapter's
``fan_in_fan_out``: PEFT rewrites that one flag for every module it wraps, so the saved value
describes only the module wrapped last.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

# Module names that are transformers' ``Conv1D``, per model type. Every other module of a
# model type that transformers implements is ``nn.Linear``: the tests check both against
# transformers' own modelling code.
_GPT2_STYLE = ("c_attn", "q_attn", "c_proj", "c_fc")
CONV1D_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": _GPT2_STYLE,
    "openai-gpt": _GPT2_STYLE,
    "imagegpt": _GPT2_STYLE,
    "decision_transformer": _GPT2_STYLE,
    "clvp": ("c_fc", "c_proj"),
    "clvp_decoder": ("c_fc", "c_proj"),
}
# Model types whose fused expert parameters are stored [experts, in, out]: transformers marks
# their experts module ``is_transposed``, and PEFT's delta for ``target_parameters`` follows
# that flag. Every other model type's fused experts are [experts, out, in] as PEFT sees them
# (whatever their true layout: Llama 4's are [experts, in, out] with no flag, and PEFT's
# merge adds its delta as [experts, out, in]). The tests check the table against transformers.
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})
# Model types whose fused gate_up_proj interleaves gate and up columns (g0, u0, g1, u1, ...;
# every other fused gate_up_proj is [gate | up]): a fused adapter's rows cannot be split into
# the gate and up tensors of a checkpoint that stores experts one by one. The tests check the
# table against transformers.
INTERLEAVED_GATE_UP = frozenset({"gpt_oss"})
# Model types transformers implements (a snapshot of its CONFIG_MAPPING_NAMES, checked against
# the installed transformers by the tests): for these the table above is complete.
_MODEL_TYPES_FILE = "transformers_model_types.txt"

CONV1D_HINT = (
    "if the model's layers are nn.Linear, as in every transformers model outside GPT-2's family, pass "
    "--conv1d-modules none (YAML: conv1d_modules: []); otherwise name its Conv1D layers, e.g. "
    "--conv1d-modules c_attn,c_proj"
)


@cache
def transformers_model_types() -> frozenset[str]:
    text = resources.files(__package__).joinpath(_MODEL_TYPES_FILE).read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class CustomCode:
    """What a base's custom modelling code says (see ``custom_code``): module name -> whether
    it is a Conv1D (None: undecided), the files read, and why nothing was decided where
    nothing was."""

    modules: dict[str, bool | None]
    files: tuple[str, ...]
    unread: str = ""


@dataclass(frozen=True)
class Layouts:
    """``conv1d`` lists the module names (a module path or its last parts) stored as Conv1D,
    every other module being nn.Linear; None when the architecture is unknown, for the reason
    in ``unknown``. ``source`` says where the answer came from, for the plan."""

    conv1d: tuple[str, ...] | None
    source: str
    unknown: str = ""
    # Whether fused 3-D experts are [experts, in, out] (see TRANSPOSED_EXPERTS); None when the
    # architecture is unknown, and only the shapes can tell.
    experts_transposed: bool | None = None
    # Whether a fused gate_up_proj interleaves gate and up (see INTERLEAVED_GATE_UP); None
    # when the architecture is unknown.
    gate_up_interleaved: bool | None = None
    # Where ``conv1d`` is None: module names (a path's last part) that the base's custom
    # modelling code builds one way only, and whether that is Conv1D.
    custom: dict[str, bool | None] | None = None

    def is_conv1d(self, path: str) -> bool | None:
        """Whether module ``path`` is a Conv1D; None when nothing says."""
        if self.conv1d is None:
            return (self.custom or {}).get(path.rpartition(".")[2])
        return any(path == name or path.endswith(f".{name}") for name in self.conv1d)


def find_layouts(
    config: dict[str, Any] | None, conv1d_modules: list[str] | None, code: CustomCode | None = None
) -> Layouts:
    """The layouts of the base described by ``config`` (None without a config.json), or the
    Conv1D modules the job declares (the experts' layouts still from the config); for custom
    modelling code, what its files (``code``) say."""
    known = _known_model_types(config)
    experts: dict[str, Any] = {}
    if isinstance(known, set):
        experts = {
            "experts_transposed": bool(known & TRANSPOSED_EXPERTS),
            "gate_up_interleaved": bool(known & INTERLEAVED_GATE_UP),
        }
    if conv1d_modules is not None:
        named = ", ".join(conv1d_modules) or "none"
        return Layouts(tuple(conv1d_modules), f"conv1d_modules of the job ({named})", **experts)
    if isinstance(known, str):
        if code is not None and code.files and not code.unread:
            files = ", ".join(code.files)
            source = f"custom modelling code {files}, read and not run"
            why = f"{known}, and its files ({files}, read and not run) do not build it one way only"
            return Layouts(None, source, why, custom=code.modules)
        return Layouts(None, "", f"{known}; {code.unread}" if code is not None and code.unread else known)
    names = tuple(dict.fromkeys(name for kind in sorted(known) for name in CONV1D_MODULES.get(kind, ())))
    return Layouts(names, f"config.json model_type {', '.join(sorted(known))}", **experts)


def _known_model_types(config: dict[str, Any] | None) -> set[str] | str:
    """The config's model types, all of them implemented by transformers; or why not."""
    if config is None:
        return "the base has no config.json"
    if config.get("auto_map"):
        return "config.json names custom modelling code (auto_map)"
    model_types = _model_types(config)
    if not model_types:
        return "config.json names no model_type"
    unknown = sorted(model_types - transformers_model_types())
    if unknown:
        return f"model type {unknown[0]!r} is not one that transformers implements"
    return model_types


def _model_types(config: dict[str, Any]) -> set[str]:
    """The model types of a config and of its sub-configs (text_config, decoder, ...)."""
    found = set()
    if isinstance(config.get("model_type"), str):
        found.add(config["model_type"])
    for value in config.values():
        if isinstance(value, dict) and "model_type" in value:
            found |= _model_types(value)
    return found
