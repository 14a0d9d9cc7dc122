"""Publishing to the Hub while merging: each shard pre-uploaded as soon as it is in place,
one commit at the end, and the journal to resume from.

The uploader is one background thread fed by a queue. It hands each shard to
``HfApi.preupload_lfs_files`` with the sha256 the writer computed, so no shard is read only to
be hashed (a shard merged without publishing is hashed once, by the uploader, and the sha256
kept in the journal), and the Hub's LFS batch answer skips any shard it already holds, so a
resumed run sends nothing twice. Merging waits on the uploader only in disk-bounded mode
(``delete_after_upload``), where a shard is deleted once uploaded and at most two shards, one
uploading and one being written, are on disk. The commit is checked against what the Hub
holds before it is made, so a commit that went through before a crash is not made again.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from tqdm import tqdm

from ..errors import HubError, OutputError, dropped, http_status
from ..formats.fileio import file_sha256
from ..formats.safetensors import INDEX_NAME
from . import lock, outdir
from .card import CARD_NAME, display
from .journal import STATE_DIR, Journal

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, HfApi

    from ..config import PushOptions

T = TypeVar("T")

# One layer of retries: huggingface_hub retries each request of an upload (the pre-upload
# call, the LFS batch call and the transfer) CLIENT_TRIES times, 1, 2, 4, 8 and 8 s apart, on
# 408, 429, 5xx and dropped connections; shardmerge retries the calls it does not (creating
# the repo and the branch, checking the branch, the commit) on the same errors, RETRY_ATTEMPTS
# times, 1, 2, 4 and 8 s apart.
CLIENT_TRIES = 6
RETRY_ATTEMPTS = 5
RETRY_FIRST_WAIT_S = 1.0
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_HASH_CHUNK = 8 * 2**20
_LOGIN = "log in with `hf auth login` or set HF_TOKEN to a token that can write to this repo"
_AGAIN = "run the same command again: what the Hub already holds is not sent again"


@dataclass(frozen=True)
class PushTarget:
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    delete_after_upload: bool = False

    @property
    def branch(self) -> str:
        return self.revision or "main"

    @classmethod
    def of(cls, options: PushOptions) -> PushTarget | None:
        """The target a job's options name, or None when the job does not publish."""
        if options.push_to_hub is None:
            return None
        return cls(
            options.push_to_hub,
            options.private,
            options.revision,
            options.commit_message,
            options.delete_after_upload,
        )


class Publisher:
    """Uploads the shards of one output folder to one repo and branch, then commits once."""

    def __init__(self, target: PushTarget, folder: Path, commit_message: str, *, quiet: bool = True) -> None:
        from huggingface_hub import HfApi

        self.target = target
        self.folder = folder
        self.message = target.commit_message or commit_message
        self.api = HfApi()
        self.quiet = quiet
        self.journal: Journal | None = None
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.room = threading.Condition()
        self.on_disk: set[str] = set()  # finished shards not yet deleted (disk-bounded mode)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shardmerge-uploader", daemon=True)
        self.progress: tqdm | None = None
        self._bars_were_disabled = False

    @property
    def url(self) -> str:
        url = f"{self.api.endpoint}/{self.target.repo_id}"
        return url if self.target.branch == "main" else f"{url}/tree/{self.target.branch}"

    def open(self, journal: Journal) -> None:
        """Check the token and the repo before any work: create the repo (and branch) if
        missing. Then start the uploader."""
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self.journal = journal
        state = journal.set_target(self.target.repo_id, self.target.branch)
        assert state is not None
        self._call(
            "creating the repo",
            lambda: self.api.create_repo(self.target.repo_id, private=self.target.private, exist_ok=True),
        )
        if self.target.branch != "main":
            self._call(
                f"creating branch {self.target.branch!r}",
                lambda: self.api.create_branch(self.target.repo_id, branch=self.target.branch, exist_ok=True),
            )
        for name in state.deleted:  # deleted in the journal, killed before the file went
            (self.folder / name).unlink(missing_ok=True)
        self._bars_were_disabled = are_progress_bars_disabled()
        disable_progress_bars()  # one bar of ours instead of one per file, between the merge's
        self.progress = tqdm(
            total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="uploading", disable=self.quiet
        )
        self.thread.start()

    def submit(self, shard: str) -> None:
        """Upload ``shard``, finished and recorded in the journal, in the background. Raises
        the uploader's error, if it failed: the merge stops at the next shard, not at its end."""
        self._raise_error()
        record = self._journal().shards[shard]
        if record.sha256 is not None and self._held(shard, record.sha256):
            return
        if self.target.delete_after_upload:
            with self.room:
                self.on_disk.add(shard)
        if self.progress is not None:
            self.progress.total += record.size
            self.progress.refresh()
        self.queue.put(shard)

    def wait_for_room(self, check: Callable[[], None]) -> None:
        """In disk-bounded mode, before a shard is written: wait until at most one finished
        shard is still on disk. ``check`` is called while waiting (to act on Ctrl-C)."""
        if not self.target.delete_after_upload:
            return
        with self.room:
            while len(self.on_disk) > 1 and self.error is None:
                self.room.wait(0.2)
                check()
        self._raise_error()

    def finish(self, check: Callable[[], None]) -> str:
        """Wait for the uploads, then commit every file of the output in one commit (unless
        the Hub already holds exactly these files). Returns the commit id."""
        self.queue.put(None)
        while self.thread.is_alive():
            self.thread.join(0.2)
            check()
        self._raise_error()
        journal = self._journal()
        files = self._files()
        head = self._call("checking the repo", lambda: self._published(files))
        if head is None:
            operations = self._operations(files)
            # The other files sent first, as the shards were (huggingface_hub retries that), so
            # that the commit sends nothing but the commit: retried here alone.
            self._call(
                "uploading the other files",
                lambda: self.api.preupload_lfs_files(
                    self.target.repo_id, additions=operations, revision=self.target.branch
                ),
                retried=True,
            )
            commit = self._call(
                "committing",
                lambda: self.api.create_commit(
                    self.target.repo_id,
                    operations=operations,
                    commit_message=self.message,
                    revision=self.target.branch,
                ),
                already_done=lambda: self._published(files),
            )
            head = str(getattr(commit, "oid", commit))  # a CommitInfo, or the head found by the check
        journal.mark_committed(head)
        return head

    def close(self) -> None:
        """Stop the uploader (an upload in flight is abandoned: the next run resumes it)."""
        from huggingface_hub.utils import enable_progress_bars

        self.queue.put(None)
        if self.progress is not None:
            self.progress.close()
            if not self._bars_were_disabled:
                enable_progress_bars()

    # The uploader thread.

    def _run(self) -> None:
        while (shard := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._upload(shard)
            except BaseException as exc:
                self.error = exc
            finally:
                with self.room:
                    self.room.notify_all()

    def _upload(self, shard: str) -> None:
        journal = self._journal()
        record = journal.shards[shard]
        path = self.folder / shard
        sha256 = record.sha256
        if sha256 is None:  # merged without publishing: hashed now, once, and recorded
            sha256 = file_sha256(path)
            journal.add_sha256(shard, sha256)
        if not self._held(shard, sha256) and preupload(self.api, self.target, shard, path, record.size, sha256):
            delete = self.target.delete_after_upload
            journal.mark_uploaded(shard, sha256, deleted=delete)
            if delete:
                path.unlink(missing_ok=True)
        with self.room:
            self.on_disk.discard(shard)  # a shard the Hub takes as a regular file stays until the commit
        if self.progress is not None:
            self.progress.update(record.size)

    # The commit.

    def _files(self) -> dict[str, tuple[int, str, bool]]:
        """Every file of the output, and nothing else that may lie in its folder: its shards,
        the index, config.json, the model card and the base's other files, by name -> (size,
        sha256, is a shard); each read without following a link."""
        journal = self._journal()
        files = {}
        for name, record in journal.shards.items():
            assert record.sha256 is not None, "every shard went through the uploader"
            files[name] = (record.size, record.sha256, True)
        ours = {INDEX_NAME, CARD_NAME, "config.json", *journal.inputs.get("base_files", {})}
        for name in sorted(ours - set(files)):
            with suppress(FileNotFoundError), outdir.reader(self.folder / name) as handle:
                files[name] = (*_size_and_sha256(handle), False)
        for name, (_, _, shard) in files.items():
            if shard and not journal.deleted(name) and not (self.folder / name).is_file():
                raise OutputError("shard is missing", file=self.folder / name, hint="run the merge again to redo it")
        return files

    def _operations(self, files: dict[str, tuple[int, str, bool]]) -> list[CommitOperationAdd]:
        from huggingface_hub import CommitOperationAdd

        journal = self._journal()
        state = journal.push
        assert state is not None
        operations = []
        for name, (size, sha256, shard) in files.items():
            if shard and state.uploaded.get(name) == sha256:
                operations.append(_already_uploaded(name, size, sha256))
            elif shard:
                operations.append(_addition(name, self.folder / name, size, sha256))
            else:  # what the commit reads: the file itself, never a link
                operations.append(
                    CommitOperationAdd(path_in_repo=name, path_or_fileobj=outdir.reader(self.folder / name))
                )
        return operations

    def _published(self, files: dict[str, tuple[int, str, bool]]) -> str | None:
        """The head commit, if the branch already holds exactly these files; else None."""
        infos = self.api.get_paths_info(self.target.repo_id, list(files), revision=self.target.branch)
        found = {info.path: info for info in infos}
        for name, (size, sha256, _) in files.items():
            info = found.get(name)
            if info is None or getattr(info, "size", None) != size:
                return None
            if info.lfs is not None:
                if info.lfs.sha256 != sha256:
                    return None
            elif info.blob_id != _git_blob_id(outdir.read_own(self.folder / name)):
                return None
        return self.api.repo_info(self.target.repo_id, revision=self.target.branch).sha

    # Errors and retries.

    def _call(
        self,
        what: str,
        action: Callable[[], T],
        already_done: Callable[[], Any] | None = None,
        *,
        retried: bool = False,
    ) -> T:
        return hub_call(what, self.target.repo_id, action, already_done, retried=retried)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _held(self, shard: str, sha256: str) -> bool:
        """Whether the Hub holds ``shard`` with these bytes already (then, in disk-bounded
        mode, the local copy goes)."""
        journal = self._journal()
        state = journal.push
        assert state is not None
        if state.uploaded.get(shard) != sha256:
            return False
        if self.target.delete_after_upload and shard not in state.deleted:
            journal.mark_uploaded(shard, sha256, deleted=True)
            (self.folder / shard).unlink(missing_ok=True)
        return True

    def _journal(self) -> Journal:
        assert self.journal is not None, "open() first"
        return self.journal


def hub_call(
    what: str,
    repo_id: str,
    action: Callable[[], T],
    already_done: Callable[[], Any] | None = None,
    *,
    retried: bool = False,
) -> T:
    """``action`` on ``repo_id``, retried with backoff on 408, 429, 5xx and dropped connections,
    unless huggingface_hub retries it already (``retried``: one layer of retries, never one
    inside another). Before a retry, ``already_done`` may say the step went through although
    its answer was lost."""
    from huggingface_hub.errors import HFValidationError

    wait = RETRY_FIRST_WAIT_S
    attempts = 1 if retried else RETRY_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except HFValidationError as exc:
            raise HubError(f"invalid repo name: {exc}", file=repo_id, hint="use ORG/NAME") from None
        except Exception as exc:
            status = http_status(exc)
            if status is not None and status not in _TRANSIENT_STATUS:
                raise _refusal(status, what, repo_id, exc) from exc
            if status is None and not dropped(exc):
                raise HubError(f"{what} failed: {_short(exc)}", file=repo_id, hint=_AGAIN) from exc
            if attempt == attempts:
                tries = f"{CLIENT_TRIES} times (huggingface_hub's retries)" if retried else f"{attempt} times"
                raise HubError(f"{what} failed {tries}, last with {_short(exc)}", file=repo_id, hint=_AGAIN) from exc
        time.sleep(wait)
        wait *= 2
        if already_done is not None and (done := already_done()) is not None:
            return done
    raise AssertionError("unreachable")


def preupload(api: HfApi, target: PushTarget, name: str, path: Path, size: int, sha256: str) -> bool:
    """Send the shard at ``path`` to ``target``'s LFS storage as ``name`` (with the size and
    sha256 known from writing it), for a later commit; False when the Hub takes it as a
    regular file instead, to be sent with the commit."""
    addition = _addition(name, path, size, sha256)
    hub_call(
        f"uploading {name}",
        target.repo_id,
        lambda: api.preupload_lfs_files(target.repo_id, additions=[addition], revision=target.branch),
        retried=True,
    )
    return bool(getattr(addition, "_is_uploaded", False))


def commit_message(base: str, adapters: int) -> str:
    """The default commit title: what was merged into what."""
    return f"Merge {adapters} adapter{'s' if adapters != 1 else ''} into {display(base)} with shardmerge"


def _addition(name: str, path: Path, size: int, sha256: str) -> CommitOperationAdd:
    """A shard to upload, with the size and sha256 known from writing it: never re-read to hash."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    # By path: huggingface_hub reads it only to send it, and the Hub refuses bytes whose sha256
    # is not this one (a file swapped since it was written is not published).
    operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
    with outdir.reader(path) as handle:
        sample = handle.read(512)
    operation.upload_info = UploadInfo(size=size, sample=sample, sha256=bytes.fromhex(sha256))
    return operation


def _already_uploaded(name: str, size: int, sha256: str) -> CommitOperationAdd:
    """A shard the Hub already holds (pre-uploaded by this run or an earlier one, and maybe
    deleted here since): the state ``preupload_lfs_files`` leaves an addition in, rebuilt from
    the journal, so that the commit neither reads nor sends it."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
    operation.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
    operation._upload_mode = "lfs"
    operation._is_uploaded = True
    return operation


def _size_and_sha256(handle: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(_HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: what the Hub reports for a file not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _refusal(status: int, what: str, repo_id: str, exc: BaseException) -> HubError:
    if status == 401:
        return HubError(f"the Hub refused the token while {what} (401 Unauthorized)", file=repo_id, hint=_LOGIN)
    if status == 403:
        return HubError(f"the token may not write to this repo ({what}: 403 Forbidden)", file=repo_id, hint=_LOGIN)
    if status == 404:
        return HubError(
            f"repo or branch not found while {what} (404)",
            file=repo_id,
            hint="check the repo name ORG/NAME, the branch, and that the token can see the repo",
        )
    return HubError(f"{what} failed: {_short(exc)}", file=repo_id, hint=_AGAIN)


def _short(exc: BaseException) -> str:
    """The HTTP status, or the first line of the first cause of ``exc`` (a dropped connection
    reads as what the connection did, not as the wrapper huggingface_hub raises)."""
    status = http_status(exc)
    if status is not None:
        return f"HTTP {status}"
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def publish(folder: Path, target: PushTarget, *, quiet: bool = True) -> tuple[str, str]:
    """``shardmerge push``: publish a finished merge in ``folder`` without merging again,
    holding the folder's lock. Returns the commit id and the repo URL."""
    if not (folder / STATE_DIR).is_dir():
        raise OutputError(f"no shardmerge journal in {STATE_DIR}", file=folder, hint="push publishes a merge's output")
    with lock.hold(folder):
        outdir.check_links(folder, folder / STATE_DIR)  # before the repo is created: nothing is published
        return _publish(folder, target, quiet)


def _publish(folder: Path, target: PushTarget, quiet: bool) -> tuple[str, str]:
    from .journal import load

    journal = load(folder)
    if journal is None:
        raise OutputError(f"no shardmerge journal in {STATE_DIR}", file=folder, hint="push publishes a merge's output")
    if not journal.complete:
        raise OutputError("the merge in this folder did not finish", file=folder, hint="run the merge again first")
    message = commit_message(journal.job["base"], len(journal.job.get("adapters", [])))
    publisher = Publisher(target, folder, message, quiet=quiet)
    try:
        publisher.open(journal)
        if not journal.complete:
            raise OutputError(
                "some shards were deleted after their upload to another repo or branch",
                file=folder,
                hint="run the merge again to recreate them, then push",
            )
        for name, record in journal.shards.items():
            path = folder / name
            if not journal.deleted(name) and (not path.is_file() or path.stat().st_size != record.size):
                raise OutputError("shard is missing or changed", file=path, hint="run the merge again to redo it")
            publisher.submit(name)
        commit = publisher.finish(lambda: None)
    finally:
        publisher.close()
    return commit, publisher.url
