"""shardmerge: fold LoRA adapters into a base model, one safetensors shard at a time.

``import shardmerge`` does not import torch; only ``merge()`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import AdapterSpec, MergeJob
from .errors import (
    AdapterError,
    DeviceError,
    InputError,
    JobConfigError,
    NoChangeError,
    NonFiniteError,
    OutputError,
    PlanError,
    SafetensorsFormatError,
    ShardmergeError,
    VerifyError,
)

if TYPE_CHECKING:
    from .planning.model import Plan
    from .run.jobs import MergeReport


__all__ = [
    "AdapterError",
    "AdapterSpec",
    "DeviceError",
    "InputError",
    "JobConfigError",
    "MergeJob",
    "NoChangeError",
    "NonFiniteError",
    "OutputError",
    "PlanError",
    "SafetensorsFormatError",
    "ShardmergeError",
    "VerifyError",
    "__version__",
    "merge",
    "plan",
]


def _job(job: MergeJob | None, fields: dict[str, Any]) -> MergeJob:
    from .config import build_job

    if job is not None and fields:
        raise TypeError("pass either a MergeJob or its fields as keyword arguments, not both")
    return job if job is not None else build_job("arguments", fields)


def plan(job: MergeJob | None = None, **fields: Any) -> Plan:
    """Check the inputs and return the Plan, reading headers only. Raises PlanError listing
    every problem. Takes a MergeJob, or its fields: ``plan(base=..., adapters=[...])``."""
    from .planning.planner import build_plan

    return build_plan(_job(job, fields))


def merge(job: MergeJob | None = None, *, quiet: bool = True, **fields: Any) -> MergeReport:
    """Merge and write the model: ``merge(base=..., adapters=[{"path": ..., "weight": 0.5}],
    output=...)``, and publish it with ``push_to_hub="org/name"``. ``quiet=False`` shows the
    progress bar on stderr."""
    from .output.publish import PushTarget
    from .planning.planner import build_plan
    from .run.executor import execute

    merge_job = _job(job, fields)
    return execute(
        build_plan(merge_job),
        quiet=quiet,
        push=PushTarget.of(merge_job),
        executor=merge_job.executor,
        ray_address=merge_job.ray_address,
        ray_start_timeout=merge_job.ray_start_timeout,
    )
