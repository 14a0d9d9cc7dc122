"""One exception tree. Every error carries the file and tensor at fault and a next step.

The CLI turns these into a one-line message and an exit code; nothing else prints them.
At the end, how a failed call to the Hub reads (a status, a dropped connection), which Hub
inputs and publishing both need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class ShardmergeError(Exception):
    """Base of every error shardmerge raises on purpose.

    ``file`` and ``tensor`` locate the fault, ``hint`` says what to do about it.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = [part for part in (self.file, self.tensor) if part]
        text = ": ".join([*where, self.message])
        if self.hint:
            text += f" ({self.hint})"
        return text


class JobConfigError(ShardmergeError):
    """A job (YAML file, CLI flags or API arguments) is invalid."""

    exit_code = 2


class InputError(ShardmergeError):
    """A base model or adapter cannot be found or read."""


class SafetensorsFormatError(InputError):
    """A safetensors file is corrupt, truncated or not safetensors at all."""


class AdapterError(InputError):
    """An adapter is malformed, or of a kind shardmerge cannot merge exactly."""


class ProblemsError(ShardmergeError):
    """Several problems found together; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[ShardmergeError], message: str, hint: str) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"{message}: {count} problem{'s' if count != 1 else ''} found", hint=hint)


class PlanError(ProblemsError):
    """The inputs do not fit together. Carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[ShardmergeError]) -> None:
        super().__init__(
            problems,
            "refusing to merge, nothing was written",
            "fix the adapters or the base listed below, or check that they belong together",
        )


class VerificationProblem(ShardmergeError):
    """One thing wrong with a finished merge."""


class VerifyError(ProblemsError):
    """A finished merge does not match its journal or its inputs."""

    def __init__(self, problems: Sequence[ShardmergeError]) -> None:
        super().__init__(problems, "verification failed", "see each problem below")


class NonFiniteError(ShardmergeError):
    """A merged or converted tensor would hold NaN or Inf that the base did not."""


class NoChangeError(ShardmergeError):
    """With ``strict``: the adapters changed no tensor, and the output is the base."""


class OutputError(ShardmergeError):
    """The output location cannot be used or written."""


class DeviceError(ShardmergeError):
    """The requested compute device is not available, cannot be used, or ran out of memory."""


class HubError(ShardmergeError):
    """The Hub refused or failed a publishing step: the token, the repo name, or the network."""


class ClusterError(ShardmergeError):
    """The cluster cannot be used, or a task failed for good: names the shard and the node."""


_CONNECTION_LIBRARIES = ("httpx", "httpx2", "requests", "urllib3", "h11", "httpcore")


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the Hub's answer somewhere in ``exc``'s chain, if there was one."""
    from huggingface_hub.errors import HfHubHTTPError

    for cause in _causes(exc):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            return int(cause.response.status_code)
    return None


def dropped(exc: BaseException) -> bool:
    """A connection that failed, was refused, timed out or closed without an answer."""
    for cause in _causes(exc):
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return True
        if type(cause).__module__.split(".")[0] in _CONNECTION_LIBRARIES:
            return True
    return False
