"""Headers + adapter configs -> a Plan: every output byte decided before one is written.

The planner reads no tensor data. It maps every adapter tensor to exactly one base tensor,
checks every shape and rank, and lays out each output shard. Every problem it finds is
collected and raised together as one PlanError.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..config import MergeJob
from ..errors import AdapterError, InputError, PlanError, ProblemsError, ShardmergeError
from ..formats.confined import read_input
from ..formats.fileio import content_id, file_sha256
from ..formats.jsondoc import parse
from ..formats.safetensors import FLOAT_DTYPES, ITEMSIZE, SafetensorsHeader, TensorInfo, numel
from ..inputs.resolve import BaseFiles, output_shard_name, resolve_adapter, resolve_base
from ..tuning import (
    COPY_CHUNK_BYTES,
    MERGE_BLOCK_ELEMENTS,
    PACKED_BLOCK_ELEMENTS,
    PACKED_COPIES,
    PINNED_BUFFER_BYTES,
    STAGING_BUFFERS,
    STAGING_BYTES,
    WIDEN_CHUNK,
)
from .adapters import MAX_CONFIG_BYTES, Adapter, load_adapter
from .combining import check_combinable, combine_of, mark_combined
from .conversions import checkpoint_names
from .custom_code import read_custom_code
from .layouts import find_layouts
from .model import (
    Action,
    AdapterSummary,
    Combine,
    GpuMemory,
    MergeOp,
    Plan,
    QuantRead,
    ShardPlan,
    TensorPlan,
    encode_shard_header,
    row_separable,
)
from .module_ops import AdapterPlanner
from .quantized import QuantLayout, check_declared, find_quantized, quantization_notes, read_declared
from .tied import TiedEmbeddings, find_tied, split_uses

FORMAT_VERSION = 1
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def build_plan(job: MergeJob) -> Plan:
    """Plan ``job``; raises PlanError with every problem found."""
    base = resolve_base(job.base)
    problems: list[ShardmergeError] = []  # of the base: where there are any, the adapters are not matched
    config = _read_config(base, problems)
    declared = read_declared(config, base.folder / "config.json", problems)
    format_read = not problems
    # auto keeps every tensor's dtype and format, except a format that cannot be written
    # back: its weights are dequantized to bfloat16, every other tensor still keeps its dtype.
    kept = all(declaration.format.codec.writes for declaration in declared)
    dtype = ("base" if kept else "bfloat16") if job.dtype == "auto" else job.dtype
    headers = _read_base_headers(base, problems)
    adapter_problems: list[ShardmergeError] = []
    adapters = []
    for index, spec in enumerate(job.adapters):
        try:
            files = resolve_adapter(spec.path)
        except ShardmergeError as exc:
            adapter_problems.extend(exc.problems if isinstance(exc, ProblemsError) else [exc])
            continue
        adapter = load_adapter(index, files, spec.weight, adapter_problems)
        if adapter is not None:
            adapters.append(adapter)
    tensors = {name: info for header in headers for name, info in header.tensors.items()}
    located = {name: (info, header.path) for header in headers for name, info in header.tensors.items()}
    # The job's conv1d_modules, where given, say what custom code would.
    read_code = config is not None and config.get("auto_map") and job.conv1d_modules is None
    code = read_custom_code(base.folder, config) if config is not None and read_code else None
    layouts = find_layouts(config, job.conv1d_modules, code)
    quantization = find_quantized(declared, located, problems, transposed=layouts.experts_transposed)
    quantized = quantization.weights
    if format_read:
        check_declared(quantization, located, base.folder / "config.json", problems)
    if declared and not quantization.writes and dtype == "base":
        problems.append(
            InputError(
                f"{quantization.describe()} weights cannot be written back in their format",
                file=base.folder / "config.json",
                hint="merge with --dtype bfloat16 (auto does): transformers quantizes a 16-bit model again on load",
            )
        )
    if quantization.kv_cache and dtype != "base":
        problems.append(
            InputError(
                "the base quantizes its KV cache, which a dequantized output cannot keep",
                file=base.folder / "config.json",
                hint="keep the format with --dtype base",
            )
        )
    if problems:  # the root cause: matching adapters against a base that cannot be read is noise
        raise PlanError(problems + adapter_problems)
    problems = adapter_problems
    tied = find_tied(config, tensors)
    virtual_head = tied.virtual_head(tensors) if tied else None
    targets = {**tensors, virtual_head.name: virtual_head} if virtual_head else dict(tensors)
    # A packed weight is merged under the model's name and shape for it, which its stored
    # tensor does not have.
    for name, weight in quantized.items():
        info = weight.weight[0]
        if (name, weight.model_shape) != (info.name, info.shape):
            targets[name] = TensorInfo(name, info.dtype, weight.model_shape, info.begin, info.end)
    ops: dict[str, list[MergeOp]] = defaultdict(list)
    vocab = _vocab_sizes(config)
    # Tensors resized by an adapter (added tokens), their new shapes, and the adapter that
    # resized each: later adapters see (and are checked against) the resized tensor.
    resized: dict[str, tuple[int, ...]] = {}
    resizer: dict[str, int] = {}
    names = checkpoint_names(config, {name: info.shape for name, info in targets.items()}, layouts.experts_transposed)
    for adapter in adapters:
        planner = AdapterPlanner(adapter, targets, layouts, problems, vocab_sizes=frozenset(vocab), names=names)
        planner.resized.update(resized)
        for name, tensor_ops in planner.plan().items():
            ops[name].extend(tensor_ops)
        for name in _add_resized(resized, planner.resized, adapter, problems):
            resizer[name] = adapter.index
    untie = tied is not None and split_uses(tied, ops)
    if tied is not None:
        _resize_tied(tied, ops, resized, resizer)
    _check_resized(resized, resizer, ops, targets, set(tensors) if not untie else set(targets), adapters, problems)
    _check_targets(headers, targets, ops, set(quantized), problems)
    combine = combine_of(job, adapters)
    if combine is not None:
        check_combinable(combine, ops, adapters, problems)
    if problems:
        raise PlanError(problems)
    extra: dict[Path, list[TensorInfo]] = defaultdict(list)
    notes = _notes(ops, layouts.source) + quantization_notes(quantization, ops, dtype)
    if renamed := names.note():
        notes += (renamed,)
    if layouts.custom is not None:
        notes += (f"which modules are nn.Linear and which Conv1D: from {layouts.source}",)
    notes += _trained_against(adapters, quantization.bitsandbytes)
    rows = {shape[0] for shape in resized.values()}
    if resized:
        before = sorted({targets[name].shape[0] for name in resized})
        changed = ", ".join(sorted(name for name in resized if name in tensors or untie))
        notes += (f"vocabulary resized from {', '.join(map(str, before))} to {min(rows)} rows: {changed}",)
    if tied is not None and untie:
        notes += (f"tied embeddings untied: the adapters change {tied.embedding} and {tied.head} differently",)
        if virtual_head is not None:
            extra[_shard_of(headers, tied.embedding)].append(virtual_head)
    elif virtual_head is not None:
        # Still tied: the embedding's changes reach the head through the tie.
        ops.pop(virtual_head.name, None)
    out_dtype = OUTPUT_DTYPES.get(dtype)
    inputs = _inputs(job, dtype, base, headers, adapters, combine)
    quant = QuantLayout(quantization, ops, tensors, dequantize=out_dtype is not None)
    for name, weight_file in quant.moved.items():
        extra[weight_file].append(tensors[name])
    resize = {name: (targets[name].shape[0], shape) for name, shape in resized.items()}
    keep = job.dtype == "auto"
    shards = tuple(_layout(header, extra[header.path], ops, out_dtype, quant, resize, keep) for header in headers)
    _check_unique_names(shards)
    if job.max_shard_size is not None:
        shards = _resharded(shards, job.max_shard_size)
    if combine is not None:
        shards = mark_combined(shards, combine)
    return Plan(
        format_version=FORMAT_VERSION,
        base=base.name,
        base_repo=base.repo_id,
        output=job.output,
        dtype=dtype,
        device=job.device,
        adapters=tuple(_summary(adapter, ops) for adapter in adapters),
        shards=shards,
        extra_files=tuple(str(path) for path in base.extra_files),
        config=_output_config(
            config,
            dtype,
            untie,
            dequantized=bool(declared) and out_dtype is not None,
            vocab={targets[name].shape[0]: shape[0] for name, shape in resized.items()},
        ),
        index_metadata={k: v for k, v in (base.index_metadata or {}).items() if k != "total_size"} or None,
        notes=notes,
        inputs=inputs,
        fingerprint=hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(),
        tensor_bytes=sum(t.end - t.begin for shard in shards for t in shard.tensors),
        peak_memory_bytes=_peak_memory(shards, adapters),
        gpu_memory=_gpu_memory(shards, adapters),
        strict=job.strict,
        quantization=quantization.describe(),
        combine=combine,
    )


def _notes(ops: dict[str, list[MergeOp]], layout_source: str) -> tuple[str, ...]:
    """What a reader of the plan should know: where Conv1D layouts came from, and trainable
    token rows that several adapters replace (applied in order: the last one's rows win)."""
    notes = []
    conv1d = sorted(
        {op.module.rpartition(".")[2] for tensor_ops in ops.values() for op in tensor_ops if op.layout == "conv1d"}
    )
    if conv1d:
        notes.append(f"Conv1D layout ([in, out]) for {', '.join(conv1d)}: from {layout_source}")
    for name, tensor_ops in ops.items():
        owners: dict[int, int] = {}
        overlap: set[int] = set()
        for op in tensor_ops:
            for row in op.indices:
                if row in owners and owners[row] != op.adapter:
                    overlap.add(row)
                owners[row] = op.adapter
        if overlap:
            notes.append(
                f"{name}: adapters replace the same trainable token rows ({len(overlap)} rows, e.g. {min(overlap)}); "
                "they apply in order, so the last adapter's rows win"
            )
    return tuple(notes)


def _trained_against(adapters: list[Adapter], quantized: bool) -> tuple[str, ...]:
    """Where an adapter's config names a bitsandbytes model (by its name: QLoRA releases say
    ``bnb``) and the base is 16-bit, or the reverse: which base it was trained against. Merging
    into the dequantized bitsandbytes weights reproduces the trained model; the 16-bit weights
    add back the quantization error it was trained around."""
    notes = []
    for adapter in adapters:
        name = adapter.config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name:
            continue
        named = "bnb" in name.lower() or "bitsandbytes" in name.lower()
        if named and not quantized:
            notes.append(
                f"adapter [{adapter.index}] was trained against {name}, a bitsandbytes model: this 16-bit base adds "
                f"back the quantization error it was trained around; merging into {name} reproduces the trained model"
            )
        elif quantized and not named:
            notes.append(
                f"adapter [{adapter.index}] was trained against {name}, a 16-bit model by its name: this bitsandbytes "
                f"base adds the quantization error to it, unless it was trained on {name} loaded in 4 bits (QLoRA), "
                "which this base reproduces"
            )
    return tuple(notes)


def _read_config(base: BaseFiles, problems: list[ShardmergeError]) -> dict[str, Any] | None:
    path = base.folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = parse(read_input(path, MAX_CONFIG_BYTES))
    except ValueError as exc:
        problems.append(InputError(f"unreadable config ({exc})", file=path))
        return None
    except ShardmergeError as exc:
        problems.append(exc)
        return None
    return config if isinstance(config, dict) else None


def _read_base_headers(base: BaseFiles, problems: list[ShardmergeError]) -> list[SafetensorsHeader]:
    headers: list[SafetensorsHeader] = []
    seen: dict[str, Path] = {}
    for shard in base.shards:
        try:
            header = base.header(shard)
        except ShardmergeError as exc:
            problems.append(exc)
            continue
        for name in header.tensors:
            if name in seen:
                problems.append(
                    InputError(f"tensor is stored in two shards (also in {seen[name].name})", file=shard, tensor=name)
                )
            seen[name] = shard
        headers.append(header)
    return headers


def _shard_of(headers: list[SafetensorsHeader], name: str) -> Path:
    return next(header.path for header in headers if name in header.tensors)


def _check_targets(
    headers: list[SafetensorsHeader],
    targets: dict[str, TensorInfo],
    ops: dict[str, list[MergeOp]],
    quantized: set[str],
    problems: list[ShardmergeError],
) -> None:
    shards = {name: header.path for header in headers for name in header.tensors}
    for name in ops:
        if targets[name].dtype not in FLOAT_DTYPES and name not in quantized:
            problems.append(
                AdapterError(
                    f"adapter targets a {targets[name].dtype} tensor; only floating-point tensors can be merged",
                    file=shards.get(name),
                    tensor=name,
                    hint="merge into the 16-bit release of the base model",
                )
            )


def _layout(
    header: SafetensorsHeader,
    extra: list[TensorInfo],
    ops: dict[str, list[MergeOp]],
    out_dtype: str | None,
    quant: QuantLayout,
    resize: dict[str, tuple[int, tuple[int, ...]]],
    keep_floats: bool,
) -> ShardPlan:
    """Lay out one output shard: the base's tensor order, new dtypes (None: the base's; with
    ``keep_floats``, only for the dequantized weights), contiguous offsets, without the tensors
    a dequantized output drops.

    Tensors are grouped by descending item size (stable, so the base order holds within a
    group), as safetensors does, which keeps every tensor aligned to its item size. An extra
    tensor follows the tensor it is read from (an untied output head) or joins the shard of
    its weight (a requantized weight's new scales, from another shard).
    """
    infos = sorted(header.tensors.values(), key=lambda info: info.begin)
    for added in extra:
        if added.name in quant.moved:  # a new scale, computed: its place is decided below
            infos.append(added)
        else:  # an untied head, after the embedding it is read from
            infos.insert(next(i for i, info in enumerate(infos) if info.begin == added.begin) + 1, added)
    infos = [
        replace(info, name=quant.rename[info.name][0], shape=quant.rename[info.name][1])
        if info.name in quant.rename
        else replace(info, shape=resize[info.name][1])
        if info.name in resize
        else info
        for info in infos
        if info.name not in quant.drop and (info.name not in quant.moved or quant.moved[info.name] == header.path)
    ]
    converted = {
        info.name for info in infos if info.name in quant.reads or (info.dtype in FLOAT_DTYPES and not keep_floats)
    }
    dtypes = {info.name: out_dtype if out_dtype and info.name in converted else info.dtype for info in infos}
    infos.sort(key=lambda info: -ITEMSIZE[dtypes[info.name]])
    infos, follow = _scales_last(infos, dtypes, quant)
    tensors = []
    offset = 0
    for info in infos:
        size = numel(info.shape) * ITEMSIZE[dtypes[info.name]]
        tensor_ops = tuple(ops.get(quant.model_name.get(info.name, info.name), ()))
        read = quant.reads.get(info.name)
        requantized = dtypes[info.name] == info.dtype
        action = _action(info, dtypes[info.name], tensor_ops, read, quant.scale_of.get(info.name))
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
                action,
                _packed_rows(read, tensor_ops, requantized)
                if read is not None and read.format.packed
                else _block_rows(info.shape, tensor_ops, read, requantized=requantized),
                read,
                quant.scale_of.get(info.name),
                info.name in follow,
                resize[info.name][0] if info.name in resize else 0,
            )
        )
        offset += size
    header_size = len(encode_shard_header(tensors, header.metadata))
    return ShardPlan(
        output_shard_name(header.path),
        str(header.path),
        header.metadata,
        tuple(tensors),
        header_size,
        header_size + offset,
    )


def _check_unique_names(shards: tuple[ShardPlan, ...]) -> None:
    """Each output shard has a file of its own: base shards whose names become the same one
    (``pytorch_model-1.bin`` and ``model-1.bin`` both become ``model-1.safetensors``) are
    refused, not written over each other."""
    sources: dict[str, list[str]] = defaultdict(list)
    for shard in shards:
        sources[shard.name].append(Path(shard.source).name)
    problems: list[ShardmergeError] = [
        InputError(
            f"two base shards would be written to this one file ({', '.join(names)})",
            file=name,
            hint="rename the base's shards (and its index with them) so that each becomes a file of its own",
        )
        for name, names in sources.items()
        if len(names) > 1
    ]
    if problems:
        raise PlanError(problems)


def _resharded(shards: tuple[ShardPlan, ...], max_bytes: int) -> tuple[ShardPlan, ...]:
    """The shards split into shards of at most ``max_bytes`` of tensor data, as save_pretrained
    splits them (huggingface_hub's ``split_torch_state_dict_into_shards``: tensors in order, a
    new shard where the next tensor would not fit, a larger tensor alone in a shard of its
    own while the one being filled goes on), and named as it names them. A shard is split,
    never joined to another: each output shard is read from one base shard. A shard that
    holds the new scales of a requantized weight stays whole, scales and weight written in
    one pass."""
    pieces: list[tuple[ShardPlan, list[TensorPlan]]] = []
    for shard in shards:
        if any(tensor.scale_of for tensor in shard.tensors):
            pieces.append((shard, list(shard.tensors)))
            continue
        current: list[TensorPlan] = []
        size = 0
        for tensor in shard.tensors:
            nbytes = tensor.end - tensor.begin
            if nbytes > max_bytes:  # alone, and the shard being filled goes on after it
                pieces.append((shard, [tensor]))
                continue
            if size + nbytes > max_bytes:
                pieces.append((shard, current))
                current, size = [], 0
            current.append(tensor)
            size += nbytes
        if current or not shard.tensors:
            pieces.append((shard, current))
    count = len(pieces)
    out = []
    for number, (shard, tensors) in enumerate(pieces, start=1):
        name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        offsets = list(itertools.accumulate((t.end - t.begin for t in tensors), initial=0))
        moved = tuple(
            replace(t, begin=begin, end=end) for t, begin, end in zip(tensors, offsets, offsets[1:], strict=False)
        )
        header_size = len(encode_shard_header(moved, shard.metadata))
        data = offsets[-1]
        out.append(ShardPlan(name, shard.source, shard.metadata, moved, header_size, header_size + data))
    return tuple(out)


def _scales_last(
    infos: list[TensorInfo], dtypes: dict[str, str], quant: QuantLayout
) -> tuple[list[TensorInfo], set[str]]:
    """Move the new scales of requantized weights (of the same shard) behind their weights,
    so that each weight is written first and its scales found block by block as it is,
    instead of in a first pass over the weight: FP8 scales behind every other tensor (kept
    until then as a block's largest values, a few bytes), a packed weight's scales and zero
    points right behind it (kept as they are, a sixteenth of the weight or less, until they
    are written). Not for per-tensor scales, which need the whole weight before its first
    block, and not where a tensor would lose its alignment. Returns the order and the weights
    whose scales follow them."""
    names = {info.name for info in infos}
    moved = [
        info
        for info in infos
        if info.name in quant.scale_of
        and quant.scale_of[info.name] in names
        and quant.reads[quant.scale_of[info.name]].format.strategy != "tensor"
    ]
    if not moved:
        return infos, set()
    behind: dict[str, list[TensorInfo]] = defaultdict(list)
    for info in moved:
        if quant.reads[quant.scale_of[info.name]].format.packed:
            behind[quant.scale_of[info.name]].append(info)
    order = []
    for info in infos:
        if info not in moved:
            order += [info, *behind.get(info.name, ())]
    order += [info for info in moved if quant.scale_of[info.name] not in behind]
    offset = 0
    for info in order:
        if offset % ITEMSIZE[dtypes[info.name]]:
            return infos, set()
        offset += numel(info.shape) * ITEMSIZE[dtypes[info.name]]
    return order, {quant.scale_of[info.name] for info in moved}


def _action(
    info: TensorInfo, dtype: str, ops: tuple[MergeOp, ...], read: QuantRead | None, scale_of: str | None
) -> Action:
    """What is done to a tensor of the output: see Action."""
    if scale_of is not None:
        return Action.RESCALE
    if read is not None:
        return Action.REQUANTIZE if dtype == info.dtype else Action.DEQUANTIZE
    if ops:
        return Action.MERGE
    return Action.COPY if dtype == info.dtype else Action.CONVERT


def _block_rows(shape: tuple[int, ...], ops: tuple[MergeOp, ...], read: QuantRead | None, *, requantized: bool) -> int:
    """Rows merged at a time: blocks of about MERGE_BLOCK_ELEMENTS where every op allows it,
    else the whole tensor (0 for an untouched one). A requantized weight's blocks start at
    multiples of its scale blocks' height, whose largest values decide their scales."""
    if not ops and read is None:
        return 0
    if len(shape) == 3 and read is None and all(op.kind == "lora" and op.layout.startswith("experts-") for op in ops):
        return min(shape[1], max(1, MERGE_BLOCK_ELEMENTS // max(1, shape[2])))  # one expert's rows
    rows = shape[0] if shape else 1
    if len(shape) == 2 and all(row_separable(op) for op in ops):
        step = read.format.row_step() if read is not None and requantized else 1
        return min(rows, max(step, MERGE_BLOCK_ELEMENTS // max(1, shape[1]) // step * step))
    return rows


def _packed_rows(read: QuantRead, ops: tuple[MergeOp, ...], requantized: bool) -> int:
    """Rows of one matrix (one expert's) of a packed weight worked on at a time, in the
    orientation it is computed in: the stored one where it is requantized, the model's where
    it is dequantized (a transposed one then in whole 32-value blocks of its stored rows)."""
    *_, rows, cols = read.values
    if read.transposed and not requantized:
        rows, cols = cols, rows
        assert read.format.block is not None
        step = read.format.block[1]
    else:
        step = read.format.row_step() if requantized else 1
    if not all(row_separable(op) or op.kind == "lora" for op in ops):
        return rows
    return min(rows, max(step, PACKED_BLOCK_ELEMENTS // max(1, cols) // step * step))


def _vocab_sizes(config: dict[str, Any] | None) -> set[int]:
    """The vocab_size values of a config and of its text_config."""
    sections = [config or {}, *[v for k, v in (config or {}).items() if k == "text_config" and isinstance(v, dict)]]
    return {section["vocab_size"] for section in sections if isinstance(section.get("vocab_size"), int)}


def _add_resized(
    resized: dict[str, tuple[int, ...]],
    new: dict[str, tuple[int, ...]],
    adapter: Adapter,
    problems: list[ShardmergeError],
) -> list[str]:
    """Add the tensors one adapter resizes (returned); every resized tensor must take the same
    rows."""
    added = []
    for name, shape in new.items():
        if resized.get(name) == shape:
            continue  # resized by an earlier adapter
        if name in resized or {s[0] for s in resized.values()} - {shape[0]}:
            problems.append(
                AdapterError(
                    f"resizes the vocabulary to {shape[0]} rows, where another resized tensor has "
                    f"{sorted({s[0] for s in resized.values()})}",
                    file=adapter.files.weights,
                    tensor=name,
                    hint="merge adapters trained on the same vocabulary",
                )
            )
            continue
        resized[name] = shape
        added.append(name)
    return added


def _resize_tied(
    tied: TiedEmbeddings, ops: dict[str, list[MergeOp]], resized: dict[str, tuple[int, ...]], resizer: dict[str, int]
) -> None:
    """A resized use of a tied parameter resizes the other one where the resizing adapter
    replaces that too (the shared parameter it saved, which reaches both uses)."""
    for use, other in ((tied.embedding, tied.head), (tied.head, tied.embedding)):
        if use in resized and other not in resized:
            replaced = any(op.kind == "replace" and op.adapter == resizer[use] for op in ops.get(other, ()))
            if replaced:
                resized[other], resizer[other] = resized[use], resizer[use]


def _check_resized(
    resized: dict[str, tuple[int, ...]],
    resizer: dict[str, int],
    ops: dict[str, list[MergeOp]],
    targets: dict[str, TensorInfo],
    written: set[str],
    adapters: list[Adapter],
    problems: list[ShardmergeError],
) -> None:
    """A resized vocabulary must be whole: every ``written`` tensor with the vocabulary's rows
    (embedding and head; a tied model's head where it is untied) resized, each by a
    replacement of the resizing adapter's, and changed by no adapter before that one (the
    replacement would discard the change)."""
    if not resized:
        return
    files = {adapter.index: adapter.files.weights for adapter in adapters}
    new_shape = next(iter(resized.values()))
    old_rows = {targets[name].shape[0] for name in resized}
    for name in sorted(written - set(resized)):
        shape = targets[name].shape
        if len(shape) == 2 and shape[0] in old_rows and shape[1:] == new_shape[1:]:
            problems.append(
                AdapterError(
                    f"the adapter resizes the vocabulary to {new_shape[0]} rows, but not {name!r} "
                    f"({shape[0]} rows): its new rows cannot be told",
                    file=files[min(resizer.values())],
                    tensor=name,
                    hint="save the adapter with the resized embedding and head (PEFT: save_embedding_layers=True)",
                )
            )
    for name in resized:
        earlier = sorted({op.adapter for op in ops.get(name, ()) if op.adapter < resizer[name]})
        if earlier:
            problems.append(
                AdapterError(
                    f"adapter {resizer[name]} resizes {name!r} and replaces it whole, discarding the change of "
                    f"adapter {', '.join(map(str, earlier))} before it",
                    file=files[resizer[name]],
                    tensor=name,
                    hint="apply the resizing adapter first",
                )
            )


def _output_config(
    config: dict[str, Any] | None, dtype: str, untie: bool, *, dequantized: bool, vocab: dict[int, int]
) -> dict[str, Any] | None:
    """The base config with its dtype entry (``torch_dtype`` in v4, ``dtype`` in v5) made true
    (left alone for ``base``), without ``quantization_config`` where the weights were
    dequantized, where the merge untied the embeddings ``tie_word_embeddings`` false, and
    where it resized the vocabulary (``vocab``: old rows to new) ``vocab_size`` following;
    None if unchanged."""
    if config is None:
        return None
    updated = json.loads(json.dumps(config))
    if dequantized:
        updated.pop("quantization_config", None)
    sections = [updated] + [value for key, value in updated.items() if key == "text_config" and isinstance(value, dict)]
    for section in sections:
        for key in ("torch_dtype", "dtype"):
            if key in section and dtype != "base":
                section[key] = dtype
        if untie and (section is updated or "tie_word_embeddings" in section):
            section["tie_word_embeddings"] = False
        if section.get("vocab_size") in vocab:
            section["vocab_size"] = vocab[section["vocab_size"]]
    return None if updated == config else updated


def _summary(adapter: Adapter, ops: dict[str, list[MergeOp]]) -> AdapterSummary:
    config = adapter.config
    ranked = adapter.peft_type in ("LORA", "LOHA", "LOKR")
    r, alpha = (int(config["r"]), float(config.get("lora_alpha", config.get("alpha", 0)))) if ranked else (None, None)
    return AdapterSummary(
        index=adapter.index,
        path=adapter.files.name or str(adapter.files.folder),
        weights_file=str(adapter.files.weights),
        peft_type=adapter.peft_type,
        weight=adapter.weight,
        r=r,
        alpha=alpha,
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        modules=len(adapter.modules),
        full_tensors=len(adapter.full_tensors),
        base_model=config.get("base_model_name_or_path") or None,
        tensors=sum(1 for tensor_ops in ops.values() if any(op.adapter == adapter.index for op in tensor_ops)),
    )


def _inputs(
    job: MergeJob,
    dtype: str,
    base: BaseFiles,
    headers: list[SafetensorsHeader],
    adapters: list[Adapter],
    combine: Combine | None,
) -> dict[str, Any]:
    """Everything that decides the output bytes: options, the format version, and the input
    files. Base shards count by name, size and header hash (reading a 140 GB base at every
    start would cost more than the merge); adapters, small beside the base, by their whole
    content, since a retrained adapter keeps its header."""

    def header_id(header: SafetensorsHeader) -> dict[str, Any]:
        return {"name": header.path.name, "size": header.file_size, "header": hashlib.sha256(header.raw).hexdigest()}

    declared = {} if job.conv1d_modules is None else {"conv1d_modules": job.conv1d_modules}
    if job.max_shard_size is not None:
        declared["max_shard_size"] = job.max_shard_size
    if combine is not None:
        declared["combine"] = json.loads(json.dumps(asdict(combine)))  # as the journal keeps it
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        **declared,
        "base": [header_id(header) for header in headers],
        "base_files": {path.name: content_id(path) for path in base.extra_files},
        "adapters": [
            {
                "weight": adapter.weight,
                "config": adapter.config,
                "weights": {"name": adapter.files.weights.name, "sha256": file_sha256(adapter.files.weights)},
            }
            for adapter in adapters
        ],
    }


@dataclass(frozen=True)
class _Block:
    """What merging one block of a tensor holds: float32 copies of ``count`` values, its
    ``source`` bytes, its ``output`` bytes, the adapter factors (float32, and the largest as
    stored), and the bytes a combination of its adapters' updates holds beside them."""

    copies: int
    count: int
    source: int
    output: int
    factors: int
    stored: int
    combined: int = 0


def _blocks(shards: tuple[ShardPlan, ...], adapters: list[Adapter]) -> list[_Block]:
    by_index = {adapter.index: adapter for adapter in adapters}
    blocks = []
    for shard in shards:
        for tensor in shard.tensors:
            if not (tensor.ops or tensor.quant):
                continue
            rows = tensor.shape[0] if tensor.shape else 1
            count = numel(tensor.shape) * tensor.block_rows // max(rows, 1)
            if tensor.expert_rows:
                count = tensor.block_rows * tensor.shape[-1]
            # DoRA, LoKr and replacements hold a second float32 operand
            copies = 1 if all(op.kind in ("lora", "bias", "ia3", "tokens", "loha") for op in tensor.ops) else 2
            if tensor.quant is not None:  # the scales as stored and in float32
                copies += 2 * (tensor.quant.scale.end - tensor.quant.scale.begin) // count
            source = count * ITEMSIZE[tensor.src_dtype]
            if tensor.packed:
                # the value, the base's, the update, and the unpacking's temporaries
                *_, source, count = tensor.packed_block()
                copies = PACKED_COPIES
            blocked = 0 < tensor.block_rows < rows
            read = [
                by_index[op.adapter].header.tensors[key]
                for op in tensor.ops
                if not (op.kind == "replace" and blocked)
                for key in op.keys
                if key
            ]
            factors = sum(4 * numel(info.shape) for info in read)
            stored = max((info.nbytes for info in read), default=0)
            held = (len({op.adapter for op in tensor.ops}) + _COMBINE_COPIES) * 4 * count if tensor.combined else 0
            blocks.append(_Block(copies, count, source, count * ITEMSIZE[tensor.dtype], factors, stored, held))
    return blocks


# float32 copies of a block a combination holds beside each adapter's update, in buffers kept
# from its first combined tensor on (so beside those of conversions too): the sum of the
# updates and the weights that agree with the elected sign, one update's magnitudes, two
# masks (a byte a value each), DARE's random numbers (two bytes a value, and a mask) while
# they are drawn, and the allocator's room between blocks.
_COMBINE_COPIES = 5

# A chunk of an untouched tensor converted: as read, and up to twice that (float16 widened
# to float32) in each of two output buffers.
_CONVERSION = COPY_CHUNK_BYTES + 2 * 2 * COPY_CHUNK_BYTES


def _widen(shards: tuple[ShardPlan, ...]) -> int:
    """FP8: room to widen, and a requantized weight's report, worked out on about WIDEN_CHUNK
    elements at a time (three float32 values, the FP8 codes), up to twice that."""
    quantized = any(t.quant for shard in shards for t in shard.tensors)
    return (4 + 2 * (3 * 4 + 1)) * WIDEN_CHUNK if quantized else 0


def _peak_memory(shards: tuple[ShardPlan, ...], adapters: list[Adapter]) -> int:
    """Working memory a merge on the CPU needs beyond the interpreter: the largest merged
    block in float32 copies, its source bytes, two output buffers (one written and hashed
    while the next fills), the buffers of a combination (``--combine``), the adapter factors
    of the tensor with the most (in float32, and one as stored), and the conversion and
    staging buffers."""
    blocks = _blocks(shards, adapters)
    worst = max((b.copies * 4 * b.count + b.source + 2 * b.output for b in blocks), default=0)
    factors = max((b.factors + b.stored for b in blocks), default=0)
    combined = max((b.combined for b in blocks), default=0)
    return max(worst, _CONVERSION) + combined + factors + _widen(shards) + STAGING_BUFFERS * STAGING_BYTES


def _gpu_memory(shards: tuple[ShardPlan, ...], adapters: list[Adapter]) -> GpuMemory:
    """The same on a GPU. On the device: the float32 copies and the rounded output of the
    largest block, the blocks read ahead (two, the second only of blocks small enough to
    lock), the factors in float32, the FP8 pieces; a batch's shared pass adds one block a
    job. On the host: the blocks read ahead, three output buffers, the factors as stored,
    the conversion and staging buffers. Locked: the host buffers of at most
    PINNED_BUFFER_BYTES that take part in copies, whole pages each; a larger request (a whole
    tensor an op needs at once) goes to a pageable buffer of its own beside them."""
    blocks = _blocks(shards, adapters)
    sources = [b.source for b in blocks]
    converted = any(t.action is Action.CONVERT for s in shards for t in s.tensors)
    outputs = [2 * COPY_CHUNK_BYTES if converted else 0, *(b.output for b in blocks)]
    device = max((b.copies * 4 * b.count + b.output for b in blocks), default=0) + _widen(shards)
    device += max((b.combined for b in blocks), default=0)
    device += max(sources, default=0) + _lockable(sources) + max((b.factors for b in blocks), default=0)
    host = 2 * _lockable(sources) + _spilled(sources) + 3 * (_lockable(outputs) + _spilled(outputs))
    host += max((b.stored for b in blocks), default=0) + COPY_CHUNK_BYTES + STAGING_BUFFERS * STAGING_BYTES
    locked = 2 * _pages(_lockable(sources)) + 3 * _pages(_lockable(outputs))
    return GpuMemory(host, locked, device)


def _lockable(sizes: list[int]) -> int:
    """The largest of ``sizes`` that a locked buffer holds."""
    return max((size for size in sizes if size <= PINNED_BUFFER_BYTES), default=0)


def _spilled(sizes: list[int]) -> int:
    """The pageable buffer beside a locked one, for the largest of ``sizes`` if too large to lock."""
    largest = max(sizes, default=0)
    return largest if largest > PINNED_BUFFER_BYTES else 0


def _pages(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
