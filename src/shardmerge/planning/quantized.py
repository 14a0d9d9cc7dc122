"""A base's weight quantization, as the plan sees it: the formats its config declares (one, or
one a config group of a compressed-tensors mixed-precision config), the quantized weights each
declared codec finds among the tensors it covers, the checks that the config is the
checkpoint's, and where quantization changes the output's layout (``QuantLayout``).

Which format a tensor is in is decided by the declaration that covers its module and by the
companions it has, never by its dtype alone: an FP8-E4M3 tensor is an FP8 weight where an FP8
declaration covers it and finds its scale, and an NVFP4 weight's scale where an NVFP4 one
does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..codecs import Declaration, QuantFormat, QuantizedWeight, read_declarations, registered
from ..codecs.base import Located
from ..errors import InputError, ShardmergeError
from ..formats.safetensors import TensorInfo
from .model import MergeOp, QuantRead

# Tensors stored in a format no codec reads, in words, and the test.
_UNREAD = (("F8_E5M2", lambda name, info: info.dtype == "F8_E5M2"),)


@dataclass(frozen=True)
class Quantization:
    """``declared``: what the config declares; ``weights``: every quantized weight by its
    model name; ``reader``: the declaration each weight is read by, and ``owner`` the one that
    covers each tensor of the checkpoint (indices into ``declared``)."""

    declared: tuple[Declaration, ...] = ()
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    reader: dict[str, int] = field(default_factory=dict)
    owner: dict[str, int] = field(default_factory=dict)

    def format_of(self, name: str) -> QuantFormat:
        """The format weight ``name`` is read in."""
        return self.declared[self.reader[name]].format

    @property
    def writes(self) -> bool:
        """Whether every declared format can be written back (the base's format kept)."""
        return all(declaration.format.codec.writes for declaration in self.declared)

    @property
    def kv_cache(self) -> bool:
        return any(declaration.format.kv_cache for declaration in self.declared)

    @property
    def bitsandbytes(self) -> bool:
        return any(declaration.format.method == "bitsandbytes" for declaration in self.declared)

    def describe(self) -> str | None:
        return "; ".join(declaration.describe() for declaration in self.declared) or None


def read_declared(
    config: dict[str, Any] | None, path: Path, problems: list[ShardmergeError]
) -> tuple[Declaration, ...]:
    try:
        return read_declarations(config or {}, path)
    except ShardmergeError as exc:
        problems.append(exc)
        return ()


def find_quantized(
    declared: tuple[Declaration, ...],
    located: Mapping[str, Located],
    problems: list[ShardmergeError],
    *,
    transposed: bool | None,
) -> Quantization:
    """Each declaration's codec finds its weights among the tensors it covers. Where config
    groups declare formats, a module belongs to the group whose targets name it most closely
    (its exact name, then a regular expression, then a class name); a module that two groups
    name alike and whose tensors are quantized is refused, naming the groups."""
    if not declared:
        return Quantization()
    owner: dict[str, int] = {}
    refused: set[str] = set()
    for name, (info, path) in located.items():
        module = name.rpartition(".")[0]
        ranks = [declaration.rank(module) for declaration in declared]
        owners = [index for index, rank in enumerate(ranks) if rank and rank == max(ranks)]
        if len(owners) == 1:
            owner[name] = owners[0]
        elif owners and module not in refused and any(codec.is_stored(name, info) for codec in registered()):
            refused.add(module)
            groups = " and ".join(str(declared[index].group) for index in owners)
            problems.append(
                InputError(
                    f"config groups {groups} name this module alike: the format it is in cannot be told",
                    file=path,
                    tensor=name,
                    hint="the config does not say which group quantizes it; name it in one group's targets",
                )
            )
    weights: dict[str, QuantizedWeight] = {}
    reader: dict[str, int] = {}
    for index, declaration in enumerate(declared):
        fmt = declaration.format
        covered = {name: where for name, where in located.items() if owner.get(name) == index}
        for name, weight in fmt.codec.find(fmt, covered, problems, transposed=transposed).items():
            weights[name] = weight
            reader[name] = index
    return Quantization(declared, weights, reader, owner)


def check_declared(
    quantization: Quantization,
    located: Mapping[str, Located],
    config: Path,
    problems: list[ShardmergeError],
) -> None:
    """A config's quantization must be the checkpoint's: a declared format that no tensor is
    stored in, or tensors stored in a format that no declaration covering them declares, are
    refused (the output would carry a false quantization_config, or tensors whose scales
    cannot be known). The tensors of the weights found are their formats' own (an NVFP4
    weight's FP8 scales are not FP8 weights)."""
    declared = quantization.declared
    claimed = {name for weight in quantization.weights.values() for name in weight.stored}
    first, *others = [(codec.name, codec.stored_as, codec.is_stored) for codec in registered()]
    kinds = [first, *[(None, what, test) for what, test in _UNREAD], *others]
    for index, declaration in enumerate(declared):
        codec = declaration.format.codec
        mine = [(name, info) for name, (info, _) in located.items() if quantization.owner.get(name) == index]
        if not any(codec.is_stored(name, info) for name, info in mine):
            problems.append(
                InputError(
                    f"declares {declaration.describe()}, but no tensor "
                    f"{'it covers' if declaration.group else 'of the checkpoint'} is stored in it",
                    file=config,
                    hint="the config does not belong to these weights: remove its quantization_config if they are "
                    "16-bit, or download the checkpoint again",
                )
            )
    said = f"config.json declares {quantization.describe()}" if declared else "config.json declares no quantization"
    if any(declaration.group for declaration in declared):
        said = "no config group of config.json declares that format for its module"
    for kind, what, test in kinds:

        def covered(name: str, kind: str | None = kind) -> bool:
            """Covered by a declaration of this format (whose codec reports what is wrong)."""
            return name in quantization.owner and declared[quantization.owner[name]].format.codec.name == kind

        names = [n for n, (info, _) in located.items() if test(n, info) and n not in claimed and not covered(n)]
        if names:
            more = f", as are {len(names) - 1} more tensors" if len(names) > 1 else ""
            problems.append(
                InputError(
                    f"stored as {what}{more}, but {said}",
                    file=located[names[0]][1],
                    tensor=names[0],
                    hint="the config does not belong to these weights; merge into the 16-bit release of the base",
                )
            )


def sharing_merged(quantization: Quantization, ops: Mapping[str, list[MergeOp]]) -> set[str]:
    """The stored weights that share a scale of the whole weight with a merged one (fused
    layers' NVFP4 global scale): requantized with it, whether merged or not."""
    return {stored for name, weight in quantization.weights.items() if ops.get(name) for stored in weight.shares}


def quantization_notes(quantization: Quantization, ops: Mapping[str, list[MergeOp]], dtype: str) -> tuple[str, ...]:
    """What the plan says of each declared format: dequantized, or kept and what a
    requantized update keeps in it."""
    notes: list[str] = []
    for index, declaration in enumerate(quantization.declared):
        fmt = declaration.format
        names = [name for name, reader in quantization.reader.items() if reader == index]
        merged = sum(1 for name in names if ops.get(name))
        if dtype != "base":
            why = "" if fmt.codec.writes else f" ({fmt.describe()} weights are not written back)"
            notes.append(
                f"base in {declaration.describe()}: its {len(names)} quantized weights are dequantized in float32 and "
                f"written in {dtype}{why}, without their scales; config.json loses its quantization_config"
            )
            continue
        shared = sharing_merged(quantization, ops)
        siblings = sum(1 for name in names if not ops.get(name) and quantization.weights[name].weight[0].name in shared)
        notes.append(
            f"base in {declaration.describe()}, kept: {merged} merged weights are requantized once, as the format's "
            f"own quantizer does, with new scales; the other {len(names) - merged - siblings} are copied with their "
            "scales"
            + (
                f", and {siblings} that serving engines fuse with a merged one (q, k and v; gate and up) are "
                "requantized with the global scale they must share"
                if siblings
                else ""
            )
        )
        if merged:
            notes.append(
                f"requantizing keeps what the format can hold: {fmt.codec.keeps(fmt)}; the summary reports how much "
                "of each update survived (--dtype bfloat16 keeps all of it)"
            )
    return tuple(notes)


class QuantLayout:
    """Where a quantized base changes the layout: the weights read through their scales
    (``reads``), scale tensors recomputed from a merged weight (``scale_of``), those of them
    moved into their weight's shard (``moved``: the shard's file), and tensors that a
    dequantized output leaves out (``drop``: scales and static activation scales). A new
    scale always lies in its weight's shard: both are written in one pass, so a shard redone
    alone (on another device, say) cannot pair a weight with scales of another merge."""

    def __init__(
        self,
        quantization: Quantization,
        ops: Mapping[str, list[MergeOp]],
        tensors: Mapping[str, TensorInfo],
        dequantize: bool,
    ) -> None:
        self.reads: dict[str, QuantRead] = {}
        self.scale_of: dict[str, str] = {}
        self.moved: dict[str, Path] = {}
        self.drop: set[str] = set()
        # Weights stored under another name or shape than the model's (packed ones): the
        # model's name of a requantized one (its ops are planned under that name), and the
        # name and shape a dequantized one takes.
        self.model_name: dict[str, str] = {}
        self.rename: dict[str, tuple[str, tuple[int, ...]]] = {}
        shared = sharing_merged(quantization, ops)
        by_stored = {weight.weight[0].name: weight for weight in quantization.weights.values()}
        for name, weight in quantization.weights.items():
            info, file = weight.weight
            if not (dequantize or ops.get(name) or info.name in shared):
                continue
            fmt = quantization.format_of(name)
            read = QuantRead.of(fmt, weight, () if dequantize else tuple(by_stored[m] for m in weight.shares))
            if dequantize:  # under the model's name and shape, without its companions
                self.reads[name] = read
                if (name, weight.model_shape) != (info.name, info.shape):
                    self.rename[info.name] = (name, weight.model_shape)
                module = name.rpartition(".")[0]
                self.drop.update(weight.stored[1:])
                self.drop.update(key for key in (f"{module}.{suffix}" for suffix in fmt.activations) if key in tensors)
                continue
            # requantized in place, its companions computed from it and moved into its shard
            self.reads[info.name] = read
            if name != info.name:
                self.model_name[info.name] = name
            for companion, where in weight.companions:
                self.scale_of[companion.name] = info.name
                if where != file:
                    self.moved[companion.name] = file
