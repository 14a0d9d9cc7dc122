"""The job: what to merge, into what, how. One model for the CLI, YAML files and the Python API."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import JobConfigError

# auto: every tensor keeps its dtype and quantized weights their format, except a format that
# cannot be written back (bitsandbytes), whose weights are written in bfloat16; base: every
# tensor keeps its dtype (and quantized weights their format, or the plan is refused); the
# others: every floating-point tensor in that dtype, quantized weights dequantized.
OutputDtype = Literal["auto", "base", "bfloat16", "float16", "float32"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:(0|[1-9]\d*))?)$")
# Sizes as transformers' save_pretrained reads them: 5GB = 5 * 10^9 bytes, 2GiB = 2 * 2^30,
# 5Gb = 5 * 10^9 bits.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any) -> int:
    """Bytes in ``value``: an int, or a size such as ``5GB``, ``500MB`` or ``2GiB``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a size such as 5GB, 500MB or 2GiB")
        unit = match[2] or "B"
        size = int(Fraction(match[1]) * _UNITS[unit.upper()])
        if unit.endswith("b") and not unit.upper().endswith("IB"):
            size //= 8  # 5Gb: bits, as transformers reads it
    if size <= 0:
        raise ValueError("must be a positive size")
    return size


# A Hub repo id as the Hub accepts it: a namespace and a name, each of letters, digits, "-",
# "_" and "." not starting with a separator, without "--" or "..", the name at most 96 long.
_REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


# How several adapters' updates of a tensor are combined: ``linear`` applies them in turn,
# each multiplied by its weight (mergekit's task_arithmetic); the others are mergekit's
# methods of the same names on the task vectors (see planning.model.Combine).
CombineMethod = Literal["linear", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]


def _a_number(value: Any) -> Any:
    """A number as given, refusing true and false; one written as text (YAML reads 1e-1 as
    text) read as a number."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class AdapterSpec(BaseModel):
    """One adapter, the weight its delta is multiplied by, and (for a ``combine`` method that
    prunes) the fraction of its update kept, where it differs from the job's ``density``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    weight: float = Field(1.0, allow_inf_nan=False)  # a finite number
    density: float | None = Field(None, gt=0, le=1)

    @field_validator("weight", "density", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return _a_number(value)


class PushOptions(BaseModel):
    """Where and how to publish a merge on the Hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    delete_after_upload: bool = False

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (not _REPO_ID.match(value) or value.endswith(".git")):
            raise ValueError(f"{value!r} is not a Hub repo name: use ORG/NAME, e.g. my-org/llama-3-8b-merged")
        return value

    @model_validator(mode="after")
    def _publishing(self) -> PushOptions:
        if self.push_to_hub is None:
            extra = [key for key in ("revision", "commit_message") if getattr(self, key) is not None]
            extra += [key for key in ("private", "delete_after_upload") if getattr(self, key)]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply with push_to_hub")
        return self


class MergeJob(PushOptions):
    """A merge of one or more adapters into one base model, and optionally its publication."""

    base: str
    adapters: list[AdapterSpec] = Field(min_length=1)
    output: str | None = None
    dtype: OutputDtype = "auto"
    device: str = "auto"
    # Modules stored as GPT-2's Conv1D ([in, out]); every other one is nn.Linear. None: decided
    # by the base's architecture. Only needed where that is unknown (e.g. custom modelling code).
    conv1d_modules: list[str] | None = None
    # A merge whose adapters change no tensor at all (e.g. every lora_B zero) fails instead of
    # finishing with a warning.
    strict: bool = False
    # Output shards of at most this many bytes of tensor data, split from the base's as
    # save_pretrained splits and names them; None mirrors the base's shards.
    max_shard_size: int | None = None
    # Where the shards are written: by this process, or by tasks on a Ray cluster; and the
    # cluster's address (None: Ray's own discovery, e.g. RAY_ADDRESS). Neither changes a byte.
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    # Seconds to wait for the cluster to start a first task before failing (None: 60).
    ray_start_timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    # How the adapters' updates are combined, and the method's parameters: the fraction of each
    # update kept (1: all), DARE's seed, breadcrumbs' fraction of largest magnitudes dropped,
    # the sign election of the *_ties methods, and whether the sum is divided by the weights
    # (None: the method's own default, as in mergekit).
    combine: CombineMethod = "linear"
    density: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    gamma: float | None = Field(None, ge=0, lt=1)
    sign_election: Literal["sum", "count"] | None = None
    normalize: bool | None = None

    @field_validator("density", "gamma", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return _a_number(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _integer(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value

    @model_validator(mode="after")
    def _combining(self) -> MergeJob:
        method = self.combine
        given = {
            "density": self.density is not None or any(spec.density is not None for spec in self.adapters),
            "seed": self.seed is not None,
            "gamma": self.gamma is not None,
            "sign_election": self.sign_election is not None,
        }
        uses = {
            "density": method != "linear",
            "seed": method.startswith("dare"),
            "gamma": method.startswith("breadcrumbs"),
            "sign_election": method.endswith("ties"),
        }
        for key, value in given.items():
            if value and not uses[key]:
                raise ValueError(f"{key} does not apply to combine: {method}")
        return self

    @model_validator(mode="after")
    def _cluster(self) -> MergeJob:
        for key in ("ray_address", "ray_start_timeout"):
            if getattr(self, key) is not None and self.executor != "ray":
                raise ValueError(f"{key} only applies with executor: ray")
        return self

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else parse_size(value)

    @field_validator("adapters", mode="before")
    @classmethod
    def _plain_paths(cls, value: Any) -> Any:
        # A bare path is an adapter of weight 1; it reads better in short YAML files.
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, (str, Path)) else item for item in value]
        return value

    @field_validator("base", "output", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


def build_job(source: str, data: Any) -> MergeJob:
    """Validate ``data`` into a job; ``source`` names where it came from in error messages."""
    return _validate(MergeJob, source, data)


def build_named(source: str, data: Any) -> NamedJob:
    return _validate(NamedJob, source, data)


def build_push(source: str, data: Any) -> PushOptions:
    return _validate(PushOptions, source, data)


Model = TypeVar("Model", bound=BaseModel)


def _validate(model: type[Model], source: str, data: Any) -> Model:
    if not isinstance(data, dict):
        raise JobConfigError("a job must be a mapping of keys to values", file=source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A misspelled key also makes the real key "missing": name the misspelling first.
        first = min(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise JobConfigError(_describe(first), file=source, hint=_fix_for(first)) from exc


class NamedJob(MergeJob):
    """One job of a batch file."""

    name: str = Field(min_length=1, pattern=r"^[\w.-]+$")


@dataclass(frozen=True)
class JobFile:
    """A YAML file's jobs: one for a single-job file (``batch`` false), else the batch's."""

    path: Path
    jobs: tuple[NamedJob, ...]
    batch: bool


# Values of ``defaults:`` that name each job's own place: "{name}" is replaced by its name.
_PER_JOB_KEYS = ("output", "push_to_hub")


def load_job_file(path: Path) -> JobFile:
    """Load a YAML job or batch. Relative paths in it are taken relative to the file's folder;
    a path that does not exist there and reads as ``org/name`` is a Hub repo id."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise JobConfigError(f"cannot read: {exc.strerror}", file=path) from exc
    except yaml.YAMLError as exc:
        raise JobConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", file=path) from exc
    if isinstance(data, dict) and "jobs" in data:
        return JobFile(path, _load_batch(path, data), batch=True)
    job = build_job(str(path), data)
    if job.output is None:
        raise JobConfigError("missing key 'output'", file=path, hint="name the folder to write the merged model to")
    named = NamedJob.model_validate({**job.model_dump(), "name": re.sub(r"[^\w.-]", "_", path.stem) or "job"})
    return JobFile(path, (_anchored(named, path.parent),), batch=False)


def _load_batch(path: Path, data: dict[str, Any]) -> tuple[NamedJob, ...]:
    unknown = sorted(set(data) - {"defaults", "jobs"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["defaults", "jobs"], n=1)
        hint = f"did you mean {close[0]!r}?" if close else "a batch file has only 'defaults' and 'jobs'"
        raise JobConfigError(f"unknown key {unknown[0]!r}", file=path, hint=hint)
    defaults = data.get("defaults") or {}
    entries = data.get("jobs")
    if not isinstance(defaults, dict):
        raise JobConfigError("'defaults' must be a mapping of job keys", file=path)
    if not isinstance(entries, list) or not entries:
        raise JobConfigError("'jobs' must be a non-empty list of jobs", file=path)
    if "name" in defaults:
        raise JobConfigError("'name' cannot be a default: each job names itself", file=path)
    jobs: list[NamedJob] = []
    for index, entry in enumerate(entries):
        where = f"{path}: jobs[{index}]"
        if not isinstance(entry, dict):
            raise JobConfigError("a job must be a mapping of keys to values", file=where)
        name = entry.get("name")
        if isinstance(name, str):
            where += f" ({name})"
        merged = {**defaults, **entry}
        for key in _PER_JOB_KEYS:
            if key not in entry and isinstance(defaults.get(key), str) and isinstance(name, str):
                merged[key] = defaults[key].replace("{name}", name)
        job = _validate(NamedJob, where, merged)
        if job.output is None:
            raise JobConfigError("missing key 'output'", file=where, hint="set output here or in defaults")
        jobs.append(_anchored(job, path.parent))
    _check_unique(path, jobs)
    return tuple(jobs)


def _check_unique(path: Path, jobs: list[NamedJob]) -> None:
    for key in ("name", "output"):
        seen: dict[str, int] = {}
        for index, job in enumerate(jobs):
            value = str(getattr(job, key))
            if value in seen:
                raise JobConfigError(
                    f"jobs[{seen[value]}] and jobs[{index}] have the same {key} {value!r}",
                    file=path,
                    hint=f"give each job its own {key}"
                    + (" (defaults can use {name}, e.g. output: merged/{name})" if key == "output" else ""),
                )
            seen[value] = index


def _anchored(job: NamedJob, folder: Path) -> NamedJob:
    def anchor(value: str, source: bool) -> str:
        candidate = Path(value).expanduser()
        if candidate.is_absolute():
            return os.path.normpath(candidate)
        local = folder / candidate
        if source and not local.exists() and is_hub_id(value):
            return value
        return os.path.normpath(local)

    return job.model_copy(
        update={
            "base": anchor(job.base, True),
            "output": anchor(str(job.output), False),
            "adapters": [spec.model_copy(update={"path": anchor(spec.path, True)}) for spec in job.adapters],
        }
    )


def is_hub_id(value: str) -> bool:
    """Whether ``value`` reads as a Hub repo id, ``org/name`` or ``org/name@revision``."""
    repo, at, revision = value.partition("@")
    return bool(_REPO_ID.match(repo)) and (not at or bool(revision))


def _location(error: Any) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def _describe(error: Any) -> str:
    loc = _location(error)
    if error["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    if error["type"] == "missing":
        return f"missing key {loc!r}"
    return f"{loc}: {error['msg']}"


def _fix_for(error: Any) -> str | None:
    if error["type"] != "extra_forbidden":
        return None
    key = str(error["loc"][-1])
    known = list(AdapterSpec.model_fields) if len(error["loc"]) > 1 else list(MergeJob.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known keys: {', '.join(known)}"
