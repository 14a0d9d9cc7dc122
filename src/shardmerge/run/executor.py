"""Carry out Plans: shard by shard, nothing re-decided.

A pass takes one job, or several on the same base, through the base's shards in order. For
each shard: wait for room (disk-bounded publishing), fetch it (a Hub base), write every job's
copy (``merger.py`` for one job, ``shared.py`` for several, from one read), then fsync,
rename, record it in the job's journal and hand it to the job's uploader. Shards a journal
already holds are checked and skipped, so the same job run again resumes. A job that fails
is dropped from the pass with its error; the others go on.
"""

from __future__ import annotations

from contextlib import ExitStack

from tqdm import tqdm

from ..errors import DeviceError, ShardmergeError
from ..output.publish import PushTarget
from ..planning.model import Plan
from .device import Device, resolve_device
from .factors import open_adapters
from .fetch import Fetcher, fetcher_for
from .jobs import Job, MergeReport, claim, close, io_error, progress_bar, record_shard, report, step
from .merger import TensorMerger, lean_process
from .shard_writer import write_shard
from .shared import Output, SegmentReader, write_together
from .stop import StopRequest


def execute(
    plan: Plan,
    *,
    quiet: bool = False,
    restart: bool = False,
    verify_resume: bool = False,
    push: PushTarget | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    ray_start_timeout: float | None = None,
) -> MergeReport:
    """Write the merged model described by ``plan`` into ``plan.output``, resuming an earlier
    run of the same job there. ``verify_resume`` re-hashes the shards it would skip. With
    ``push``, each shard is uploaded as soon as it is in place, and committed at the end.
    ``executor="ray"`` writes the shards on the Ray cluster at ``ray_address``."""
    (result,) = run_pass(
        [Job(plan, push)],
        quiet=quiet,
        restart=restart,
        verify_resume=verify_resume,
        executor=executor,
        ray_address=ray_address,
        ray_start_timeout=ray_start_timeout,
    )
    if isinstance(result, BaseException):
        raise result
    return result


def run_pass(
    jobs: list[Job],
    *,
    quiet: bool = False,
    restart: bool = False,
    verify_resume: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    ray_start_timeout: float | None = None,
) -> list[MergeReport | BaseException]:
    """Merge several jobs on one base in one pass over it: each base shard is read once and
    written to every job that still needs it. The jobs' plans must lay the shards out alike
    (same base, dtype and device). A job that fails is dropped, with its error in the
    result, and the others go on. A Hub base's shards are downloaded as the pass reaches them.
    ``executor="ray"``: the same pass, its shards written by tasks on a Ray cluster."""
    if executor == "ray":
        from .cluster import run_on_cluster

        return run_on_cluster(
            jobs, ray_address, ray_start_timeout, quiet=quiet, restart=restart, verify_resume=verify_resume
        )
    try:
        device = resolve_device(jobs[0].plan.device)
    except DeviceError as exc:
        return [exc for _ in jobs]
    try:
        with ExitStack() as stack:
            stack.enter_context(lean_process(device))
            for job in jobs:
                stack.callback(job.stack.close)
                step(job, lambda job=job: _open(job, device, restart, verify_resume, quiet))
            live = [job for job in jobs if job.error is None]
            progress = stack.enter_context(progress_bar(live, quiet or not live))
            stop = stack.enter_context(StopRequest())
            reader = SegmentReader(device.pinned)
            drop = all(job.push is not None and job.push.delete_after_upload for job in live)
            fetcher = fetcher_for(live[0].plan, drop) if live else Fetcher()
            stack.callback(fetcher.close)
            shards = jobs[0].plan.shards
            for index, base_shard in enumerate(shards):
                wanting = [job for job in jobs if job.error is None and base_shard.name in job.todo]
                if not wanting:
                    continue
                for job in wanting:
                    if job.publisher is not None:
                        step(job, lambda job=job: job.publisher.wait_for_room(stop.check))  # type: ignore[union-attr]
                fetcher.fetch(base_shard)
                _write([job for job in wanting if job.error is None], index, reader, progress, stop)
                fetcher.done(base_shard)
            for job in jobs:
                if job.error is None:
                    step(job, lambda job=job: close(job, stop.check))
    except (OSError, ShardmergeError) as exc:  # reading or fetching the base: every job stops
        for job in jobs:
            if job.error is None:
                job.error = io_error(exc, job) if isinstance(exc, OSError) else exc
    memory = (device.locked_peak(), device.device_peak())
    return [job.error if job.error is not None else report(job, str(device), *memory) for job in jobs]


def _open(job: Job, device: Device, restart: bool, verify_resume: bool, quiet: bool) -> None:
    claim(job, str(device), restart, verify_resume, quiet)
    plan = job.plan
    job.merger = TensorMerger(device, plan, open_adapters(plan, job.stack), sha256=job.push is not None)
    job.stack.callback(job.merger.close)
    job.merger.reserve(tuple(shard for shard in plan.shards if shard.name in job.todo))


def _write(jobs: list[Job], index: int, reader: SegmentReader, progress: tqdm, stop: StopRequest) -> None:
    """Shard ``index`` of every job in ``jobs``: by itself for one job (untouched tensors copied
    by the kernel), else from one read of the base."""
    if len(jobs) == 1:
        job = jobs[0]
        shard = job.plan.shards[index]
        merger = job.merger
        assert merger is not None
        step(job, lambda: record_shard(job, shard, write_shard(merger, shard, job.folder, progress, stop)))
        return
    outputs = [Output(job.merger, job.plan.shards[index], job.folder) for job in jobs]  # type: ignore[arg-type]
    write_together(outputs, reader, progress, stop)
    for job, output in zip(jobs, outputs, strict=True):
        if output.error is not None:
            job.error = io_error(output.error, job) if isinstance(output.error, OSError) else output.error
        elif output.record is not None:
            step(job, lambda job=job, output=output: record_shard(job, output.shard, output.record))  # type: ignore[arg-type]
