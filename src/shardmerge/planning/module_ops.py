"""One adapter's modules -> MergeOps on base tensors, with every shape and rank checked.

Each adapter module maps to exactly one base tensor (or, for LoRA on fused MoE experts, to
one tensor per expert); anything else becomes a problem in the list, never a skipped module.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import AdapterError, ShardmergeError
from ..formats.safetensors import TensorInfo
from . import targets
from .adapters import Adapter, AdapterModule, FullTensor
from .conversions import CheckpointNames
from .keymap import Mapping, candidates, closest_names, map_name
from .layouts import CONV1D_HINT, Layouts
from .model import MergeOp

# Unmatched names get "closest base names" suggestions up to this count: each search costs a
# pass over every base name, and a wholly wrong adapter can have thousands of modules.
_SUGGESTIONS = 20
# Per-expert tensor names of the fused v5 MoE parameters, per family (Mixtral; Qwen-MoE,
# OLMoE, DeepSeek and most others), and which rows of the fused update each one takes.
_EXPERT_LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}


@dataclass
class AdapterPlanner:
    adapter: Adapter
    base: dict[str, TensorInfo]
    layouts: Layouts
    problems: list[ShardmergeError]
    suggestions: int = 0
    vocab_sizes: frozenset[int] = frozenset()  # the config's vocab_size values
    names: CheckpointNames = field(default_factory=CheckpointNames)  # the base's tensors under the model's names

    def __post_init__(self) -> None:
        self.ops: dict[str, list[MergeOp]] = defaultdict(list)
        self.file = self.adapter.files.weights
        # Base tensors whose rows this adapter's whole tensors resize (added tokens), with
        # their new shapes: later updates of this adapter are checked against those.
        self.resized: dict[str, tuple[int, ...]] = {}

    def error(self, message: str, tensor: str, hint: str | None = None) -> None:
        self.problems.append(AdapterError(message, file=self.file, tensor=tensor, hint=hint))

    def find(self, name: str) -> Mapping:
        return map_name(name, self.base, self.names.renamed)

    def target(self, name: str, key: str) -> Mapping | None:
        """The base tensor for adapter name ``name``, or None with the problem recorded."""
        mapping = self.find(name)
        if mapping.target is not None:
            return mapping
        converted = next((self.names.converted[c] for c in candidates(name) if c in self.names.converted), None)
        if converted is not None:
            self.error(
                f"{name!r} is built from checkpoint tensors such as {converted.source!r} by transformers' "
                f"{converted.operations} when it loads them ({self.names.rules}); shardmerge does not invert that",
                key,
                "leave this module out of the adapter, or merge into a checkpoint that stores the model's own tensors",
            )
            return None
        if mapping.candidates:
            self.error(
                f"maps to more than one base tensor: {', '.join(mapping.candidates)}",
                key,
                "the adapter is ambiguous for this checkpoint; report it with both names",
            )
            return None
        near = ""
        if self.suggestions < _SUGGESTIONS:
            self.suggestions += 1
            closest = closest_names(name, self.base)
            near = f"; closest base names: {', '.join(closest)}" if closest else ""
        self.error(f"no base tensor {name!r}{near}", key, "check that this adapter was trained on this base model")
        return None

    def tensor(self, mapping: Mapping) -> TensorInfo:
        """The mapped base tensor, in the shape this adapter resized it to, if it did."""
        assert mapping.target is not None
        info = self.base[mapping.target]
        return replace(info, shape=self.resized[info.name]) if info.name in self.resized else info

    def add(
        self,
        mapping: Mapping,
        kind: str,
        keys: tuple[str, ...],
        layout: str,
        module: str,
        *,
        key: str | None = None,
        **extra: Any,
    ) -> None:
        """Record that this adapter changes the mapped tensor. The op's scale is that of
        ``key`` in the rank and alpha patterns: the module's path, or for a targeted parameter,
        the module's path and the parameter's name, as PEFT matches them."""
        assert mapping.target is not None
        scaled = kind in ("lora", "dora", "bias", "loha", "lokr")
        scale = self.adapter.scale(key or module) if scaled else 1.0
        op = MergeOp(
            self.adapter.index, kind, keys, scale, self.adapter.weight, layout, module, mapping.rule or "", **extra
        )
        self.ops[mapping.target].append(op)

    def plan(self) -> dict[str, list[MergeOp]]:
        for full in self.adapter.full_tensors:
            self.full_tensor(full)
        for module in self.adapter.modules:
            roles = set(module.keys)
            if roles & {"lora_A", "lora_B", "embedding_A", "embedding_B", "magnitude", "lora_B_bias"}:
                self.lora(module)
            elif roles & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
                self.loha(module)
            elif any(role.startswith("lokr_") for role in roles):
                self.lokr(module)
            elif "ia3_l" in roles:
                self.ia3(module)
            elif "tokens" in roles:
                self.tokens(module)
        self.check_duplicates()
        self.check_targets()
        return self.ops

    def check_targets(self) -> None:
        """The config's ``target_modules`` and the modules of the weights must agree, as PEFT
        needs them to (see ``targets.py``): every module the weights hold is targeted (or a
        parameter of it by ``target_parameters``; trainable tokens have their own key), and
        every name it lists that the base has is covered by some module of the weights."""
        config = self.adapter.config
        if config.get("target_modules") is None:
            return  # PEFT takes its defaults for the model type: nothing to compare
        loose = [
            module.path
            for module in self.adapter.modules
            if "tokens" not in module.keys
            and not targets.targeted(config, module.path)
            and not self.target_parameter(module)
        ]
        if loose:
            self.problems.append(
                AdapterError(
                    f"target_modules {config['target_modules']!r} does not target {len(loose)} of the modules the "
                    f"weights hold (e.g. {loose[0]}): PEFT would not load their weights, or refuses the adapter",
                    file=self.adapter.files.config,
                    hint="the adapter_config.json does not belong to these weights",
                )
            )
        covered = [module.path for module in self.adapter.modules] + [name.rpartition(".")[0] for name in self.ops]
        model_name = {stored: model for model, stored in self.names.renamed.items()}
        base_modules = {model_name.get(name, name).rpartition(".")[0] for name in self.base}
        for name, modules in targets.uncovered(config, base_modules, covered):
            self.problems.append(
                AdapterError(
                    f"target_modules names {name!r}, which {len(modules)} modules of the base answer to (e.g. "
                    f"{modules[0]}), but the weights hold no tensor for any of them",
                    file=self.adapter.files.weights,
                    hint="the adapter file is incomplete (PEFT would leave those modules untrained): save it again",
                )
            )

    def check_duplicates(self) -> None:
        for name, tensor_ops in self.ops.items():
            # Within one adapter a whole replacement comes first, then the updates. A module's
            # own trained copy (``full``) comes after the parameter it replaces for every use
            # (``shared``: a tied embedding's head keeps that one).
            tensor_ops.sort(key=lambda op: (op.kind != "replace", op.layout != "shared"))
            signatures = [(op.kind, op.layout if op.kind == "replace" else "", op.expert, op.rows) for op in tensor_ops]
            if len(set(signatures)) != len(signatures):
                modules = ", ".join(dict.fromkeys(op.module for op in tensor_ops))
                self.error(
                    f"several adapter entries ({modules}) change the same base tensor",
                    name,
                    "the adapter is ambiguous for this checkpoint",
                )

    def full_tensor(self, full: FullTensor) -> None:
        mapping = self.target(full.target, full.key)
        if mapping is None:
            return
        base = self.tensor(mapping)
        if full.shape != base.shape and not self.resizes(full, base):
            return
        layout = "shared" if full.shared else "full"
        self.add(mapping, "replace", (full.key,), layout, full.target)

    def resizes(self, full: FullTensor, base: TensorInfo) -> bool:
        """Whether ``full``, of another shape than ``base``, resizes it: ``base`` has as many
        rows as the config's vocabulary and ``full`` another number of them (an adapter saved
        after ``resize_token_embeddings``), and replaces it whole (weight 1). Otherwise the
        problem is recorded."""
        if not (len(base.shape) == 2 and full.shape[1:] == base.shape[1:] and base.shape[0] in self.vocab_sizes):
            self.error(
                f"shape mismatch: adapter has {list(full.shape)}, base tensor {base.name!r} has {list(base.shape)}",
                full.key,
                "the adapter resized a layer other than the vocabulary, or belongs to another model",
            )
            return False
        if self.adapter.weight != 1:
            self.error(
                f"the adapter resizes {base.name!r} from {base.shape[0]} to {full.shape[0]} rows (added tokens), "
                f"which only a weight of 1 can merge (it has {self.adapter.weight:g})",
                full.key,
                "merge this adapter with weight 1",
            )
            return False
        self.resized[base.name] = full.shape
        return True

    def check_rank(
        self, module: AdapterModule, found: dict[str, int], *, experts: int = 1, key: str | None = None
    ) -> bool:
        """Whether the tensors' ranks are r (times the experts) for ``key`` (see ``add``)."""
        key = key or module.path
        r, _ = self.adapter.rank_and_alpha(key)
        wrong = {role: rank for role, rank in found.items() if rank != r * experts}
        if wrong:
            ranks = ", ".join(f"{rank} ({role})" for role, rank in wrong.items())
            per = f" x {experts} experts" if experts > 1 else ""
            self.error(
                f"r mismatch: the config gives r={r}{per} for {key!r} but the tensors have rank {ranks}",
                module.first_key,
                "the adapter_config.json (r / rank_pattern) does not belong to these weights",
            )
        return not wrong

    def require(self, module: AdapterModule, roles: tuple[str, ...], dims: int = 2) -> bool:
        missing = [role for role in roles if role not in module.keys]
        if missing:
            self.error(f"module {module.path!r} has no {' or '.join(missing)}", module.first_key)
            return False
        wrong = [role for role in roles if len(module.shapes[role]) != dims]
        if wrong:
            self.error(
                f"{len(module.shapes[wrong[0]])}-D {wrong[0]}: only LoRA and DoRA are merged on convolutions",
                module.keys[wrong[0]],
                "only Linear, Conv1D, Embedding and MoE expert layers take other adapter types",
            )
            return False
        return True

    def lora(self, module: AdapterModule) -> None:
        a_role, b_role = ("embedding_A", "embedding_B") if module.is_embedding else ("lora_A", "lora_B")
        if not module.is_embedding and len(module.shapes.get("lora_A", ())) > 2:
            self.conv_lora(module)
            return
        if not self.require(module, (a_role, b_role)):
            return
        a_key, b_key = module.keys[a_role], module.keys[b_role]
        a_shape, b_shape = module.shapes[a_role], module.shapes[b_role]
        parameter = self.target_parameter(module)
        if parameter is not None:
            if "magnitude" in module.keys or "lora_B_bias" in module.keys:
                self.error("DoRA and lora_bias on target_parameters cannot be merged", module.first_key)
                return
            self.expert_lora(module, parameter, a_shape, b_shape)
            return
        if not self.check_rank(module, {"A": a_shape[0], "B": b_shape[1]}):
            return
        mapping = self.target(f"{module.path}.weight", a_key)
        if mapping is None:
            return
        base = self.tensor(mapping)
        layout = self.layout(module, base, (b_shape[0], a_shape[1]), a_key)
        if layout is None:
            return
        # DoRA's magnitude has one entry per output feature: B's rows in every layout.
        self.add_lora(module, mapping, layout, (a_key, b_key), (b_shape[0],))

    def add_lora(
        self,
        module: AdapterModule,
        mapping: Mapping,
        layout: str,
        factors: tuple[str, str],
        magnitude_shape: tuple[int, ...],
    ) -> None:
        """Record LoRA (the keys of A and B in ``factors``), or DoRA where the module has a
        magnitude of ``magnitude_shape``, and its lora_B bias."""
        a_key, b_key = factors
        keys: tuple[str, ...] = factors
        kind = "lora"
        magnitude = module.keys.get("magnitude")
        if magnitude is not None:
            if module.shapes["magnitude"] != magnitude_shape:
                self.error(
                    f"shape mismatch: DoRA magnitude has {list(module.shapes['magnitude'])}, "
                    f"expected {list(magnitude_shape)}",
                    magnitude,
                )
                return
            kind, keys = "dora", (a_key, b_key, magnitude)
        elif self.adapter.config.get("use_dora"):
            self.error("use_dora is set but the module has no lora_magnitude_vector", a_key)
            return
        self.add(mapping, kind, keys, layout, module.path)
        if "lora_B_bias" in module.keys:
            self.bias_update(module, "bias", module.keys["lora_B_bias"], module.shapes["lora_B_bias"])

    def conv_lora(self, module: AdapterModule) -> None:
        """LoRA (or DoRA) on a convolution, as PEFT's Conv1d/2d/3d layers make it: A is a
        convolution (r, in, *kernel), B a 1x1 one (out, r, 1, ...), and the update is B @ A on
        the weight read as the matrix (out, in * kernel). PEFT merges no grouped convolution."""
        if not self.require(module, ("lora_A", "lora_B"), dims=len(module.shapes["lora_A"])):
            return
        a_key, b_key = module.keys["lora_A"], module.keys["lora_B"]
        a_shape, b_shape = module.shapes["lora_A"], module.shapes["lora_B"]
        mapping = self.target(f"{module.path}.weight", a_key)
        if mapping is None:
            return
        base = self.tensor(mapping)
        grouped = len(base.shape) == len(a_shape) and base.shape[1] and a_shape[1] % base.shape[1] == 0
        if grouped and a_shape[1] != base.shape[1]:
            self.error(
                f"LoRA on a grouped convolution ({a_shape[1] // base.shape[1]} groups), {base.name!r} "
                f"{list(base.shape)}: PEFT does not merge it either",
                a_key,
                "leave this module out of target_modules, or keep the adapter unmerged",
            )
            return
        out_in = (b_shape[0], *a_shape[1:])
        if any(size != 1 for size in b_shape[2:]) or base.shape != out_in:
            self.error(
                f"shape mismatch: A {list(a_shape)} and B {list(b_shape)} give a convolution update of "
                f"{list(out_in)}, base tensor {base.name!r} is {list(base.shape)}",
                a_key,
                "the adapter belongs to another model, or to another size of it",
            )
            return
        if not self.check_rank(module, {"A": a_shape[0], "B": b_shape[1]}):
            return
        # PEFT keeps a convolution's DoRA magnitude as (1, out, 1, ...).
        self.add_lora(module, mapping, "conv", (a_key, b_key), (1, b_shape[0], *(1,) * (len(base.shape) - 2)))

    def layout(self, module: AdapterModule, base: TensorInfo, out_in: tuple[int, int], key: str) -> str | None:
        """How an (out, in) update lies against ``base``: ``linear`` (nn.Linear, [out, in]) or
        ``conv1d`` (GPT-2's Conv1D, [in, out]), from the module's type where the architecture
        says and from the shapes where they differ; None, with the problem recorded, where the
        shapes do not fit or nothing decides."""
        if module.is_embedding:
            # lora_embedding_A is (r, num_embeddings), lora_embedding_B is (dim, r).
            fits = ["embedding"] if base.shape == out_in[::-1] else []
            return fits[0] if fits else self.choose_layout(module, base, fits, f"a delta of {list(out_in)}", key)
        fits = [layout for layout, shape in (("linear", out_in), ("conv1d", out_in[::-1])) if base.shape == shape]
        return self.choose_layout(module, base, fits, f"a delta of {list(out_in)}", key)

    def choose_layout(
        self, module: AdapterModule, base: TensorInfo, fits: list[str], what: str, key: str
    ) -> str | None:
        """The one layout of ``fits`` (those the shapes allow) that the module's type allows."""
        conv1d = self.layouts.is_conv1d(module.path)
        if conv1d is not None and not module.is_embedding:
            declared = "conv1d" if conv1d else "linear"
            if declared in fits:
                return declared
            if fits:
                stored = "GPT-2's Conv1D [in, out]" if conv1d else "nn.Linear [out, in]"
                self.error(
                    f"{what} does not fit base tensor {base.name!r} {list(base.shape)} stored as {stored} "
                    f"({self.layouts.source})",
                    key,
                    "the adapter belongs to another model; " + CONV1D_HINT,
                )
                return None
        elif len(fits) > 1:
            self.error(
                f"square weight {base.name!r} {list(base.shape)}: whether it is stored as nn.Linear [out, in] or as "
                f"GPT-2's Conv1D [in, out] cannot be told ({self.layouts.unknown})",
                key,
                CONV1D_HINT,
            )
            return None
        if fits:
            return fits[0]
        self.error(
            f"shape mismatch: {what} fits neither base tensor {base.name!r} {list(base.shape)} nor its transpose",
            key,
            "the adapter belongs to another model, or to another size of it",
        )
        return None

    def bias_update(self, module: AdapterModule, kind: str, key: str, shape: tuple[int, ...]) -> None:
        mapping = self.target(f"{module.path}.bias", key)
        if mapping is None:
            return
        base_shape = self.tensor(mapping).shape
        if (shape[0] if kind == "bias" else max(shape)) != base_shape[0]:
            self.error(f"shape mismatch: {list(shape)} against the base bias {list(base_shape)}", key)
            return
        self.add(mapping, kind, (key,), "bias", module.path)

    def target_parameter(self, module: AdapterModule) -> list[str] | None:
        """Names of the parameters ``target_parameters`` may have put on this module, if any.
        An entry names ``module.parameter`` (matching the end of the module's path), or a
        bare parameter name (PEFT 0.21 writes those when it moves a ``target_modules`` recipe
        onto fused experts), which any module of the base that holds it may have."""
        wanted = self.adapter.config.get("target_parameters") or []
        names = []
        for entry in wanted:
            owner, _, parameter = entry.rpartition(".")
            on_module = targets.named(module.path, owner)
            if on_module if owner else bool(self.expert_targets(module, parameter)):
                names.append(parameter)
        return list(dict.fromkeys(names)) or None  # a parameter named both ways counts once

    def expert_lora(
        self, module: AdapterModule, parameters: list[str], a_shape: tuple[int, ...], b_shape: tuple[int, ...]
    ) -> None:
        """LoRA on a fused expert parameter (transformers v5 ``target_parameters``): A is
        (r * E, in), B is (out, r * E); expert e takes rows e*r..e*r+r-1 of A and columns
        k*E + e of B. The checkpoint holds either the fused 3-D tensor or one per expert."""
        fits = []
        for parameter in parameters:
            fits += [
                (parameter, target)
                for target in self.expert_targets(module, parameter)
                if target[2] == (b_shape[0], a_shape[1])
            ]
        split = [target for _, target in fits if target[3] is None and len(target[1]) > target[0]]
        if split and self.layouts.gate_up_interleaved is not False:
            why = "interleaves" if self.layouts.gate_up_interleaved else "may interleave (unknown architecture)"
            self.error(
                f"the model {why} gate and up columns in its fused gate_up_proj, so the adapter's rows for "
                f"{module.path!r} cannot be split into the checkpoint's per-expert gate and up tensors",
                module.keys["lora_A"],
                "merge into a checkpoint that stores the fused expert tensors",
            )
            return
        if len(fits) != 1:
            found = "no" if not fits else "more than one"
            self.error(
                f"{found} expert parameter of {module.path!r} ({', '.join(parameters)}) fits A {list(a_shape)} and "
                f"B {list(b_shape)}",
                module.keys["lora_A"],
                "check that this adapter was trained on this base model",
            )
            return
        parameter, (experts, parts, _, layout) = fits[0]
        key = f"{module.path}.{parameter}"  # PEFT matches rank and alpha patterns against this
        if not self.check_rank(module, {"A": a_shape[0], "B": b_shape[1]}, experts=experts, key=key):
            return
        keys = (module.keys["lora_A"], module.keys["lora_B"])
        if layout is not None:
            mapping = parts[0][0]
            self.add(mapping, "lora", keys, layout, module.path, key=key, experts=experts)
            return
        per_expert = len(parts) // experts
        for expert in range(experts):
            start = 0
            for mapping, rows in parts[expert * per_expert : (expert + 1) * per_expert]:
                span = (start, start + rows)
                self.add(
                    mapping, "lora", keys, "linear", module.path, key=key, expert=expert, experts=experts, rows=span
                )
                start += rows

    def expert_targets(
        self, module: AdapterModule, parameter: str
    ) -> list[tuple[int, list[tuple[Mapping, int]], tuple[int, int], str | None]]:
        """Where ``module.parameter`` lives in the checkpoint: (experts, [(tensor, rows)...],
        fused (out, in), layout of a fused 3-D tensor or None for per-expert tensors)."""
        found = []
        fused = self.find(f"{module.path}.{parameter}")
        shape = self.base[fused.target].shape if fused.target is not None else ()
        if len(shape) == 2:  # a plain 2-D parameter: PEFT treats it as one Linear weight
            found.append((1, [(fused, shape[0])], (shape[0], shape[1]), "linear"))
        elif len(shape) == 3:
            # The orientation PEFT's delta takes, from the architecture; from the shapes only
            # where it is unknown (a square expert fits both: refused as ambiguous).
            experts, first, second = shape
            # A layout the conversion rules decide for this checkpoint comes first.
            transposed = self.names.transposed.get(fused.target or "", self.layouts.experts_transposed)
            if transposed is not True:
                found.append((experts, [(fused, first)], (first, second), "experts-out-in"))
            if transposed is not False:
                found.append((experts, [(fused, second)], (second, first), "experts-in-out"))
        for names in _EXPERT_LAYOUTS.get(parameter, ()):
            parts: list[tuple[Mapping, int]] = []
            expert = 0
            while True:
                mappings = [self.find(f"{module.path}.{expert}.{name}.weight") for name in names]
                if any(mapping.target is None for mapping in mappings):
                    break
                shapes = [self.tensor(mapping).shape for mapping in mappings]
                if any(len(shape) != 2 or shape[1] != shapes[0][1] for shape in shapes):
                    break
                parts += [(mapping, shape[0]) for mapping, shape in zip(mappings, shapes, strict=True)]
                expert += 1
            if expert:
                rows = sum(rows for _, rows in parts[: len(names)])
                inputs = self.tensor(parts[0][0]).shape[1]
                found.append((expert, parts, (rows, inputs), None))
        return found

    def loha(self, module: AdapterModule) -> None:
        roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not self.require(module, roles):
            return
        shapes = [module.shapes[role] for role in roles]
        if not self.check_rank(
            module, {"w1_a": shapes[0][1], "w1_b": shapes[1][0], "w2_a": shapes[2][1], "w2_b": shapes[3][0]}
        ):
            return
        out_in = (shapes[0][0], shapes[1][1])
        self.dense_update(
            module, "loha", tuple(module.keys[role] for role in roles), out_in, (shapes[2][0], shapes[3][1])
        )

    def lokr(self, module: AdapterModule) -> None:
        keys: list[str] = []
        factors = []
        ranks = {}
        for factor in ("w1", "w2"):
            whole, left, right = f"lokr_{factor}", f"lokr_{factor}_a", f"lokr_{factor}_b"
            if whole in module.keys:
                keys += [module.keys[whole], "", ""]
                factors.append(module.shapes[whole])
            elif self.require(module, (left, right)):
                keys += ["", module.keys[left], module.keys[right]]
                factors.append((module.shapes[left][0], module.shapes[right][1]))
                ranks[f"{factor}_a"] = module.shapes[left][1]
            else:
                return
        if any(len(shape) != 2 for shape in factors):
            self.error("LoKr on convolutions is not supported", module.first_key)
            return
        if ranks and not self.check_rank(module, ranks):
            return
        out_in = (factors[0][0] * factors[1][0], factors[0][1] * factors[1][1])
        self.dense_update(module, "lokr", tuple(keys), out_in, out_in)

    def dense_update(
        self, module: AdapterModule, kind: str, keys: tuple[str, ...], out_in: tuple[int, int], other: tuple[int, int]
    ) -> None:
        if other != out_in:
            self.error(f"shape mismatch between the factors of {module.path!r}", module.first_key)
            return
        mapping = self.target(f"{module.path}.weight", module.first_key)
        if mapping is None:
            return
        base = self.tensor(mapping)
        if base.shape != out_in:
            self.error(
                f"shape mismatch: the update is {list(out_in)}, base tensor {base.name!r} is {list(base.shape)}",
                module.first_key,
                "the adapter belongs to another model, or to another size of it",
            )
            return
        if self.layouts.is_conv1d(module.path):
            # PEFT makes LoHa and LoKr layers only for nn.Linear (and convolutions).
            self.error(
                f"{kind} update on {base.name!r}, a Conv1D layer ({self.layouts.source}): PEFT has no such layer",
                module.first_key,
                "the adapter belongs to another model; " + CONV1D_HINT,
            )
            return
        self.add(mapping, kind, keys, "linear", module.path)

    def ia3(self, module: AdapterModule) -> None:
        key, shape = module.keys["ia3_l"], module.shapes["ia3_l"]
        mapping = self.target(f"{module.path}.weight", key)
        if mapping is None:
            return
        base = self.tensor(mapping)
        if len(base.shape) != 2:
            self.error(f"IA3 on a {len(base.shape)}-D tensor is not supported", key)
            return
        feedforward = _is_feedforward(self.adapter.config.get("feedforward_modules"), module.path)
        fits = []
        for layout, (out_features, in_features) in (("linear", base.shape), ("conv1d", base.shape[::-1])):
            if shape == ((1, in_features) if feedforward else (out_features, 1)):
                fits.append(layout)
        layout = self.choose_layout(module, base, fits, f"ia3_l {list(shape)}", key)
        if layout is None:
            return
        self.add(mapping, "ia3", (key,), layout, module.path)
        if not feedforward and self.find(f"{module.path}.bias").target is not None:
            self.bias_update(module, "ia3", key, shape)

    def tokens(self, module: AdapterModule) -> None:
        key, shape = module.keys["tokens"], module.shapes["tokens"]
        indices = self.adapter.token_indices(module.path)
        if indices is None:
            self.error(f"no trainable_token_indices entry for {module.path!r} in the config", key)
            return
        mapping = self.target(f"{module.path}.weight", key)
        if mapping is None:
            return
        base = self.tensor(mapping)
        if shape != (len(indices), base.shape[-1]) or len(base.shape) != 2:
            self.error(
                f"shape mismatch: {list(shape)} for {len(indices)} token indices into base {list(base.shape)}", key
            )
            return
        if indices and not 0 <= min(indices) <= max(indices) < base.shape[0]:
            self.error(f"token index out of range for a vocabulary of {base.shape[0]}", key)
            return
        self.add(mapping, "tokens", (key,), "shared", module.path, indices=tuple(indices))


def _is_feedforward(spec: object, path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    if isinstance(spec, list):
        return any(targets.named(path, name) for name in spec)
    return False
