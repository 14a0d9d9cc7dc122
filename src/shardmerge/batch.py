"""Batch runs: many jobs from one YAML file, jobs on the same base merged in one pass over it.

Every job is planned first; a job that fails planning is reported and the others go on. Jobs
whose plans lay the base out alike (same base files, dtype and device: the same shards, the
same tensors at the same offsets) form one group, merged by one pass that reads each base
tensor once. Each job keeps its own output folder and journal, so running the batch again
skips finished jobs and resumes interrupted ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from .config import JobFile, NamedJob
from .errors import JobConfigError, ShardmergeError
from .output.publish import PushTarget
from .planning.model import Plan
from .planning.planner import build_plan


@dataclass(frozen=True)
class JobResult:
    name: str
    status: str  # "done", "up to date", "failed" or "planned" (--dry-run)
    seconds: float
    output: str
    url: str | None
    error: str | None
    plan: Plan | None = None


def select(job_file: JobFile, only: Sequence[str]) -> list[NamedJob]:
    names = [job.name for job in job_file.jobs]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise JobConfigError(
            f"--only names no job called {unknown[0]!r}", file=job_file.path, hint=f"jobs: {', '.join(names)}"
        )
    return [job for job in job_file.jobs if not only or job.name in only]


def run_jobs(
    jobs: list[NamedJob],
    *,
    dry_run: bool = False,
    quiet: bool = False,
    restart: bool = False,
    verify_resume: bool = False,
) -> list[JobResult]:
    """Plan every job, then merge the groups that share a base. Never raises for one job's
    fault: each result says how its job ended."""
    results: dict[str, JobResult] = {}
    plans: dict[str, Plan] = {}
    for job in jobs:
        started = time.monotonic()
        try:
            plans[job.name] = build_plan(job)
        except ShardmergeError as exc:
            results[job.name] = _failed(job, exc, time.monotonic() - started)
    if dry_run:
        for name, plan in plans.items():
            results[name] = JobResult(name, "planned", 0.0, plan.output or "", None, None, plan)
        return [results[job.name] for job in jobs]
    groups: dict[tuple[object, ...], list[NamedJob]] = {}
    for job in jobs:
        if job.name in plans:
            where = (job.executor, job.ray_address, job.ray_start_timeout)
            groups.setdefault((*where, *_layout(plans[job.name])), []).append(job)
    overall = tqdm(total=len(jobs), desc="jobs", unit="job", disable=quiet or len(jobs) < 2, initial=len(results))
    with overall:
        for group in groups.values():
            outcomes = _run_group(group, plans, quiet, restart, verify_resume)
            for job, outcome in zip(group, outcomes, strict=True):
                results[job.name] = outcome
                overall.update(1)
    return [results[job.name] for job in jobs]


def _run_group(
    group: list[NamedJob], plans: dict[str, Plan], quiet: bool, restart: bool, verify_resume: bool
) -> list[JobResult]:
    from .run.executor import run_pass
    from .run.jobs import Job, MergeReport

    started = time.monotonic()
    jobs = [Job(plans[job.name], PushTarget.of(job)) for job in group]
    first = group[0]
    outcomes = run_pass(
        jobs,
        quiet=quiet,
        restart=restart,
        verify_resume=verify_resume,
        executor=first.executor,
        ray_address=first.ray_address,
        ray_start_timeout=first.ray_start_timeout,
    )
    results = []
    for job, outcome in zip(group, outcomes, strict=True):
        if isinstance(outcome, MergeReport):
            status = "done" if outcome.bytes_written or outcome.shards == 0 else "up to date"
            results.append(JobResult(job.name, status, outcome.seconds, outcome.output, outcome.url, None))
        else:
            results.append(_failed(job, outcome, time.monotonic() - started))
    return results


def _failed(job: NamedJob, exc: BaseException, seconds: float) -> JobResult:
    if isinstance(exc, ShardmergeError):
        message = exc.one_line()
        problems = getattr(exc, "problems", None)
        if problems:
            message += ": " + "; ".join(problem.one_line() for problem in problems[:3])
    else:
        message = f"{type(exc).__name__}: {exc}"
    return JobResult(job.name, "failed", seconds, job.output or "", None, message)


def _layout(plan: Plan) -> tuple[object, ...]:
    """What must agree for jobs to share a pass: the device and every shard's source tensors."""
    shards = tuple(
        (shard.name, shard.source, tuple((t.name, t.src_begin, t.src_end, t.dtype) for t in shard.tensors))
        for shard in plan.shards
    )
    return (plan.device, plan.base, shards)
