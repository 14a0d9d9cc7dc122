"""Headers + adapter configs -> a Plan: every output byte decided before one is written.

The planner reads no tensor data. It maps every adapter tensor to exactly one base tensor,
checks every shape and rank, and lays out each output shard. Every problem it finds is
collected and raised together as one PlanError.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .adapters import Adapter, FullTensor, LoraModule, load_adapter
from .config import MergeJob
from .errors import AdapterError, PlanError, ShardmergeError
from .keymap import Mapping, map_name
from .resolve import BaseFiles, output_shard_name, resolve_adapter, resolve_base
from .st_io import FLOAT_DTYPES, ITEMSIZE, SafetensorsHeader, TensorInfo, encode_header, numel, read_checkpoint_header

FORMAT_VERSION = 1
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Bytes the executor's untouched-tensor conversion works through at a time.
COPY_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class MergeOp:
    """One adapter's change to one base tensor.

    kind: ``replace`` (a whole tensor from the adapter), ``lora``, ``dora`` or ``bias``
    (lora_B.bias). layout: how B @ A lies against the base tensor: ``linear`` (out, in),
    ``conv1d`` (in, out), ``embedding`` (num_embeddings, dim).
    """

    adapter: int
    kind: str
    keys: tuple[str, ...]
    scale: float
    weight: float
    layout: str
    module: str
    rule: str


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor. ``src_begin``/``src_end`` are absolute offsets in the source shard,
    ``begin``/``end`` offsets in the output data buffer."""

    name: str
    shape: tuple[int, ...]
    src_dtype: str
    dtype: str
    src_begin: int
    src_end: int
    begin: int
    end: int
    ops: tuple[MergeOp, ...]


@dataclass(frozen=True)
class ShardPlan:
    name: str
    source: str
    metadata: dict[str, str] | None
    tensors: tuple[TensorPlan, ...]
    header_size: int
    size: int

    def header_bytes(self) -> bytes:
        return _encode(self.tensors, self.metadata)

    @property
    def merged(self) -> int:
        return sum(1 for t in self.tensors if t.ops)


@dataclass(frozen=True)
class AdapterSummary:
    index: int
    path: str
    weights_file: str
    weight: float
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    modules: int
    full_tensors: int


@dataclass(frozen=True)
class Plan:
    format_version: int
    base: str
    output: str
    dtype: str
    device: str
    adapters: tuple[AdapterSummary, ...]
    shards: tuple[ShardPlan, ...]
    extra_files: tuple[str, ...]
    index_metadata: dict[str, Any] | None
    fingerprint: str
    tensor_bytes: int
    peak_memory_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_plan(job: MergeJob) -> Plan:
    """Plan ``job``; raises PlanError with every problem found."""
    base = resolve_base(job.base)
    problems: list[ShardmergeError] = []
    headers = _read_base_headers(base, problems)
    adapters = []
    for index, spec in enumerate(job.adapters):
        try:
            files = resolve_adapter(spec.path)
        except ShardmergeError as exc:
            problems.append(exc)
            continue
        adapter = load_adapter(index, files, spec.weight, problems)
        if adapter is not None:
            adapters.append(adapter)
    owner = {name: info for header in headers for name, info in header.tensors.items()}
    ops: dict[str, list[MergeOp]] = defaultdict(list)
    for adapter in adapters:
        _plan_adapter(adapter, owner, ops, problems)
    shard_of = {name: header.path for header in headers for name in header.tensors}
    for name in ops:
        if owner[name].dtype not in FLOAT_DTYPES:
            problems.append(
                AdapterError(
                    f"adapter targets a {owner[name].dtype} tensor; only floating-point tensors can be merged",
                    file=shard_of[name],
                    tensor=name,
                    hint="a quantized base cannot be merged exactly: merge into the unquantized model",
                )
            )
    if problems:
        raise PlanError(problems)
    out_dtype = OUTPUT_DTYPES[job.dtype]
    shards = tuple(_layout(header, ops, out_dtype) for header in headers)
    summaries = tuple(_summary(adapter) for adapter in adapters)
    return Plan(
        format_version=FORMAT_VERSION,
        base=str(base.folder),
        output=job.output,
        dtype=job.dtype,
        device=job.device,
        adapters=summaries,
        shards=shards,
        extra_files=tuple(str(path) for path in base.extra_files),
        index_metadata={k: v for k, v in (base.index_metadata or {}).items() if k != "total_size"} or None,
        fingerprint=_fingerprint(job, base, headers, adapters),
        tensor_bytes=sum(t.end - t.begin for shard in shards for t in shard.tensors),
        peak_memory_bytes=_peak_memory(shards, adapters),
    )


def _read_base_headers(base: BaseFiles, problems: list[ShardmergeError]) -> list[SafetensorsHeader]:
    headers: list[SafetensorsHeader] = []
    seen: dict[str, Path] = {}
    for shard in base.shards:
        try:
            header = read_checkpoint_header(shard)
        except ShardmergeError as exc:
            problems.append(exc)
            continue
        for name in header.tensors:
            if name in seen:
                problems.append(
                    ShardmergeError(
                        f"tensor is stored in two shards (also in {seen[name].name})", file=shard, tensor=name
                    )
                )
            seen[name] = shard
        headers.append(header)
    return headers


def _plan_adapter(
    adapter: Adapter,
    owner: dict[str, TensorInfo],
    ops: dict[str, list[MergeOp]],
    problems: list[ShardmergeError],
) -> None:
    file = adapter.files.weights
    mine: dict[str, list[MergeOp]] = defaultdict(list)

    def target(name: str, key: str) -> Mapping | None:
        mapping = map_name(name, owner)
        if mapping.target is not None:
            return mapping
        if mapping.candidates:
            problems.append(
                AdapterError(
                    f"maps to more than one base tensor: {', '.join(mapping.candidates)}",
                    file=file,
                    tensor=key,
                    hint="the adapter is ambiguous for this checkpoint; report it with both names",
                )
            )
        else:
            near = f"; closest base names: {', '.join(mapping.closest)}" if mapping.closest else ""
            problems.append(
                AdapterError(
                    f"no base tensor {name!r}{near}",
                    file=file,
                    tensor=key,
                    hint="check that this adapter was trained on this base model",
                )
            )
        return None

    for full in adapter.full_tensors:
        mapping = target(full.target, full.key)
        if mapping is not None and _check_full(adapter, full, owner[mapping.target], problems):
            mine[mapping.target].append(
                MergeOp(adapter.index, "replace", (full.key,), 1.0, adapter.weight, "full", full.target, mapping.rule)
            )
    for module in adapter.modules:
        _plan_module(adapter, module, owner, target, mine, problems)
    for name, tensor_ops in mine.items():
        kinds = [op.kind for op in tensor_ops]
        duplicated = {kind for kind in kinds if kinds.count(kind) > 1}
        if duplicated:
            problems.append(
                AdapterError(
                    f"several adapter entries ({', '.join(op.module for op in tensor_ops)}) "
                    "change the same base tensor",
                    file=file,
                    tensor=name,
                    hint="the adapter is ambiguous for this checkpoint",
                )
            )
        # Within one adapter a whole replacement comes first, then the low-rank update.
        ops[name].extend(sorted(tensor_ops, key=lambda op: op.kind != "replace"))


def _check_full(adapter: Adapter, full: FullTensor, base: TensorInfo, problems: list[ShardmergeError]) -> bool:
    if full.shape == base.shape:
        return True
    problems.append(
        AdapterError(
            f"shape mismatch: adapter has {list(full.shape)}, base tensor {base.name!r} has {list(base.shape)}",
            file=adapter.files.weights,
            tensor=full.key,
            hint="the adapter resized this layer (e.g. a larger vocabulary) or belongs to another model",
        )
    )
    return False


def _plan_module(
    adapter: Adapter,
    module: LoraModule,
    owner: dict[str, TensorInfo],
    target: Callable[[str, str], Mapping | None],
    mine: dict[str, list[MergeOp]],
    problems: list[ShardmergeError],
) -> None:
    file = adapter.files.weights
    a_role, b_role = ("embedding_A", "embedding_B") if module.is_embedding else ("lora_A", "lora_B")
    missing = [role for role in (a_role, b_role) if role not in module.keys]
    if missing:
        present = next(iter(module.keys.values()))
        problems.append(
            AdapterError(f"module {module.path!r} has no {' or '.join(missing)}", file=file, tensor=present)
        )
        return
    a_key, b_key = module.keys[a_role], module.keys[b_role]
    a_shape, b_shape = module.shapes[a_role], module.shapes[b_role]
    if len(a_shape) != 2 or len(b_shape) != 2:
        problems.append(
            AdapterError(
                f"LoRA on a {len(a_shape)}-D layer (e.g. a convolution) is not supported",
                file=file,
                tensor=a_key,
                hint="only Linear, Conv1D and Embedding layers can be merged",
            )
        )
        return
    r, _ = adapter.rank_and_alpha(module.path)
    rank_a = a_shape[0]
    rank_b = b_shape[1]
    if rank_a != r or rank_b != r:
        problems.append(
            AdapterError(
                f"r mismatch: the config gives r={r} for {module.path!r} "
                f"but the tensors have rank {rank_a} (A) and {rank_b} (B)",
                file=file,
                tensor=a_key,
                hint="the adapter_config.json (r / rank_pattern) does not belong to these weights",
            )
        )
        return
    mapping = target(f"{module.path}.weight", a_key)
    if mapping is None:
        return
    base = owner[mapping.target]
    layout = _layout_of(adapter, module, base, a_shape, b_shape)
    if layout is None:
        problems.append(
            AdapterError(
                f"shape mismatch: A {list(a_shape)} and B {list(b_shape)} give a delta that fits neither "
                f"{list(base.shape)} nor its transpose (base tensor {base.name!r})",
                file=file,
                tensor=a_key,
                hint="the adapter belongs to another model, or to another size of it",
            )
        )
        return
    # DoRA's magnitude has one entry per output feature: B's rows in every layout.
    out_features = b_shape[0]
    scale = adapter.scale(module.path)
    keys: tuple[str, ...] = (a_key, b_key)
    kind = "lora"
    magnitude = module.keys.get("magnitude")
    if magnitude is not None:
        if module.shapes["magnitude"] != (out_features,):
            problems.append(
                AdapterError(
                    f"shape mismatch: DoRA magnitude has {list(module.shapes['magnitude'])}, expected [{out_features}]",
                    file=file,
                    tensor=magnitude,
                )
            )
            return
        kind, keys = "dora", (a_key, b_key, magnitude)
    elif adapter.config.get("use_dora"):
        problems.append(
            AdapterError("use_dora is set but the module has no lora_magnitude_vector", file=file, tensor=a_key)
        )
        return
    mine[mapping.target].append(
        MergeOp(adapter.index, kind, keys, scale, adapter.weight, layout, module.path, mapping.rule)
    )
    bias_key = module.keys.get("lora_B_bias")
    if bias_key is not None:
        bias_mapping = target(f"{module.path}.bias", bias_key)
        if bias_mapping is None:
            return
        bias_shape = owner[bias_mapping.target].shape
        if module.shapes["lora_B_bias"] != bias_shape:
            problems.append(
                AdapterError(
                    f"shape mismatch: lora_B.bias has {list(module.shapes['lora_B_bias'])}, "
                    f"base bias has {list(bias_shape)}",
                    file=file,
                    tensor=bias_key,
                )
            )
            return
        mine[bias_mapping.target].append(
            MergeOp(adapter.index, "bias", (bias_key,), scale, adapter.weight, "bias", module.path, bias_mapping.rule)
        )


def _layout_of(
    adapter: Adapter, module: LoraModule, base: TensorInfo, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> str | None:
    if module.is_embedding:
        # lora_embedding_A is (r, num_embeddings), lora_embedding_B is (dim, r).
        return "embedding" if base.shape == (a_shape[1], b_shape[0]) else None
    as_linear = base.shape == (b_shape[0], a_shape[1])
    as_conv1d = base.shape == (a_shape[1], b_shape[0])
    if as_linear and as_conv1d:
        # A square weight fits both ways; only then does the config's flag decide.
        return "conv1d" if adapter.config.get("fan_in_fan_out") else "linear"
    if as_linear:
        return "linear"
    if as_conv1d:
        return "conv1d"
    return None


def _layout(header: SafetensorsHeader, ops: dict[str, list[MergeOp]], out_dtype: str) -> ShardPlan:
    """Lay out one output shard: the base's tensor order, new dtypes, contiguous offsets.

    Tensors are grouped by descending item size (stable, so the base order holds within a
    group), as safetensors does, which keeps every tensor aligned to its item size.
    """
    infos = sorted(header.tensors.values(), key=lambda info: info.begin)
    dtypes = {info.name: out_dtype if info.dtype in FLOAT_DTYPES else info.dtype for info in infos}
    infos.sort(key=lambda info: -ITEMSIZE[dtypes[info.name]])
    tensors = []
    offset = 0
    for info in infos:
        size = numel(info.shape) * ITEMSIZE[dtypes[info.name]]
        tensor_ops = tuple(ops.get(info.name, ()))
        tensors.append(
            TensorPlan(
                info.name,
                info.shape,
                info.dtype,
                dtypes[info.name],
                info.begin,
                info.end,
                offset,
                offset + size,
                tensor_ops,
            )
        )
        offset += size
    header_size = len(_encode(tensors, header.metadata))
    return ShardPlan(
        output_shard_name(header.path),
        str(header.path),
        header.metadata,
        tuple(tensors),
        header_size,
        header_size + offset,
    )


def _encode(tensors: Sequence[TensorPlan], metadata: dict[str, str] | None) -> bytes:
    return encode_header([(t.name, t.dtype, t.shape, t.begin, t.end) for t in tensors], metadata)


def _summary(adapter: Adapter) -> AdapterSummary:
    config = adapter.config
    return AdapterSummary(
        index=adapter.index,
        path=str(adapter.files.folder),
        weights_file=str(adapter.files.weights),
        weight=adapter.weight,
        r=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        modules=len(adapter.modules),
        full_tensors=len(adapter.full_tensors),
    )


def _fingerprint(job: MergeJob, base: BaseFiles, headers: list[SafetensorsHeader], adapters: list[Adapter]) -> str:
    """Hash of everything that decides the output bytes: inputs (by header), options, version."""

    def header_id(header: SafetensorsHeader) -> dict[str, Any]:
        return {"name": header.path.name, "size": header.file_size, "header": hashlib.sha256(header.raw).hexdigest()}

    state = {
        "format_version": FORMAT_VERSION,
        "dtype": job.dtype,
        "base": [header_id(header) for header in headers],
        "base_files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in base.extra_files},
        "adapters": [
            {
                "weight": adapter.weight,
                "config": adapter.config,
                "weights": header_id(adapter.header),
            }
            for adapter in adapters
        ],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _peak_memory(shards: tuple[ShardPlan, ...], adapters: list[Adapter]) -> int:
    """Working memory the executor needs beyond the interpreter: the largest merged tensor in
    float32 (twice for DoRA or a replacement), its source and output bytes, the largest
    adapter tensors it reads, and the copy buffer."""
    worst = 0
    for shard in shards:
        for tensor in shard.tensors:
            if tensor.ops:
                # DoRA and whole-tensor replacement hold a second float32 copy of the tensor.
                copies = 2 if any(op.kind in ("dora", "replace") for op in tensor.ops) else 1
                need = (
                    copies * 4 * numel(tensor.shape) + (tensor.src_end - tensor.src_begin) + (tensor.end - tensor.begin)
                )
                worst = max(worst, need)
    largest_adapter_tensor = max(
        (4 * numel(info.shape) for adapter in adapters for info in adapter.header.tensors.values()), default=0
    )
    return worst + 3 * largest_adapter_tensor + COPY_CHUNK_BYTES
