"""The Plan: plain, frozen data that decides every output byte. The planner builds it from
headers and configs; the executor carries it out without re-deciding anything."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..codecs.base import QuantFormat, QuantizedWeight
from ..formats.safetensors import TensorInfo, encode_header


@dataclass(frozen=True)
class MergeOp:
    """One adapter's change to one base tensor.

    kind: ``replace`` (a whole tensor from the adapter), ``lora``, ``dora``, ``bias``
    (lora_B.bias), ``loha``, ``lokr``, ``ia3`` or ``tokens`` (trainable token rows).
    keys: the adapter tensors the op reads, in the order the kernel takes them ("" where an
    optional factor is absent). layout: how the update lies against the base tensor:
    ``linear`` (out, in), ``conv1d`` (in, out), ``embedding`` (num_embeddings, dim),
    ``experts-out-in`` / ``experts-in-out`` (a fused 3-D expert tensor), ``conv`` (a
    convolution's (out, in, *kernel), read as the matrix (out, in * kernel)), ``full``, ``bias``.
    expert / experts / rows: for an adapter on fused MoE experts merged into one expert's
    tensor, the expert, the number of experts, and the rows of that expert's update that
    belong to this tensor (gate or up half). indices: rows replaced by trainable tokens.
    """

    adapter: int
    kind: str
    keys: tuple[str, ...]
    scale: float
    weight: float
    layout: str
    module: str
    rule: str
    expert: int | None = None
    experts: int = 0
    rows: tuple[int, int] | None = None
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stored:
    """A tensor of the base: name, file, absolute offsets, dtype and shape."""

    name: str
    source: str
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, info: TensorInfo, file: Path) -> Stored:
        return cls(info.name, str(file), info.begin, info.end, info.dtype, info.shape)


@dataclass(frozen=True)
class Member:
    """A quantized weight that shares another's scale of the whole weight (the parts of a
    layer that serving engines fuse, in NVFP4): its stored values and companions, read to find
    the largest magnitude of every part before any is requantized."""

    weight: Stored
    companions: tuple[Stored, ...]

    @classmethod
    def of(cls, weight: QuantizedWeight) -> Member:
        companions = tuple(Stored.of(info, file) for info, file in weight.companions)
        return cls(Stored.of(*weight.weight), companions)

    @property
    def files(self) -> set[str]:
        return {self.weight.source, *(companion.source for companion in self.companions)}


@dataclass(frozen=True)
class QuantRead:
    """How a quantized weight is read: its format, the companion tensors it is read with (its
    scale first, then any its codec reads beside it, such as zero points), ``values``, the
    shape of the values as stored ([experts,] rows, columns), ``transposed``: whether the
    model's parameter (and the adapter's delta) is their transpose, expert by expert, and
    ``shares``: the weights it must share its scale of the whole weight with, itself among
    them (none: its own)."""

    format: QuantFormat
    companions: tuple[Stored, ...]
    values: tuple[int, ...] = ()
    transposed: bool = False
    shares: tuple[Member, ...] = ()

    @classmethod
    def of(cls, fmt: QuantFormat, weight: QuantizedWeight, members: tuple[QuantizedWeight, ...] = ()) -> QuantRead:
        """The read of a weight the codec found, and of the ``members`` it shares its scale
        of the whole weight with (itself among them)."""
        companions = tuple(Stored.of(info, file) for info, file in weight.companions)
        return cls(fmt, companions, weight.shape, weight.transposed, tuple(Member.of(m) for m in members))

    @property
    def scale(self) -> Stored:
        return self.companions[0]

    @property
    def matrices(self) -> tuple[int, int, int]:
        """Experts (1 for a matrix), rows and columns of the values as stored."""
        values = self.values
        return (1, values[0], values[1]) if len(values) == 2 else (values[0], values[1], values[2])


class Action(str, Enum):
    """What is done to a tensor, decided once by the planner."""

    COPY = "copy"  # its bytes, as they are
    CONVERT = "convert"  # its values, in another float dtype
    MERGE = "merge"  # a float tensor, every op applied in float32, rounded once
    DEQUANTIZE = "dequantize"  # a quantized weight read through its scales (merged if it has ops)
    REQUANTIZE = "requantize"  # a quantized weight merged, then quantized again in its format
    RESCALE = "rescale"  # a companion (scales, zero points) of a requantized weight, recomputed


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor. ``src_begin``/``src_end`` are absolute offsets in the source shard,
    ``begin``/``end`` offsets in the output data buffer, ``block_rows`` how many rows of a
    merged tensor are worked on at once. ``quant``: a quantized weight that is dequantized (to
    a float dtype) or merged and requantized (its own dtype). ``scale_of``: a scale tensor
    whose values are recomputed from that merged weight. ``scales_follow``: the new scales of
    a requantized weight come after it in the shard, found block by block as it is written.
    ``base_rows``: the tensor is wholly replaced by an adapter's, which has another number of
    rows than the base's ``base_rows`` (added tokens); the base's values are not read.
    ``action``: what is done to it (see Action)."""

    name: str
    shape: tuple[int, ...]
    src_dtype: str
    dtype: str
    src_begin: int
    src_end: int
    begin: int
    end: int
    ops: tuple[MergeOp, ...]
    action: Action
    block_rows: int = 0  # rows merged at a time; the whole tensor where the ops need it
    quant: QuantRead | None = None
    scale_of: str | None = None
    scales_follow: bool = False
    base_rows: int = 0  # a tensor whose rows an adapter resized (added tokens): the base's rows
    # Its adapters' updates are combined by the plan's Combine (not applied in turn), in
    # ``passes`` passes over its blocks: the last merges, those before find each update's
    # thresholds or norms (see Combine.passes).
    combined: bool = False
    passes: int = 1

    def packed_block(self) -> tuple[int, int, bool, int, int]:
        """For a packed weight: the rows and columns of one matrix in the orientation it is
        computed in, whether that is the transpose of the stored one, and the most bytes of
        packed values and the most float32 values one of its blocks holds."""
        assert self.quant is not None
        experts, stored_rows, cols = self.quant.matrices
        row_bytes = (self.src_end - self.src_begin) // (experts * stored_rows)
        flipped = self.quant.transposed and self.action is not Action.REQUANTIZE
        rows, cols = (cols, stored_rows) if flipped else (stored_rows, cols)
        block = min(rows, self.block_rows)
        return rows, cols, flipped, stored_rows * row_bytes if flipped else block * row_bytes, block * cols

    @property
    def expert_rows(self) -> bool:
        """Whether this fused 3-D expert tensor is merged in blocks of one expert's rows (then
        ``block_rows`` counts those): every op is LoRA on the fused experts, and it is read as
        it is stored, not through scales."""
        return (
            len(self.shape) == 3
            and self.quant is None
            and bool(self.ops)
            and all(op.kind == "lora" and op.layout.startswith("experts-") for op in self.ops)
        )

    @property
    def computed(self) -> bool:
        """Whether the output values are computed (merged, dequantized or rescaled), not copied."""
        return self.action not in (Action.COPY, Action.CONVERT)

    @property
    def requantized(self) -> bool:
        return self.action is Action.REQUANTIZE

    @property
    def packed(self) -> bool:
        """A weight of a packed format, merged one matrix's rows at a time."""
        return self.quant is not None and self.quant.format.packed


def row_separable(op: MergeOp) -> bool:
    """Whether ``op`` can be applied to a block of the base tensor's rows on its own: true for
    every update whose rows depend only on the same rows of the base. DoRA on Conv1D and
    Embedding normalises columns over all rows, LoKr's Kronecker rows interleave, and fused
    3-D expert tensors are split by expert instead."""
    if op.layout.startswith("experts-") or op.kind in ("lokr", "bias"):
        return False
    return op.kind != "dora" or op.layout == "linear"


@dataclass(frozen=True)
class Combine:
    """How the adapters' updates of a tensor are combined (``--combine``): mergekit's method of
    the same name applied to the task vectors tau_i (adapter i's update at weight 1, zero where
    it does not touch the tensor). Each is pruned (``pruning``: the largest magnitudes kept for
    ties, a random mask for DARE, the largest and smallest dropped for breadcrumbs; adapter
    i's ``densities[i]`` is the fraction kept), multiplied by its weight, summed where its
    sign agrees with the elected one (``election``: ``sum`` or ``count`` of the *_ties methods;
    None: everywhere) and, with ``normalize``, divided by the weights summed alike. ``seed``
    draws DARE's masks, ``gamma`` is the fraction breadcrumbs drops from the top. Both tuples
    are indexed by adapter."""

    method: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    seed: int = 0
    gamma: float = 0.01
    election: str | None = None
    normalize: bool = False

    @property
    def pruning(self) -> str | None:
        """``magnitude`` (ties), ``random`` (DARE), ``outliers`` (breadcrumbs) or None."""
        return {"ties": "magnitude", "dare": "random", "breadcrumbs": "outliers"}.get(self.method.split("_")[0])

    def passes(self, adapters: set[int]) -> int:
        """Passes over the blocks of a tensor that ``adapters`` change: one that merges, after
        two that find each update's thresholds (ties and breadcrumbs; one more where a
        threshold falls among equal magnitudes and keeps only some) or one that finds each
        DARE update's norms, unless every density is 1."""
        if self.pruning is None or all(self.densities[i] >= 1 for i in adapters):
            return 1
        return 2 if self.pruning == "random" else 3


@dataclass(frozen=True)
class ShardPlan:
    name: str
    source: str
    metadata: dict[str, str] | None
    tensors: tuple[TensorPlan, ...]
    header_size: int
    size: int

    def header_bytes(self) -> bytes:
        return encode_shard_header(self.tensors, self.metadata)

    @property
    def merged(self) -> int:
        return sum(1 for t in self.tensors if t.ops)


def encode_shard_header(tensors: Sequence[TensorPlan], metadata: dict[str, str] | None) -> bytes:
    return encode_header([(t.name, t.dtype, t.shape, t.begin, t.end) for t in tensors], metadata)


@dataclass(frozen=True)
class AdapterSummary:
    index: int
    path: str
    weights_file: str
    peft_type: str
    weight: float
    r: int | None
    alpha: float | None
    use_rslora: bool
    use_dora: bool
    modules: int
    full_tensors: int
    base_model: str | None = None  # the base named in the adapter's config
    tensors: int = 0  # base tensors this adapter changes


@dataclass(frozen=True)
class GpuMemory:
    """The working memory a merge on a GPU needs beyond the interpreter and torch: host RAM
    (``locked_bytes`` of it locked for copies) and the device's own memory."""

    host_bytes: int
    locked_bytes: int
    device_bytes: int


@dataclass(frozen=True)
class Plan:
    """``config`` is the output config.json when it differs from the base's (dtype, untied
    embeddings); None copies the base's file byte for byte. ``inputs`` is everything that
    decides the output bytes (files by name, size and header hash; options; format version),
    and ``fingerprint`` its hash."""

    format_version: int
    base: str
    output: str | None
    dtype: str
    device: str
    adapters: tuple[AdapterSummary, ...]
    shards: tuple[ShardPlan, ...]
    extra_files: tuple[str, ...]
    config: dict[str, Any] | None
    index_metadata: dict[str, Any] | None
    notes: tuple[str, ...]
    inputs: dict[str, Any]
    fingerprint: str
    tensor_bytes: int
    peak_memory_bytes: int  # merging on the CPU
    gpu_memory: GpuMemory  # merging on a GPU
    base_repo: str | None = None  # a Hub base: its repo id (``base`` is ``repo@commit``)
    strict: bool = False  # a merge that changes no tensor is an error, not a warning
    quantization: str | None = None  # the base's weight quantization, described
    combine: Combine | None = None  # None: the adapters apply in turn (linear, not normalized)

    @property
    def base_commit(self) -> str | None:
        """The commit a Hub base is pinned to (``base`` is ``repo@commit``)."""
        return self.base.rpartition("@")[2] if self.base_repo else None

    @property
    def total_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
