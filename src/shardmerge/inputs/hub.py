"""Hub repo ids as inputs: ``org/name`` or ``org/name@revision``, through huggingface_hub and
its cache.

The revision is pinned to a commit first, so every file comes from the same one. A base's
configs, tokenizer files and index are downloaded at once; its shards are not: their headers
are read with range requests (or from the cache, when a shard is already there), which is
all the planner needs, and ``run/fetch.py`` downloads each shard just before it is merged. An
adapter is small and downloaded whole. With ``HF_HUB_OFFLINE=1`` everything comes from the
cache, and a model that is not all there is an error naming what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InputError, dropped
from ..formats.safetensors import read_header

T = TypeVar("T")
_LOGIN = "for a private or gated repo, log in with `hf auth login` or set HF_TOKEN"
# huggingface_hub warns at every retry of a request; the error that ends them is what counts.
_RETRY_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.file_download")
_RETRY_WORDS = ("thrown while requesting", "Retrying in", "Rate limited", "Trying to resume download")


class _RetryWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(words in record.getMessage() for words in _RETRY_WORDS)


def quiet_retries() -> None:
    """Drop huggingface_hub's warning at each retry (a failing upload printed a dozen lines
    per shard): a call that fails for good is reported once, in one line, by the caller."""
    for name in _RETRY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _RetryWarnings) for existing in logger.filters):
            logger.addFilter(_RetryWarnings())


def split_ref(name: str) -> tuple[str, str | None]:
    repo, _, revision = name.partition("@")
    return repo, revision or None


def snapshot(name: str, patterns: list[str] | None) -> Path:
    """The local snapshot folder of ``name`` at its pinned commit, with ``patterns`` (all
    files when None) downloaded or found in the cache."""
    from huggingface_hub import snapshot_download

    repo, revision = split_ref(name)
    return Path(_hub(name, lambda: snapshot_download(repo, revision=revision, allow_patterns=patterns)))


def remote_files(name: str) -> tuple[str, dict[str, int]]:
    """The commit ``name`` points at, and the size of each file there."""
    from huggingface_hub import HfApi

    repo, revision = split_ref(name)
    info = _hub(name, lambda: HfApi().model_info(repo, revision=revision, files_metadata=True))
    return str(info.sha), {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or []}


def download(repo: str, commit: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_hub(f"{repo}@{commit}", lambda: hf_hub_download(repo, filename, revision=commit)))


def cached(repo: str, commit: str, filename: str) -> Path | None:
    """The cached copy of a file, if the cache holds it."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=commit)
    return Path(found) if isinstance(found, str) else None


def remote_header(repo: str, commit: str, filename: str, size: int, where: Path) -> Any:
    """A shard's safetensors header, read with two range requests."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    url = hf_hub_url(repo, filename, revision=commit)

    def fetch(offset: int, count: int) -> bytes:
        headers = {**build_hf_headers(), "Range": f"bytes={offset}-{offset + count - 1}"}

        def get() -> bytes:
            response = http_backoff("GET", url, headers=headers, follow_redirects=True)
            hf_raise_for_status(response)
            body = response.content
            return body if response.status_code == 206 else body[offset : offset + count]

        return _hub(f"{repo}@{commit}", get)

    return read_header(where, fetch=fetch, size=size)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub(name: str, action: Callable[[], T]) -> T:
    """``action``, with the Hub's errors turned into one line naming the repo."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return action()
    except RepositoryNotFoundError:
        raise InputError(
            "no local folder by this name, and no Hub repo either",
            file=name,
            hint=f"check the path or the repo id; {_LOGIN}",
        ) from None
    except RevisionNotFoundError:
        raise InputError("revision not found on the Hub", file=name, hint="check the branch, tag or commit") from None
    except LocalEntryNotFoundError:
        raise InputError(
            "not in the cache, and the Hub is not reachable or HF_HUB_OFFLINE is set",
            file=name,
            hint="download it once while online, or unset HF_HUB_OFFLINE",
        ) from None
    except EntryNotFoundError as exc:
        raise InputError(f"file not found in the repo ({exc})", file=name) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = _LOGIN if status in (401, 403) else "check the repo id and your connection, then run again"
        raise InputError(f"the Hub answered HTTP {status}", file=name, hint=hint) from None
    except Exception as exc:
        if not dropped(exc):
            raise
        raise InputError(
            "no local folder by this name, and the Hub cannot be reached",
            file=name,
            hint="check the path; for a Hub repo check the connection, or set HF_HUB_OFFLINE=1 to use the cache",
        ) from None
