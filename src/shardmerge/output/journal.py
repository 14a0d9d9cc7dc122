"""Resume state, in ``OUT/.shardmerge/journal.json``: whose output this is, and what is done.

The journal holds the job's inputs (base shards by name, size and header hash, adapters by
content; every option that changes bytes; the format version) and, for each finished shard,
its size, its header's sha256 and its xxh3-128, computed while the shard was written. xxh3
guards against truncation and bit rot, not against an adversary, and costs next to nothing;
a shard's sha256 (the Hub's LFS object id) is computed only when it is published, while it
is written or, for a merge published later by ``push``, when it is uploaded. A shard is
absent, a temp file (deleted on the next run), or finished and recorded here. The journal is
rewritten atomically after each shard, so a kill at any moment leaves it consistent.

Format 1 (shardmerge 0.1) recorded every shard's sha256 and no xxh3; such a journal is read
as it was, and its shards are checked by sha256 wherever a shard is hashed again. A journal
of a newer format than this release writes is refused, never guessed at.

When the merge is published, ``push`` holds the target repo and branch, the shards the Hub
already holds (by sha256), the shards deleted locally once uploaded, and the commit made.
The uploader thread writes it too, so every change goes through one lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..formats.fileio import file_hashes
from ..formats.jsondoc import parse
from ..planning.model import Plan, ShardPlan
from . import outdir
from .lock import LOCK_FILE, STATE_DIR

JOURNAL = "journal.json"
VERSION = 2  # the journal's own format; the output's bytes are versioned in the plan's inputs


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: its size and hashes, its merged tensors, those converted to another
    dtype only, the merged ones that came out equal to the base (an update of zero), and the
    tensors whose NaN or Inf came from the base and were kept. ``xxh3_128`` is None only in a
    format-1 journal, which has ``sha256`` instead; ``sha256`` is there once published.
    ``requantized``: for each merged weight written back in its quantized format, the squared
    norms of its update (dW), of the change that survived requantization (Q(W + dW) - W), and
    of the rounding error (Q(W + dW) - (W + dW)). ``device``: where it was computed (None in
    a journal written before shards recorded theirs: the journal's ``device``)."""

    size: int
    xxh3_128: str | None
    header_sha256: str
    merged: tuple[str, ...]
    converted: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    non_finite_kept: tuple[str, ...] = ()
    sha256: str | None = None
    requantized: tuple[tuple[str, float, float, float], ...] = ()
    device: str | None = None


@dataclass
class PushState:
    """What one publishing target holds: ``uploaded`` maps shard names to the sha256 the Hub
    has for them, ``deleted`` lists shards removed locally after their upload."""

    repo_id: str
    revision: str
    uploaded: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    commit: str | None = None


@dataclass
class Journal:
    folder: Path
    fingerprint: str
    inputs: dict[str, Any]
    job: dict[str, Any]
    device: str = "cpu"
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    complete: bool = False
    push: PushState | None = None
    changes: list[int] = field(default_factory=list)  # per adapter, the base tensors it changes
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.folder / STATE_DIR / JOURNAL

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        body = {
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "job": self.job,
            "device": self.device,
            "shards": {name: asdict(record) for name, record in self.shards.items()},
            "complete": self.complete,
            "push": asdict(self.push) if self.push else None,
            "changes": self.changes,
        }
        # allow_nan=False: a journal is JSON, and NaN is not (every figure in it is finite)
        outdir.write_bytes_atomic(self.path, (json.dumps(body, indent=2, allow_nan=False) + "\n").encode())

    def device_of(self, shard: str) -> str:
        """The device finished shard ``shard`` was computed on."""
        return self.shards[shard].device or self.device

    def record(self, shard: str, record: ShardRecord) -> None:
        with self.lock:
            self.shards[shard] = record
            if self.push is not None and self.push.uploaded.get(shard, record.sha256) != record.sha256:
                del self.push.uploaded[shard]  # the Hub holds other bytes under this name
            self._save()

    def add_sha256(self, shard: str, sha256: str) -> None:
        """Record the sha256 of a finished shard, computed when it is first published."""
        with self.lock:
            self.shards[shard] = replace(self.shards[shard], sha256=sha256)
            self._save()

    def set_target(self, repo_id: str | None, revision: str = "main") -> PushState | None:
        """Publish to ``repo_id`` at ``revision`` (None: keep the output local). Upload state
        belongs to one target: another one starts afresh, and shards deleted after an upload
        to the old one are forgotten, to be merged again."""
        with self.lock:
            old = self.push
            if old is not None and (old.repo_id, old.revision) != (repo_id, revision):
                for name in old.deleted:
                    self.shards.pop(name, None)
                    self.complete = False
                self.push = None
            if repo_id is not None and self.push is None:
                self.push = PushState(repo_id, revision)
            self._save()
            return self.push

    def mark_uploaded(self, shard: str, sha256: str, *, deleted: bool) -> None:
        with self.lock:
            assert self.push is not None
            self.push.uploaded[shard] = sha256
            if deleted and shard not in self.push.deleted:
                self.push.deleted.append(shard)
            self._save()

    def mark_committed(self, commit: str) -> None:
        with self.lock:
            assert self.push is not None
            self.push.commit = commit
            self._save()

    def deleted(self, shard: str) -> bool:
        """Whether ``shard`` was removed locally once the Hub held it."""
        return self.push is not None and shard in self.push.deleted

    def finished(self, shard: ShardPlan, *, rehash: bool) -> bool:
        """Whether ``shard`` is on disk exactly as recorded: size and header always, the whole
        file's hash with ``rehash``. A shard that fails is forgotten, to be written again."""
        record = self.shards.get(shard.name)
        path = self.folder / shard.name
        if record is not None and self.deleted(shard.name):
            return True
        if record is None or not _regular(path):
            return False
        good = path.stat().st_size == record.size and header_sha256(path) == record.header_sha256
        if good and rehash:
            good = not mismatched_hashes(path, record)
        if not good:
            del self.shards[shard.name]
            self.complete = False
            self.save()
        return good


def load(folder: Path) -> Journal | None:
    """The journal in ``folder``; None where there is none. Refuses one that cannot be read (or
    is a link), and one of a newer format than this release writes."""
    path = folder / STATE_DIR / JOURNAL
    try:
        body = parse(outdir.read_own(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    version = body.get("version", 1) if isinstance(body, dict) else None
    if isinstance(version, int) and version > VERSION:
        raise OutputError(
            f"the journal is format {version}, newer than this shardmerge reads ({VERSION})",
            file=path,
            hint="use the shardmerge release that wrote it, or a newer one; or --restart to merge again",
        )
    try:
        return Journal(
            folder=folder,
            fingerprint=body["fingerprint"],
            inputs=body["inputs"],
            job=body["job"],
            device=_device(body.get("device", "cpu")),
            shards={name: _record(r) for name, r in body["shards"].items()},
            complete=bool(body.get("complete")),
            push=PushState(**body["push"]) if body.get("push") else None,
            changes=list(body.get("changes", [])),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> OutputError:
    return OutputError(
        f"unreadable journal ({exc})",
        file=path,
        hint="it is damaged or not shardmerge's: --restart discards this output and starts over",
    )


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


_DEVICE = re.compile(r"(cpu|cuda(:(0|[1-9][0-9]*))?)")


def _device(value: object) -> str:
    """A device the journal names: ``cpu``, ``cuda`` or ``cuda:N`` (verify's tolerance and the
    resume check go by it), else a ValueError."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"device {value!r} is not cpu, cuda or cuda:N")
    return value


def _record(entry: dict[str, Any]) -> ShardRecord:
    record = ShardRecord(
        entry["size"],
        entry.get("xxh3_128"),
        entry["header_sha256"],
        *(tuple(entry.get(key, ())) for key in ("merged", "converted", "unchanged", "non_finite_kept")),
        sha256=entry.get("sha256"),
        requantized=tuple((str(n), float(d), float(k), float(e)) for n, d, k, e in entry.get("requantized", ())),
        device=_device(entry["device"]) if entry.get("device") is not None else None,
    )
    if record.xxh3_128 is None and record.sha256 is None:
        raise KeyError("xxh3_128")  # a record without a hash cannot be checked: not ours
    return record


def check_output(folder: Path, inputs: list[Path]) -> None:
    """Refuse an output path that is a file, one of the input folders, inside one or holding
    one, before anything is created."""
    if folder.exists() and not folder.is_dir():
        raise OutputError("output path exists and is not a folder", file=folder, hint="choose another output path")
    resolved = folder.resolve()
    for source in (source.resolve() for source in inputs):
        if resolved == source:
            raise OutputError("output folder is one of the inputs", file=folder, hint="choose another output path")
        if resolved.is_relative_to(source) or source.is_relative_to(resolved):
            where = "inside the input folder" if resolved.is_relative_to(source) else "holds the input folder"
            raise OutputError(
                f"output folder {where} {source}",
                file=folder,
                hint="choose an output folder apart from the base and the adapters",
            )
    state = folder / STATE_DIR
    if state.is_symlink():
        raise outdir.link_error(state)
    if folder.is_dir() and not state.is_dir() and any(folder.iterdir()):
        raise _foreign(folder)  # before the lock is taken: nothing is added to such a folder


def _foreign(folder: Path) -> OutputError:
    return OutputError(
        "output folder is not empty and was not written by shardmerge",
        file=folder,
        hint="choose an empty or new folder, or remove this one",
    )


def claim(folder: Path, plan: Plan, *, restart: bool, device: str) -> Journal:
    """The journal of this job in ``folder`` (checked by ``check_output`` and locked): a new one
    for an empty folder (or with ``restart``), the earlier one when the same job ran here
    before. Refuses a folder that is not ours, or ours for a job with other inputs, saying
    what changed."""
    outdir.check_links(folder, folder / STATE_DIR)
    journal = _earlier(folder, plan, restart) if folder.is_dir() and _contents(folder) else None
    outdir.remove_temps(folder)
    if journal is None:
        job = json.loads(json.dumps(_job_of(plan)))
        journal = Journal(folder, plan.fingerprint, plan.inputs, job, device)
        journal.changes = [adapter.tensors for adapter in plan.adapters]
        (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
        journal.save()
    return journal


def _earlier(folder: Path, plan: Plan, restart: bool) -> Journal | None:
    """The journal of this same job in ``folder``, to resume; None once ``restart`` cleared it."""
    try:
        journal = load(folder)
    except OutputError:  # unreadable, or a newer format: ours, but not for this release to read
        if not restart:
            raise
        _clear(folder)
        return None
    if journal is None:
        raise _foreign(folder)
    if journal.fingerprint != plan.fingerprint and not restart:
        changes = "; ".join(describe_changes(journal.inputs, plan.inputs)) or "the job differs"
        raise OutputError(
            f"output folder holds an earlier merge with other inputs: {changes}",
            file=folder,
            hint="run it with --restart to discard that output and start over, or choose another folder",
        )
    if restart:
        _clear(folder)
        return None
    return journal


def _job_of(plan: Plan) -> dict[str, Any]:
    """The job that plans ``plan`` again (for verify): every option that decides its bytes."""
    declared = {key: plan.inputs[key] for key in ("conv1d_modules", "max_shard_size") if key in plan.inputs}
    adapters: list[dict[str, Any]] = [{"path": a.path, "weight": a.weight} for a in plan.adapters]
    combine = plan.combine
    if combine is not None:
        declared |= {"combine": combine.method, "normalize": combine.normalize}
        if combine.pruning is not None:
            for adapter, spec in zip(plan.adapters, adapters, strict=True):
                spec["density"] = combine.densities[adapter.index]
        if combine.pruning == "random":
            declared["seed"] = combine.seed
        if combine.pruning == "outliers":
            declared["gamma"] = combine.gamma
        if combine.election is not None:
            declared["sign_election"] = combine.election
    return {
        "base": plan.base,
        "adapters": adapters,
        "output": plan.output,
        "dtype": plan.dtype,
        "device": plan.device,
        **declared,
    }


def _contents(folder: Path) -> list[Path]:
    """What ``folder`` holds besides the lock this run holds on it."""
    state = folder / STATE_DIR
    entries = [entry for entry in folder.iterdir() if entry != state]
    if state.is_dir():
        entries += [entry for entry in state.iterdir() if entry.name != LOCK_FILE]
    return entries


def _clear(folder: Path) -> None:
    """Empty a folder our journal says we own (``--restart``), but for the lock we hold on it."""
    for entry in _contents(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two jobs' inputs, in words."""
    changes = []
    if old.get("format_version") != new.get("format_version"):
        changes.append(f"output format version {old.get('format_version')} -> {new.get('format_version')}")
    if old.get("dtype") != new.get("dtype"):
        changes.append(f"dtype changed from {old.get('dtype')} to {new.get('dtype')}")
    if old.get("base") != new.get("base"):
        changed = _changed_names(old.get("base", []), new.get("base", []))
        changes.append(f"base weights changed ({changed})")
    if old.get("base_files") != new.get("base_files"):
        names = sorted(set(old.get("base_files", {}).items()) ^ set(new.get("base_files", {}).items()))
        changes.append(f"base files changed ({', '.join(sorted({name for name, _ in names}))})")
    changes += _combine_changes(old.get("combine"), new.get("combine"))
    old_adapters, new_adapters = old.get("adapters", []), new.get("adapters", [])
    if len(old_adapters) != len(new_adapters):
        changes.append(f"{len(old_adapters)} adapters before, {len(new_adapters)} now")
    for index, (before, after) in enumerate(zip(old_adapters, new_adapters, strict=False)):
        what = [key for key in ("weights", "config") if before.get(key) != after.get(key)]
        if before.get("weight") != after.get("weight"):
            what.append(f"weight {before.get('weight')} -> {after.get('weight')}")
        if what:
            changes.append(f"adapter {index} changed: {', '.join(what)}")
    return changes


def _combine_changes(old: Any, new: dict[str, Any] | None) -> list[str]:
    """How the combination of the adapters changed (None: applied in turn), in words; ``old``
    as the journal holds it, whatever that is."""
    if old == new:
        return []
    if old is not None and not isinstance(old, dict):
        return ["combine changed"]
    before, after = (combine.get("method", "?") if combine else "linear" for combine in (old, new))
    if before != after or old is None or new is None:
        return [f"combine changed from {before} to {after}"]
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return [f"combine {after} changed: {', '.join(keys)}"]


def _changed_names(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    before = {item["name"]: item for item in old}
    after = {item["name"]: item for item in new}
    names = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    return ", ".join(names)


def header_sha256(path: Path) -> str:
    with outdir.reader(path) as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        return hashlib.sha256(prefix + handle.read(min(length, 100_000_000))).hexdigest()


def mismatched_hashes(path: Path, record: ShardRecord) -> list[str]:
    """The hashes of ``record`` (of those it has) that the file at ``path`` no longer matches."""
    found = file_hashes(path, xxh3=record.xxh3_128 is not None, sha256=record.sha256 is not None)
    expected = (record.xxh3_128, record.sha256)
    return [name for name, want, got in zip(("xxh3-128", "sha256"), expected, found, strict=True) if want != got]
