"""One cluster task's work: the output shards read from one base shard, for every job of a
group that still needs them, written on whichever node runs it.

Nothing here imports Ray: ``cluster.py`` ships units to the nodes. A unit carries only its
slice of each job's plan (its shards' tensors and offsets, the adapters' summaries), the
adapters' files when they travel through Ray's object store, and where each output goes. On
the node it fetches the base shard through the node's own Hub cache (a Hub base); writes each
output as ``NAME.ATTEMPT.tmp`` in the job's output folder, ATTEMPT a fresh random name, so
that a duplicate attempt of the same unit never writes into another's file; pre-uploads it
when the job publishes (and deletes it then, with ``delete_after_upload``); and returns what
the driver records. The driver, not the node, renames a shard into place.

An I/O error (``OSError``) is raised, after this attempt's temp files are removed, so that
Ray runs the unit again; any other error is the job's own (bad input, a Hub refusal that was
already retried) and comes back as one line, for the driver to report with the shard and node.
"""

from __future__ import annotations

import dataclasses
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import ClusterError, ShardmergeError
from ..output import outdir
from ..output.journal import ShardRecord
from ..output.publish import PushTarget, preupload
from ..planning.model import AdapterSummary, Plan, ShardPlan
from .fetch import fetcher_for
from .merger import TensorMerger, lean_process, open_adapters, resolve_device
from .shared import Output, SegmentReader, write_together
from .stop import StopRequest


@dataclass(frozen=True)
class UnitJob:
    """One job's part of a unit: its plan cut to the unit's shards, and where it publishes."""

    plan: Plan
    push: PushTarget | None


@dataclass(frozen=True)
class Unit:
    """The output shards of one base shard for a group of jobs, and the device to merge on."""

    source: str
    jobs: tuple[UnitJob, ...]
    device: str


@dataclass(frozen=True)
class ShardDone:
    """How one job's shard ended on the node. ``kept``: its temp file ``NAME.ATTEMPT.tmp`` is
    in the output folder, for the driver to rename; ``uploaded``: the Hub holds it (its
    sha256 is in ``record``). ``error``: one line, when the job failed on this shard."""

    job: int
    shard: str
    attempt: str
    record: ShardRecord | None = None
    uploaded: bool = False
    kept: bool = False
    error: str | None = None


def merge_unit(unit: Unit, adapter_files: Mapping[str, bytes]) -> list[ShardDone]:
    """Write ``unit`` on this node. ``adapter_files``: adapter weight files sent by the
    driver, by the path the plan names them by; others are read at that path."""
    attempt = uuid.uuid4().hex[:12]
    done: list[ShardDone] = []
    try:
        with ExitStack() as stack:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shardmerge-unit-")))
            device = resolve_device(unit.device)
            stack.enter_context(lean_process(device))
            plans = [_localized(job.plan, adapter_files, scratch) for job in unit.jobs]
            names = list(dict.fromkeys(shard.name for plan in plans for shard in plan.shards))
            union = [next(s for plan in plans for s in plan.shards if s.name == name) for name in names]
            drop = all(job.push is not None and job.push.delete_after_upload for job in unit.jobs)
            fetcher = fetcher_for(cut(plans[0], union), drop)
            stack.callback(fetcher.close)
            mergers = []
            for job, plan in zip(unit.jobs, plans, strict=True):
                merger = TensorMerger(device, plan, open_adapters(plan, stack), sha256=job.push is not None)
                stack.callback(merger.close)
                merger.reserve(plan.shards)
                Path(plan.output or "").mkdir(parents=True, exist_ok=True)
                mergers.append(merger)
            reader = SegmentReader(pinned=device.type == "cuda")
            failed: set[int] = set()
            for name in names:
                wanting = [(i, shard) for i, plan in enumerate(plans) for shard in plan.shards if shard.name == name]
                source = fetcher.fetch(wanting[0][1])
                outputs = [
                    Output(mergers[i], dataclasses.replace(shard, source=str(source)), _folder(plans[i]), attempt)
                    for i, shard in wanting
                    if i not in failed
                ]
                _write(outputs, reader)
                for (i, _), output in zip([w for w in wanting if w[0] not in failed], outputs, strict=True):
                    result = _finish(i, output, unit.jobs[i].push, attempt)
                    done.append(result)
                    if result.error is not None:
                        failed.add(i)
                fetcher.done(wanting[0][1])
    except OSError:
        for result in done:
            if result.kept:
                outdir.tmp_path(_folder(unit.jobs[result.job].plan) / result.shard, attempt).unlink(missing_ok=True)
        raise
    return done


def _folder(plan: Plan) -> Path:
    return Path(plan.output or "")


def _localized(plan: Plan, adapter_files: Mapping[str, bytes], scratch: Path) -> Plan:
    """``plan`` with the adapter files the driver sent written to ``scratch``, read from there."""
    adapters: list[AdapterSummary] = []
    for adapter in plan.adapters:
        data = adapter_files.get(adapter.weights_file)
        if data is not None:
            copy = scratch / f"{adapter.index}-{Path(adapter.weights_file).name}"
            if not copy.exists():
                copy.write_bytes(data)
            adapter = dataclasses.replace(adapter, weights_file=str(copy))
        elif not Path(adapter.weights_file).is_file():
            raise ClusterError(
                "adapter file not found on this node",
                file=adapter.weights_file,
                hint="put large adapters where every node reads them at the same path (a shared filesystem)",
            )
        adapters.append(adapter)
    return dataclasses.replace(plan, adapters=tuple(adapters))


def _write(outputs: list[Output], reader: SegmentReader) -> None:
    """Every output's copy of one shard: by itself for one job (untouched tensors copied by the
    kernel), else from one read of the base. Sets each output's record or error."""
    progress = tqdm(disable=True)
    stop = StopRequest()  # never entered: a task is stopped by Ray, not by signals of its own
    if len(outputs) == 1:
        output = outputs[0]
        try:
            output.record = output.merger.write_shard(output.shard, output.folder, progress, stop, output.attempt)
        except ShardmergeError as exc:
            output.error = exc
        return
    write_together(outputs, reader, progress, stop)


def _finish(job: int, output: Output, push: PushTarget | None, attempt: str) -> ShardDone:
    """The result of one job's shard; publishes it first when the job does."""
    name = output.shard.name
    if output.error is not None:
        if isinstance(output.error, OSError):
            raise output.error
        return ShardDone(job, name, attempt, error=_one_line(output.error))
    record = output.record
    assert record is not None
    if push is None:
        return ShardDone(job, name, attempt, record, kept=True)
    from huggingface_hub import HfApi

    assert record.sha256 is not None
    try:
        uploaded = preupload(HfApi(), push, name, output.tmp, record.size, record.sha256)
    except ShardmergeError as exc:
        output.tmp.unlink(missing_ok=True)
        return ShardDone(job, name, attempt, error=_one_line(exc))
    if uploaded and push.delete_after_upload:
        output.tmp.unlink()
        return ShardDone(job, name, attempt, record, uploaded=True)
    return ShardDone(job, name, attempt, record, uploaded=uploaded, kept=True)


def _one_line(exc: BaseException) -> str:
    return exc.one_line() if isinstance(exc, ShardmergeError) else f"{type(exc).__name__}: {exc}"


def cut(plan: Plan, shards: list[ShardPlan]) -> Plan:
    """``plan`` with only ``shards``: what a unit carries of it."""
    return dataclasses.replace(plan, shards=tuple(shards))
