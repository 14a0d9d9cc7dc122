"""What every quantized format shares: ``QuantFormat``, one checkpoint's weight quantization
read from its config; ``QuantizedWeight``, a weight found in its shards with the companion
tensors it is read with; and ``Codec``, the protocol one file per format implements, with
the registry the planner asks.

A codec reads the config it claims, finds its weights and their companions by dtype and the
presence of every companion (never by name patterns alone), describes the format, and gives
the scale grid and the row step that blocks of rows must respect. Registering a codec is one
line in ``codecs/__init__.py``; the conformance tests in ``tests/codecs/`` run over every
registered codec.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError, ShardmergeError
from ..formats.confined import open_input
from ..formats.safetensors import TensorInfo

HINT = "merge into the 16-bit release of the base model"
MIXED = "mixed-precision"  # compressed-tensors: a format a config group
INCOMPLETE = "the checkpoint is incomplete or not in the format its config declares"
IGNORED = "the weight is quantized, but the config lists its module as left unquantized"
Located = tuple[TensorInfo, Path]


@dataclass(frozen=True)
class QuantFormat:
    """One checkpoint's weight quantization, as its codec read it from the config.

    method: the config's ``quant_method``; packing: how several values share a stored
    element (None: one value an element); the two name the codec (``codec_of``). strategy:
    ``block``, ``group``, ``channel`` or ``tensor``, with ``block`` the (rows, columns) a scale
    covers. ue8m0: scales are powers of two. activations: the module tensors that hold static
    activation scales, carried over as they are and dropped with the quantization.
    """

    method: str
    scale_suffix: str
    strategy: str
    block: tuple[int, int] | None
    ue8m0: bool
    ignore: tuple[str, ...]
    activations: tuple[str, ...]
    kv_cache: bool = False
    packing: str | None = None
    bits: int = 8
    symmetric: bool = True

    @property
    def codec(self) -> Codec:
        return codec_of(self)

    def describe(self) -> str:
        return self.codec.describe(self)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale tensor's shape for a weight of ``shape`` (leading dims are batches)."""
        return self.codec.scale_shape(self, shape)

    def row_step(self) -> int:
        """Rows that share a scale: blocks of rows must start at multiples of this."""
        return self.codec.row_step(self)

    def ignored(self, module: str) -> bool:
        """Whether the config lists ``module`` as left unquantized."""
        return self.codec.ignored(self, module)

    @property
    def packed(self) -> bool:
        """Several values to a stored element: merged one matrix's rows at a time."""
        return self.codec.packed


def grid_shape(fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale grid of a weight of ``shape``: per block, per row or per tensor."""
    *lead, rows, cols = shape
    if fmt.strategy == "tensor":
        return (*lead, 1, 1)
    if fmt.strategy == "channel":
        return (*lead, rows, 1)
    assert fmt.block is not None
    return (*lead, math.ceil(rows / fmt.block[0]), math.ceil(cols / fmt.block[1]))


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight: ``name``, the model's name for it, and ``model_shape``, its shape
    there; ``shape``, its values as stored ([experts,] rows, columns; the model's transpose
    where ``transposed``); the stored ``weight``, the ``companions`` it is read with (its
    scale first), and the tensors a dequantized output drops beside them (``extra``).
    ``shares``: the stored weights (its own among them) that must share its scale of the whole
    weight, requantized together where one of them is merged."""

    name: str
    model_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transposed: bool
    weight: Located
    companions: tuple[Located, ...]
    extra: tuple[str, ...] = ()
    shares: tuple[str, ...] = ()

    @property
    def stored(self) -> tuple[str, ...]:
        """Every stored tensor of the weight."""
        return (self.weight[0].name, *(info.name for info, _ in self.companions), *self.extra)


class Codec(Protocol):
    """One quantized format (or family of formats read alike), registered once.

    name: what ``plan`` calls what is stored. packed: several values share a stored element.
    writes: a merged weight can be written back in the format (else outputs are 16-bit).
    stored_as: how its tensors show in a header, in words. Every method is pure: no torch, no
    reading but the few bytes ``find`` needs (packed integers' shapes, quantization states).
    """

    name: str
    packed: bool
    writes: bool
    stored_as: str

    def claims(self, quantization: Mapping[str, Any]) -> bool:
        """Whether a ``quantization_config`` is one of this codec's formats."""
        ...

    def read(self, quantization: dict[str, Any], path: Path) -> QuantFormat:
        """The config read, or an InputError naming what is not supported."""
        ...

    def owns(self, fmt: QuantFormat) -> bool: ...

    def describe(self, fmt: QuantFormat) -> str: ...

    def keeps(self, fmt: QuantFormat) -> str:
        """What a requantized update keeps, in words (for ``plan``)."""
        ...

    def scale_shape(self, fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def row_step(self, fmt: QuantFormat) -> int: ...

    def ignored(self, fmt: QuantFormat, module: str) -> bool: ...

    def is_stored(self, name: str, info: TensorInfo) -> bool:
        """Whether a header's tensor is stored in this format (whatever the config says)."""
        ...

    def find(
        self,
        fmt: QuantFormat,
        tensors: Mapping[str, Located],
        problems: list[ShardmergeError],
        *,
        transposed: bool | None,
    ) -> dict[str, QuantizedWeight]:
        """Every quantized weight by its model name; a problem for each half-present one.
        ``transposed``: whether the architecture's expert parameters are [experts, in, out]
        (None: unknown)."""
        ...

    def label(self, fmt: QuantFormat, stored_dtype: str, companions: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        """What ``plan`` calls the stored values, and what they are read with: from the
        stored dtype and the companions' (name, dtype) pairs."""
        ...


_REGISTRY: list[Codec] = []


def register(codec: Codec) -> Codec:
    """Add ``codec`` to the registry (once, from its own module)."""
    if any(known.name == codec.name for known in _REGISTRY):
        raise ValueError(f"a codec named {codec.name!r} is registered already")
    _REGISTRY.append(codec)
    return codec


def registered() -> tuple[Codec, ...]:
    return tuple(_REGISTRY)


def codec_of(fmt: QuantFormat) -> Codec:
    """The codec that read ``fmt``."""
    owners = [codec for codec in _REGISTRY if codec.owns(fmt)]
    if len(owners) != 1:
        raise ValueError(f"{len(owners)} codecs own {fmt}")
    return owners[0]


def read_quantization(config: Mapping[str, Any], path: Path) -> QuantFormat | None:
    """The base's weight quantization from its config.json, or None for an unquantized base;
    an InputError naming the format for anything no codec can merge into exactly."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    if not isinstance(quantization, dict):
        raise InputError("quantization_config is not an object", file=path, hint=HINT)
    claims = [codec for codec in _REGISTRY if codec.claims(quantization)]
    if not claims:
        method = str(quantization.get("quant_method", "unknown"))
        if "format" in quantization:
            method += f" (format {quantization['format']!r})"
        raise InputError(
            f"the base is quantized with {method}, which shardmerge cannot merge into", file=path, hint=HINT
        )
    assert len(claims) == 1, [codec.name for codec in claims]
    return claims[0].read(quantization, path)


@dataclass(frozen=True)
class Declaration:
    """One way a config quantizes weights: a format, and for one config group of a
    compressed-tensors ``mixed-precision`` config, the group's name and targets (none: the
    format covers every module)."""

    format: QuantFormat
    group: str | None = None
    targets: tuple[str, ...] = ()

    def rank(self, module: str) -> int:
        """How closely the targets name ``module``, in compressed-tensors' precedence: 3 by
        its exact name, 2 by a regular expression (``re:``), 1 by a class name (``Linear``,
        which a checkpoint cannot confirm: any module), 0 not at all."""
        if self.group is None:
            return 1
        rank = 0
        for target in self.targets:
            if target == module:
                return 3
            if target.startswith("re:") and re.match(target[3:], module):
                rank = 2
            elif rank < 1 and target[:1].isupper() and "." not in target:
                rank = 1
        return rank

    def describe(self) -> str:
        if self.group is None:
            return self.format.describe()
        return f"{self.format.describe()} for config group {self.group} ({', '.join(self.targets)})"


def read_declarations(config: Mapping[str, Any], path: Path) -> tuple[Declaration, ...]:
    """What the base's config.json declares: nothing for an unquantized base, one format, or
    for a compressed-tensors ``mixed-precision`` config one a config group, each read by the
    codec that claims the group's own ``format``. An InputError for anything no codec reads."""
    quantization = config.get("quantization_config")
    if not (isinstance(quantization, dict) and quantization.get("format") == MIXED):
        fmt = read_quantization(config, path)
        return () if fmt is None else (Declaration(fmt),)
    if quantization.get("quant_method") != "compressed-tensors":
        raise InputError("only compressed-tensors configs declare mixed-precision formats", file=path, hint=HINT)
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError("a mixed-precision config without config_groups", file=path, hint=HINT)
    declarations = []
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("format"), str) or group["format"] == MIXED:
            raise InputError(f"config group {name} names no format of its own", file=path, hint=HINT)
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise InputError(f"config group {name} has no list of targets", file=path, hint=HINT)
        for target in targets:
            try:
                re.compile(target.removeprefix("re:"))
            except re.error as exc:
                raise InputError(
                    f"target {target!r} is not a regular expression ({exc})", file=path, hint=HINT
                ) from None
        single = {**quantization, "format": group["format"], "config_groups": {name: group}}
        fmt = read_quantization({"quantization_config": single}, path)
        assert fmt is not None
        declarations.append(Declaration(fmt, str(name), tuple(targets)))
    return tuple(declarations)


def positive_ints(values: object, count: int) -> bool:
    """A list of ``count`` JSON integers above zero (``true`` is not one)."""
    return isinstance(values, list) and len(values) == count and all(type(n) is int and n > 0 for n in values)


def names(entries: object, path: Path) -> tuple[str, ...]:
    """An ignore list: a list of strings."""
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise InputError(f"the ignore list {entries!r} is not a list of names", file=path, hint=HINT)
    return tuple(entries)


def problem(problems: list[ShardmergeError], message: str, where: Located, hint: str = HINT) -> None:
    problems.append(InputError(message, file=where[1], tensor=where[0].name, hint=hint))


def transformers_ignored(fmt: QuantFormat, module: str) -> bool:
    """transformers' rule for ``modules_to_not_convert``: a prefix up to a module boundary, a
    regular expression, or a suffix."""
    return any(re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(key) for key in fmt.ignore)


def compressed_ignored(fmt: QuantFormat, module: str) -> bool:
    """compressed-tensors' rule for ``ignore``: a name, or ``re:`` and a regular expression."""
    return any(re.match(key[3:], module) if key.startswith("re:") else key == module for key in fmt.ignore)


def check_ignore(keys: tuple[str, ...], path: Path, *, prefixed: bool) -> tuple[str, ...]:
    """The ignore list's entries are names or expressions that compile (after ``re:`` where
    ``prefixed``), as the ignore rule reads them."""
    for key in keys:
        try:
            re.compile(key.removeprefix("re:") if prefixed else key)
        except re.error as exc:
            raise InputError(
                f"ignore entry {key!r} is not a regular expression ({exc})", file=path, hint=HINT
            ) from None
    return keys


def weight_args(quantization: dict[str, Any], path: Path) -> dict[str, Any]:
    """The one way a compressed-tensors config quantizes weights (every group alike)."""
    groups = quantization.get("config_groups") or {}
    weights = [group.get("weights") for group in groups.values() if isinstance(group, dict)]
    if not weights or any(not isinstance(args, dict) for args in weights):
        raise InputError("compressed-tensors config_groups declare no weight quantization", file=path, hint=HINT)
    if any(args != weights[0] for args in weights):
        raise InputError("compressed-tensors config_groups quantize weights in different ways", file=path, hint=HINT)
    return weights[0]


def small_values(wanted: Sequence[Located], problems: list[ShardmergeError], what: str) -> dict[str, bytes]:
    """The bytes of small tensors a codec reads while planning (packed weights' shapes,
    quantization states), each shard opened once. A shard not on disk (a Hub base's, whose
    headers alone are read before the merge) is one problem, ``what`` it holds: the weights
    cannot be told without its data."""
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for info, path in wanted:
        by_file[path].append(info)
    values: dict[str, bytes] = {}
    for path, infos in by_file.items():
        if not path.is_file():
            problems.append(
                InputError(
                    f"{what}, which is not downloaded",
                    file=path,
                    tensor=infos[0].name,
                    hint="download the base (hf download REPO --local-dir DIR) and merge from that folder",
                )
            )
            continue
        fd = open_input(path)
        try:
            for info in infos:
                values[info.name] = os.pread(fd, info.end - info.begin, info.begin)
        finally:
            os.close(fd)
    return values
