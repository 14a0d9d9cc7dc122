"""``shardmerge verify``: a finished merge checked against its journal, and optionally against
a fresh computation from the base and adapters."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MergeJob
from .errors import OutputError, SafetensorsFormatError, ShardmergeError, VerificationProblem, VerifyError
from .formats.confined import open_input
from .formats.dtypes import TORCH_DTYPES
from .formats.fileio import pread_into
from .formats.jsondoc import parse
from .formats.safetensors import INDEX_NAME, ITEMSIZE, SafetensorsHeader, TensorInfo, read_header
from .inputs import hub
from .output import journal as journals
from .output import lock, outdir
from .planning.model import Plan, ShardPlan, TensorPlan
from .planning.planner import build_plan
from .run.codecs import kernel_of
from .run.device import Device
from .run.factors import open_adapters
from .run.kernels import all_finite
from .run.merger import TensorMerger
from .tuning import COPY_CHUNK_BYTES


@dataclass(frozen=True)
class VerifyReport:
    shards: int
    tensors: int
    merged_checked: int
    recomputed: int
    uploaded_only: int = 0  # shards deleted after their upload: on the Hub, not here
    running: str | None = None  # the run that holds the folder's lock while it was checked
    changes: tuple[tuple[str, int], ...] = ()  # each adapter and the base tensors it changes
    unchanged: int = 0  # merged tensors that came out equal to the base
    non_finite_kept: int = 0  # tensors whose NaN or Inf came from the base
    against_base: int = 0  # tensors compared with the base


def verify(folder: Path, *, recompute: int = 0, against_base: bool = False) -> VerifyReport:
    """Check the index against the files, every header, size and hash against the journal,
    and merged and converted tensors for NaN and Inf; with ``recompute`` also recompute that
    many merged tensors from the inputs, and with ``against_base`` check that every merged
    tensor differs from the base and every other one equals it. Raises VerifyError listing
    every problem. Reads without the folder's lock, and says which run held it."""
    running = lock.held_by(folder)
    journal = journals.load(folder)
    if journal is None:
        raise OutputError("no shardmerge journal here", file=folder, hint="verify checks the output folder of a merge")
    if not journal.complete:
        if running:
            raise OutputError(f"a shardmerge run ({running}) is still writing this folder", file=folder)
        raise OutputError(
            "the merge in this folder did not finish", file=folder, hint="run the same merge again to resume it"
        )
    problems: list[ShardmergeError] = []
    index, total = _read_index(folder, problems)
    headers: dict[str, SafetensorsHeader | None] = {}
    uploaded_only = 0
    for name in sorted(set(index.values()) | set(journal.shards)):
        path = folder / name
        record = journal.shards.get(name)
        headers[name] = None
        if record is not None and journal.deleted(name):
            uploaded_only += 1
            continue
        if record is None:
            problems.append(VerificationProblem("shard is in the index but not in the journal", file=path))
            continue
        if not path.is_file():
            problems.append(VerificationProblem("shard is missing", file=path, hint="run the merge again to redo it"))
            continue
        try:
            header = headers[name] = read_header(path)
        except SafetensorsFormatError as exc:
            problems.append(exc)
            continue
        _check_shard(path, record, header.file_size, set(index.values()), problems)
        computed = {name: "merged" for name in record.merged} | {name: "converted" for name in record.converted}
        kept = set(record.non_finite_kept)
        _check_finite(path, header.tensors, {k: v for k, v in computed.items() if k not in kept}, problems)
    if index:
        _check_index(folder, index, total, headers, problems)
    read = {name: header for name, header in headers.items() if header is not None}
    merged = sum(len(journal.shards[name].merged) for name in read)
    recomputed = _recompute(folder, journal, recompute, problems) if recompute else 0
    compared = _against_base(folder, journal, problems) if against_base else 0
    if problems:
        raise VerifyError(problems)
    records = journal.shards.values()
    return VerifyReport(
        len(read),
        sum(len(h.tensors) for h in read.values()),
        merged,
        recomputed,
        uploaded_only,
        running,
        changes=tuple(zip((a["path"] for a in journal.job["adapters"]), journal.changes, strict=False)),
        unchanged=sum(len(record.unchanged) for record in records),
        non_finite_kept=sum(len(record.non_finite_kept) for record in records),
        against_base=compared,
    )


def _read_index(folder: Path, problems: list[ShardmergeError]) -> tuple[dict[str, str], int]:
    """The index's weight map and total_size (empty and 0 when unreadable, a problem noted)."""
    path = folder / INDEX_NAME
    try:
        index = parse(outdir.read_own(path))
        weight_map = {str(k): str(v) for k, v in index["weight_map"].items()}
        total = int(index["metadata"]["total_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.append(VerificationProblem(f"unreadable index ({exc})", file=path))
        return {}, 0
    return weight_map, total


def _check_index(
    folder: Path,
    index: dict[str, str],
    total: int,
    headers: dict[str, SafetensorsHeader | None],
    problems: list[ShardmergeError],
) -> None:
    """The index names exactly the tensors in each file, and its total_size is their bytes."""
    by_file: dict[str, set[str]] = {}
    for tensor, file in index.items():
        by_file.setdefault(file, set()).add(tensor)
    complete = True
    sizes = 0
    for file, names in by_file.items():
        header = headers.get(file)
        if header is None:
            complete = False  # reported with the shard; the total cannot be checked
            continue
        if set(header.tensors) != names:
            extra = sorted(set(header.tensors) ^ names)[:3]
            problems.append(
                VerificationProblem(f"index and file disagree on tensors ({', '.join(extra)})", file=folder / file)
            )
        sizes += sum(info.nbytes for info in header.tensors.values())
    if complete and sizes != total:
        problems.append(
            VerificationProblem(f"total_size is {total} but the tensors hold {sizes} bytes", file=folder / INDEX_NAME)
        )


def _check_shard(
    path: Path, record: journals.ShardRecord, size: int, indexed: set[str], problems: list[ShardmergeError]
) -> None:
    if path.name not in indexed:
        problems.append(VerificationProblem("shard is not in the index", file=path))
    if size != record.size:
        problems.append(
            VerificationProblem(f"size is {size} bytes, the journal says {record.size}", file=path, hint=_REDO)
        )
    elif journals.header_sha256(path) != record.header_sha256:
        problems.append(VerificationProblem("header differs from the one written", file=path, hint=_REDO))
    elif wrong := journals.mismatched_hashes(path, record):
        problems.append(VerificationProblem(f"{' and '.join(wrong)} differ from the journal's", file=path, hint=_REDO))


_REDO = "the file changed after the merge: run the merge again to redo this shard"


def _check_finite(
    path: Path, tensors: dict[str, TensorInfo], computed: dict[str, str], problems: list[ShardmergeError]
) -> None:
    """Merged and converted tensors hold no NaN or Inf (but those the merge kept from the base)."""
    fd = open_input(path)
    try:
        for name, kind in computed.items():
            info = tensors.get(name)
            if info is None:
                problems.append(VerificationProblem(f"{kind} tensor is missing from the shard", file=path, tensor=name))
                continue
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
            pread_into(fd, memoryview(raw.numpy()), info.begin)
            if not all_finite(raw.view(TORCH_DTYPES[info.dtype])):
                problems.append(
                    VerificationProblem(
                        f"{kind} tensor holds NaN or Inf",
                        file=path,
                        tensor=name,
                        hint="check the adapter's values and the output dtype's range",
                    )
                )
    finally:
        os.close(fd)


def _same_plan(folder: Path, journal: journals.Journal, problems: list[ShardmergeError]) -> Plan | None:
    """The merge's plan rebuilt from its inputs, or None (a problem noted) if they changed."""
    plan = build_plan(MergeJob.model_validate(journal.job))
    if plan.fingerprint != journal.fingerprint:
        changes = "; ".join(journals.describe_changes(journal.inputs, plan.inputs))
        problems.append(VerificationProblem(f"the inputs changed since the merge ({changes})", file=folder))
        return None
    return plan


def _base_shard(plan: Plan, shard: ShardPlan) -> Path:
    if plan.base_repo is not None and not Path(shard.source).exists():
        hub.download(plan.base_repo, str(plan.base_commit), Path(shard.source).name)
    return Path(shard.source)


def _against_base(folder: Path, journal: journals.Journal, problems: list[ShardmergeError]) -> int:
    """Every merged tensor differs from the base, every other one equals it (in the output
    dtype), compared chunk by chunk; returns the number of tensors compared."""
    plan = _same_plan(folder, journal, problems)
    if plan is None:
        return 0
    compared = 0
    # Tensors an adapter saved whole with the base's own values (PEFT saves an embedding layer
    # whole beside LoRA on it or on its tied head): equal to the base, as the merge recorded.
    unchanged = {name for record in journal.shards.values() for name in record.unchanged}
    with ExitStack() as stack:
        for shard in plan.shards:
            if journal.deleted(shard.name):
                continue
            src = open_input(_base_shard(plan, shard))
            stack.callback(os.close, src)
            out = open_input(folder / shard.name)
            stack.callback(os.close, out)
            # An untied head's source bytes are the embedding's: it is compared with those.
            for tensor in shard.tensors:
                if tensor.computed and not tensor.ops:
                    continue  # new scales, or a dequantized weight: computed from the base, not copied
                copy = tensor.name in unchanged and all(op.kind == "replace" for op in tensor.ops)
                if _equals_base(src, out, shard.header_size, tensor) == bool(tensor.ops) and not copy:
                    problems.append(
                        VerificationProblem(
                            "merged tensor is identical to the base: the adapters did not change it"
                            if tensor.ops
                            else "copied tensor differs from the base",
                            file=folder / shard.name,
                            tensor=tensor.name,
                        )
                    )
                compared += 1
    return compared


def _equals_base(src: int, out: int, header_size: int, tensor: TensorPlan) -> bool:
    """Whether output ``tensor`` holds the base's values, rounded to its dtype where it changed
    (never, for a tensor resized to another number of rows)."""
    if tensor.base_rows:
        return False
    count = (tensor.src_end - tensor.src_begin) // ITEMSIZE[tensor.src_dtype]
    step = COPY_CHUNK_BYTES // 4
    for first in range(0, count, step):
        last = min(count, first + step)
        base = _read(src, tensor.src_begin + first * ITEMSIZE[tensor.src_dtype], last - first, tensor.src_dtype)
        ours = _read(out, header_size + tensor.begin + first * ITEMSIZE[tensor.dtype], last - first, tensor.dtype)
        if not torch.equal(base.to(ours.dtype).view(torch.uint8), ours.view(torch.uint8)):
            return False
    return True


def _read(fd: int, begin: int, count: int, dtype: str) -> torch.Tensor:
    raw = torch.empty(count * ITEMSIZE[dtype], dtype=torch.uint8)
    pread_into(fd, memoryview(raw.numpy()), begin)
    return raw.view(TORCH_DTYPES[dtype])


def _recompute(folder: Path, journal: journals.Journal, count: int, problems: list[ShardmergeError]) -> int:
    """Merge ``count`` sampled tensors again, on the CPU, and compare them with the files:
    exactly where the shard was computed on the CPU, within ``_within_tolerance`` where it
    was computed on a GPU."""
    plan = _same_plan(folder, journal, problems)
    if plan is None:
        return 0
    here = [shard for shard in plan.shards if not journal.deleted(shard.name)]
    merged = [(shard, tensor) for shard in here for tensor in shard.tensors if tensor.ops]
    step = max(1, len(merged) // max(count, 1))
    sample = merged[::step][:count]
    host = Device()
    with ExitStack() as stack:
        stack.enter_context(host.activate())
        merger = TensorMerger(host, plan, open_adapters(plan, stack))
        stack.callback(merger.close)
        for shard, tensor in sample:
            src = open_input(_base_shard(plan, shard))
            stack.callback(os.close, src)
            fresh = bytearray()
            for view, buffer in merger.merge(src, tensor):
                buffer.settle()
                fresh += view
                merger.sink.release(buffer)
            expected = torch.frombuffer(fresh, dtype=TORCH_DTYPES[tensor.dtype])
            out = open_input(folder / shard.name)
            stack.callback(os.close, out)
            header_size = shard.header_size
            raw = torch.empty(tensor.end - tensor.begin, dtype=torch.uint8)
            pread_into(out, memoryview(raw.numpy()), header_size + tensor.begin)
            found = raw.view(TORCH_DTYPES[tensor.dtype])
            exact = not journal.device_of(shard.name).startswith("cuda")
            same = torch.equal(found, expected) if exact else _within_tolerance(found, expected, tensor)
            if not same:
                problems.append(
                    VerificationProblem(
                        "differs from a fresh merge of the same inputs", file=folder / shard.name, tensor=tensor.name
                    )
                )
    return len(sample)


# How far a GPU's float32 result may stray from the CPU's, relative to the tensor's RMS: the
# merge's own float32 error (another order of summation, fused multiply-adds) is a few units
# of float32's last place (2^-23) of the terms; 2^-16 leaves a factor of 128.
FLOAT32_ERROR = 2.0**-16


def _within_tolerance(found: torch.Tensor, expected: torch.Tensor, tensor: TensorPlan) -> bool:
    """Whether a GPU merge's ``found`` is a CPU merge's ``expected`` but for the float32
    error of the merge itself. A float output: within one unit in the last place at the
    larger of the two magnitudes (rounding either float32 value to the output dtype), plus
    FLOAT32_ERROR times the RMS of the expected tensor's finite values (where the base and
    the update nearly cancel, the result is small and its float32 error is not); NaN and
    infinities (kept from the base) exactly where the CPU has them. A requantized weight:
    every value's code within one step, codes ordered by their signed magnitude (so that +0
    and -0 are one): an error smaller than a step crosses at most one rounding boundary; an
    FP8 NaN code only where the CPU has one. A combined tensor (``--combine``) may differ
    further in a few values, at most COMBINED_STRAYS of them: where an update's magnitude
    lies within the float32 error of a threshold, or a vote within that of zero, the GPU's
    rounding keeps or elects what the CPU's does not."""
    if found.numel() == 0 or found.shape != expected.shape:
        return found.shape == expected.shape
    if tensor.quant is not None and tensor.requantized:
        return kernel_of(tensor.quant.format).within_one_step(tensor.quant.format, found, expected)
    strays = int(found.numel() * COMBINED_STRAYS) if tensor.combined else 0
    return _within_float_tolerance(found, expected, strays)


# The fraction of a combined tensor's values a GPU merge may place on the other side of a
# threshold or an election than the CPU's (see _within_tolerance).
COMBINED_STRAYS = 2.0**-12


def _within_float_tolerance(found: torch.Tensor, expected: torch.Tensor, strays: int = 0) -> bool:
    ours, theirs = found.float(), expected.float()
    finite = theirs[theirs.isfinite()].double()
    rms = float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0
    _, exponent = torch.frexp(torch.maximum(ours.abs(), theirs.abs()))
    info = torch.finfo(expected.dtype)
    ulp = torch.exp2((exponent - 1).float()).mul_(info.eps).clamp_(min=info.tiny * info.eps)
    close = (ours - theirs).abs() <= ulp + FLOAT32_ERROR * rms
    exact = (ours == theirs) | (ours.isnan() & theirs.isnan())
    return int((~torch.where(theirs.isfinite() & ours.isfinite(), close, exact)).sum()) <= strays
