"""A job's life in a pass, whoever writes its shards: claim its output folder and journal,
record each finished shard, close it (side files, index, commit) and report.

The local pass (``executor.py``) and the cluster pass (``cluster.py``) share all of this; they
differ only in where the shards are written.
"""

from __future__ import annotations

import errno
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import JobConfigError, NoChangeError, OutputError
from ..formats.confined import read_input
from ..formats.jsonedit import rewrite
from ..formats.safetensors import INDEX_NAME, render_index
from ..output import card, lock, outdir
from ..output import journal as journals
from ..output.publish import Publisher, PushTarget, commit_message
from ..planning.adapters import MAX_CONFIG_BYTES
from ..planning.model import Plan, ShardPlan
from .merger import TensorMerger

# errno values that mean "no room": a full disk, a quota, or a file size limit.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Room the free-space check keeps for a line of the index, and for the model card.
INDEX_LINE_BYTES = 256
CARD_BYTES = 64 * 1024


@dataclass(frozen=True)
class MergeReport:
    output: str
    shards: int
    shards_skipped: int
    tensors_merged: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    device: str
    commit: str | None = None  # the Hub commit, when published
    url: str | None = None
    unchanged: int = 0  # merged tensors that came out equal to the base (an update of zero)
    # of those, tensors the adapters saved whole that hold the base's own values (PEFT saves
    # an embedding layer whole beside LoRA on it or on its tied head): right, not a warning
    unchanged_copies: tuple[str, ...] = ()
    non_finite_kept: tuple[str, ...] = ()  # tensors whose NaN or Inf came from the base
    # Merged weights written back quantized: how many, and over all of them together, the
    # norm of what survived requantization, Q(W + dW) - W, and of the error it added,
    # Q(W + dW) - (W + dW), each relative to the norm of the update dW; the weight that kept
    # the least of its update, and how much.
    requantized: int = 0
    requantized_non_finite: int = 0  # requantized weights holding the base's NaN or Inf: no figures
    update_kept: float | None = None
    update_error: float | None = None
    least_kept: tuple[str, float] | None = None
    # On a GPU: the host memory locked for its copies, and the GPU memory torch held, at most.
    locked_bytes: int = 0
    device_bytes: int = 0


@dataclass
class Job:
    """One job of a pass: its plan, where to publish it, and how it is going."""

    plan: Plan
    push: PushTarget | None = None
    stack: ExitStack = field(default_factory=ExitStack)
    journal: journals.Journal | None = None
    publisher: Publisher | None = None
    merger: TensorMerger | None = None
    todo: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    error: BaseException | None = None
    commit: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.plan.output or "")


def step(job: Job, action: Callable[[], object]) -> None:
    """Run one step of ``job``; a failure ends the job (not the pass) and is kept for its report."""
    try:
        action()
    except OSError as exc:
        job.error = io_error(exc, job)
    except Exception as exc:
        job.error = exc


def claim(job: Job, device: str, restart: bool, verify_resume: bool, quiet: bool) -> None:
    """Take the job's output folder (its lock, for the whole pass), its journal, and its Hub
    repo; find the shards still to write, and check there is room for them."""
    plan = job.plan
    if not plan.output:
        raise JobConfigError("no output folder given", hint="pass -o OUT, or set output: in the job")
    inputs = [Path(plan.shards[0].source).parent, *(Path(adapter.weights_file).parent for adapter in plan.adapters)]
    journals.check_output(job.folder, inputs)
    job.stack.enter_context(lock.hold(job.folder))
    journal = job.journal = journals.claim(job.folder, plan, restart=restart, device=device)
    if job.push is None:
        journal.set_target(None)
    else:
        job.publisher = Publisher(job.push, job.folder, commit_message(plan.base, len(plan.adapters)), quiet=quiet)
        job.stack.callback(job.publisher.close)
        job.publisher.open(journal)
    todo = [shard for shard in plan.shards if not journal.finished(shard, rehash=verify_resume)]
    job.todo = {shard.name for shard in todo}
    if todo:
        _check_same_kind(journal, [shard.name for shard in plan.shards if shard.name not in job.todo], device)
    needed = [shard.size for shard in todo]
    if job.push is not None and job.push.delete_after_upload:
        needed = sorted(needed)[-2:]  # the disk holds one shard uploading, one being written
    _check_free_space(job.folder, sum(needed) + (0 if journal.complete else side_bytes(plan)))
    if job.publisher is not None:
        for shard in plan.shards:
            if shard.name not in job.todo:
                job.publisher.submit(shard.name)  # finished by an earlier run, maybe not uploaded


def _check_same_kind(journal: journals.Journal, finished: list[str], device: str) -> None:
    """A resumed merge goes on on the kind of device its finished shards were computed on:
    a GPU's products are not the CPU's to the last bit, and the output would mix both."""
    kind = device.partition(":")[0]
    others = [name for name in finished if journal.device_of(name).partition(":")[0] != kind]
    if others:
        began = journal.device_of(others[0])
        raise OutputError(
            f"this merge began on {began} ({len(others)} of its shards were computed there); resuming on {device} "
            "would mix shards computed on two kinds of device, not the bytes of either's merge",
            file=journal.folder,
            hint=f"resume with --device {began.partition(':')[0]}, or --restart to merge every shard on {device}",
        )


def record_shard(job: Job, shard: ShardPlan, written: journals.ShardRecord, attempt: str = "") -> None:
    """A shard is written, as ``NAME.tmp`` (``NAME.ATTEMPT.tmp`` by a cluster task): rename it
    into place, record it, hand it to the uploader."""
    assert job.journal is not None
    outdir.commit(outdir.tmp_path(job.folder / shard.name, attempt), job.folder / shard.name)
    job.journal.record(shard.name, written)
    done(job, shard)


def done(job: Job, shard: ShardPlan) -> None:
    """``shard`` is recorded: hand it to the uploader (unless the Hub holds it already)."""
    job.todo.discard(shard.name)
    job.written.add(shard.name)
    if job.publisher is not None:
        job.publisher.submit(shard.name)


def close(job: Job, check: Callable[[], None]) -> None:
    assert job.journal is not None
    records = job.journal.shards.values()
    merged = sum(len(record.merged) for record in records)
    if merged and job.plan.strict and sum(len(record.unchanged) for record in records) == merged:
        raise NoChangeError(
            f"the adapters changed none of the {merged} tensors they target: the output equals the base",
            file=job.folder,
            hint="check that the adapter was trained (every lora_B zero means an untrained adapter); "
            "nothing was published",
        )
    _finish(job.plan, job.folder)
    job.journal.complete = True
    job.journal.save()
    if job.publisher is not None:
        job.commit = job.publisher.finish(check)


def progress_bar(jobs: list[Job], quiet: bool) -> tqdm:
    total = sum(job.plan.total_bytes for job in jobs)
    left = sum(shard.size for job in jobs for shard in job.plan.shards if shard.name in job.todo)
    return tqdm(
        total=total,
        initial=total - left,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def report(job: Job, device: str, locked_bytes: int = 0, device_bytes: int = 0) -> MergeReport:
    plan = job.plan
    merged = sum(shard.merged for shard in plan.shards)
    written = [shard for shard in plan.shards if shard.name in job.written]
    assert job.journal is not None
    records = job.journal.shards.values()
    kept = dict.fromkeys(name for record in records for name in record.non_finite_kept)  # NaN or Inf from the base
    return MergeReport(
        output=str(job.folder),
        shards=len(plan.shards),
        shards_skipped=len(plan.shards) - len(written),
        tensors_merged=merged,
        tensors_copied=sum(len(shard.tensors) for shard in plan.shards) - merged,
        bytes_written=sum(shard.size for shard in written),
        seconds=time.monotonic() - job.started,
        device=device,
        locked_bytes=locked_bytes,
        device_bytes=device_bytes,
        commit=job.commit,
        url=job.publisher.url if job.publisher is not None else None,
        unchanged=sum(len(record.unchanged) for record in records),
        unchanged_copies=tuple(
            tensor.name
            for shard in plan.shards
            for tensor in shard.tensors
            if tensor.ops
            and all(op.kind == "replace" for op in tensor.ops)
            and any(tensor.name in record.unchanged for record in records)
        ),
        non_finite_kept=tuple(kept),
        requantized_non_finite=sum(
            1 for shard in plan.shards for tensor in shard.tensors if tensor.name in kept and tensor.requantized
        ),
        **_requantization([entry for record in records for entry in record.requantized]),
    )


def _requantization(entries: list[tuple[str, float, float, float]]) -> dict[str, Any]:
    """The requantization figures of a report from the journal's squared norms."""
    if not entries:
        return {}
    update = sum(entry[1] for entry in entries)
    kept = {name: (k / d) ** 0.5 for name, d, k, _ in entries if d > 0}
    return {
        "requantized": len(entries),
        "update_kept": (sum(entry[2] for entry in entries) / update) ** 0.5 if update > 0 else None,
        "update_error": (sum(entry[3] for entry in entries) / update) ** 0.5 if update > 0 else None,
        "least_kept": min(kept.items(), key=lambda item: item[1]) if kept else None,
    }


def side_bytes(plan: Plan) -> int:
    """What the output's other files take: the base's side files (their data: holes are not
    copied; config.json among them), and the index and the model card (a line of the index
    per tensor, a few KB of card)."""
    tensors = sum(len(shard.tensors) for shard in plan.shards)
    return sum(outdir.allocated(Path(name)) for name in plan.extra_files) + tensors * INDEX_LINE_BYTES + CARD_BYTES


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OutputError(
            f"not enough free space: the merge writes {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free",
            file=folder,
            hint="free some space or choose another output folder",
        )


def io_error(exc: OSError, job: Job) -> OutputError:
    where = exc.filename or job.folder
    if exc.errno in NO_SPACE:
        left = sum(shard.size for shard in job.plan.shards if shard.name in job.todo) + side_bytes(job.plan)
        amount = f"{left / 2**30:.2f} GiB" if left >= 2**30 else f"{left / 2**20:.1f} MiB"
        return OutputError(
            f"out of space ({exc.strerror}) with up to {amount} still to write",
            file=where,
            hint="free some space, then run the same command again: finished shards are kept",
        )
    return OutputError(f"I/O error: {exc.strerror or exc}", file=where, hint="check the disk and permissions")


def _finish(plan: Plan, folder: Path) -> None:
    """Non-weight files of the base, the model card, then the index, last, so its presence
    means done. The card replaces the base's README: it describes the merged model."""
    base_card = None
    for name in plan.extra_files:
        source = Path(name)
        final = folder / source.name
        if source.name == card.CARD_NAME:
            base_card = source
        elif source.name == "config.json" and plan.config is not None:
            # only the keys the merge changes: every other byte as the base has it
            text = read_input(source, MAX_CONFIG_BYTES).decode("utf-8")
            outdir.write_bytes_atomic(final, rewrite(text, plan.config).encode())
        else:
            outdir.copy_atomic(source, final)
    outdir.write_bytes_atomic(folder / card.CARD_NAME, card.render(plan, base_card))
    weight_map = {tensor.name: shard.name for shard in plan.shards for tensor in shard.tensors}
    outdir.write_bytes_atomic(folder / INDEX_NAME, render_index(plan.tensor_bytes, weight_map, plan.index_metadata))
