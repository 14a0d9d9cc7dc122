"""The job: what to merge, into what, how. One model for the CLI, YAML files and the Python API."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import JobConfigError

OutputDtype = Literal["bfloat16", "float16", "float32"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# A Hub repo id as the Hub accepts it: a namespace and a name, each of letters, digits, "-",
# "_" and "." not starting with a separator, without "--" or "..", the name at most 96 long.
_REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class AdapterSpec(BaseModel):
    """One adapter and the weight its delta is multiplied by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    weight: float = 1.0


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
    dtype: OutputDtype = "bfloat16"
    device: str = "auto"

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


def load_job_file(path: Path) -> MergeJob:
    """Load a YAML job. Relative paths in it are taken relative to the file's folder."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise JobConfigError(f"cannot read: {exc.strerror}", file=path) from exc
    except yaml.YAMLError as exc:
        raise JobConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", file=path) from exc
    job = build_job(str(path), data)
    if job.output is None:
        raise JobConfigError("missing key 'output'", file=path, hint="name the folder to write the merged model to")
    folder = path.parent

    def anchor(value: str) -> str:
        candidate = Path(value).expanduser()
        return os.path.normpath(candidate if candidate.is_absolute() else folder / candidate)

    return job.model_copy(
        update={
            "base": anchor(job.base),
            "output": anchor(job.output),  # type: ignore[arg-type]
            "adapters": [spec.model_copy(update={"path": anchor(spec.path)}) for spec in job.adapters],
        }
    )


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
