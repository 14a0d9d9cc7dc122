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

An I/O error (``OSError``) or a failed download of the base is raised, after this attempt's
temp files are removed, so that Ray runs the unit again; any other error is the job's own
(bad input, no room or no right to write its output, a Hub refusal already retried) and
comes back as one line, for the driver to report with the shard and node; the other jobs of
the unit go on.
"""

from __future__ import annotations

import dataclasses
import errno
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import ClusterError, ShardmergeError
from ..inputs import hub
from ..output import outdir
from ..output.journal import ShardRecord
from ..output.publish import PushTarget, preupload
from ..planning.model import AdapterSummary, Member, Plan, ShardPlan, Stored
from .device import resolve_device
from .factors import open_adapters
from .fetch import fetcher_for
from .jobs import NO_SPACE
from .merger import TensorMerger, lean_process
from .shard_writer import write_shard
from .shared import Output, SegmentReader, write_together
from .stop import StopRequest

# errno values of an output that cannot be written: no room (a full disk, a quota, a size
# limit), or no right to write it.
_JOBS_OWN = NO_SPACE | {errno.EROFS, errno.EACCES, errno.EPERM}


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
            copies = _copies(adapter_files, scratch)
            plans = [_localized(job.plan, copies) for job in unit.jobs]
            names = list(dict.fromkeys(shard.name for plan in plans for shard in plan.shards))
            union = [next(s for plan in plans for s in plan.shards if s.name == name) for name in names]
            drop = all(job.push is not None and job.push.delete_after_upload for job in unit.jobs)
            fetcher = fetcher_for(cut(plans[0], union), drop)
            stack.callback(fetcher.close)
            files = {unit.source: str(fetcher.fetch(union[0]))} | _companions(plans[0], union, unit.source)
            plans = [cut(plan, [relocated(shard, files) for shard in plan.shards]) for plan in plans]
            mergers = []
            for job, plan in zip(unit.jobs, plans, strict=True):
                merger = TensorMerger(device, plan, open_adapters(plan, stack), sha256=job.push is not None)
                stack.callback(merger.close)
                merger.reserve(plan.shards)
                _folder(plan).mkdir(parents=True, exist_ok=True)
                mergers.append(merger)
            reader = SegmentReader(device.pinned)
            failed: set[int] = set()
            for name in names:
                wanting = [
                    (i, s) for i, plan in enumerate(plans) for s in plan.shards if s.name == name and i not in failed
                ]
                outputs = [Output(mergers[i], shard, _folder(plans[i]), attempt) for i, shard in wanting]
                if outputs:
                    _write(outputs, reader)
                for (i, _), output in zip(wanting, outputs, strict=True):
                    result = _finish(i, output, unit.jobs[i].push, attempt)
                    done.append(result)
                    if result.error is not None:
                        failed.add(i)
                fetcher.done(next(s for s in union if s.name == name))
    except OSError:
        for result in done:
            if result.kept:
                outdir.tmp_path(_folder(unit.jobs[result.job].plan) / result.shard, attempt).unlink(missing_ok=True)
        raise
    return done


def _folder(plan: Plan) -> Path:
    return Path(plan.output or "")


def _copies(adapter_files: Mapping[str, bytes], scratch: Path) -> dict[str, str]:
    """The adapter files the driver sent, written to ``scratch`` (each in a folder of its own:
    several jobs' adapters may have the same file name), by the path the plan names them by."""
    copies = {}
    for number, (name, data) in enumerate(sorted(adapter_files.items())):
        copy = scratch / str(number) / Path(name).name
        copy.parent.mkdir()
        copy.write_bytes(data)
        copies[name] = str(copy)
    return copies


def _localized(plan: Plan, copies: Mapping[str, str]) -> Plan:
    """``plan`` reading the adapter files the driver sent from their copies on this node."""
    adapters: list[AdapterSummary] = []
    for adapter in plan.adapters:
        if adapter.weights_file in copies:
            adapter = dataclasses.replace(adapter, weights_file=copies[adapter.weights_file])
        elif not Path(adapter.weights_file).is_file():
            raise ClusterError(
                "adapter file not found on this node",
                file=adapter.weights_file,
                hint="put large adapters where every node reads them at the same path (a shared filesystem)",
            )
        adapters.append(adapter)
    return dataclasses.replace(plan, adapters=tuple(adapters))


def _companions(plan: Plan, shards: list[ShardPlan], source: str) -> dict[str, str]:
    """Other base files the unit reads (quantized weights' scales and zero points stored in
    another shard), where this node has them: for a Hub base, downloaded into its own cache."""
    others = {path for shard in shards for path in base_files(shard)} - {source}
    if plan.base_repo is None or hub.offline():
        return {}
    commit = str(plan.base_commit)
    return {path: str(hub.download(plan.base_repo, commit, Path(path).name)) for path in sorted(others)}


def base_files(shard: ShardPlan) -> set[str]:
    """Every base file ``shard`` reads: its source, and its quantized weights' scale files."""
    files = {shard.source}
    for tensor in shard.tensors:
        if tensor.quant is not None:
            files.update(companion.source for companion in tensor.quant.companions)
            for member in tensor.quant.shares:
                files.update(member.files)
    return files


def relocated(shard: ShardPlan, files: Mapping[str, str]) -> ShardPlan:
    """``shard`` with the base files it reads found at ``files[path]`` instead."""
    tensors = []
    for tensor in shard.tensors:
        read = tensor.quant
        if read is not None:

            def moved(stored: Stored) -> Stored:
                return dataclasses.replace(stored, source=files.get(stored.source, stored.source))

            companions = tuple(moved(companion) for companion in read.companions)
            shares = tuple(
                Member(moved(member.weight), tuple(moved(companion) for companion in member.companions))
                for member in read.shares
            )
            tensor = dataclasses.replace(tensor, quant=dataclasses.replace(read, companions=companions, shares=shares))
        tensors.append(tensor)
    return dataclasses.replace(shard, source=files.get(shard.source, shard.source), tensors=tuple(tensors))


def _write(outputs: list[Output], reader: SegmentReader) -> None:
    """Every output's copy of one shard: by itself for one job (untouched tensors copied by the
    kernel), else from one read of the base. Sets each output's record or error."""
    progress = tqdm(disable=True)
    stop = StopRequest()  # never entered: a task is stopped by Ray, not by signals of its own
    if len(outputs) == 1:
        output = outputs[0]
        try:
            output.record = write_shard(output.merger, output.shard, output.folder, progress, stop, output.attempt)
        except ShardmergeError as exc:
            output.error = exc
        except OSError as exc:
            if not _own(exc):
                raise
            output.error = exc
        return
    write_together(outputs, reader, progress, stop)


def _finish(job: int, output: Output, push: PushTarget | None, attempt: str) -> ShardDone:
    """The result of one job's shard; publishes it first when the job does."""
    name = output.shard.name
    if output.error is not None:
        if isinstance(output.error, OSError) and not _own(output.error):
            raise output.error  # Ray runs the unit again
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


def _own(exc: OSError) -> bool:
    """Whether ``exc`` is the job's own failure, which another try would repeat (no room or no
    right to write its output), not one worth another try (a read that failed, a lost mount)."""
    return exc.errno in _JOBS_OWN


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ShardmergeError):
        return exc.one_line()
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def cut(plan: Plan, shards: list[ShardPlan]) -> Plan:
    """``plan`` with only ``shards``: what a unit carries of it."""
    return dataclasses.replace(plan, shards=tuple(shards))
