"""Names to files: where a base model's shards and an adapter's files are.

A local folder, or a Hub repo id (``org/name[@revision]``, see ``hub.py``) that
resolves to a snapshot folder in the Hub cache: after this module only the base's shards may
still be missing from disk (``run/fetch.py`` downloads each before it is read), and their headers
are already here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import is_hub_id
from ..errors import AdapterError, InputError, PlanError, ShardmergeError
from ..formats import confined
from ..formats.checkpoint import read_checkpoint_header
from ..formats.jsondoc import parse
from ..formats.safetensors import INDEX_NAME, MAX_HEADER_BYTES, SafetensorsHeader
from . import hub

SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Weight files of other formats that the output replaces and so must not copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")
# Where a base's weights start, in order: safetensors win where a folder holds both formats.
_WEIGHT_ENTRY_POINTS = (INDEX_NAME, SINGLE_FILE, "pytorch_model.bin.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class BaseFiles:
    """A base model: its shards in index order, and its other files. ``name`` is what the
    plan records (a folder, or ``org/name@commit``); for a Hub base, ``headers`` holds the
    shards' headers read remotely, and ``repo_id``/``commit`` where to fetch the shards."""

    folder: Path
    shards: tuple[Path, ...]
    index_metadata: dict[str, object] | None
    extra_files: tuple[Path, ...]
    name: str = ""
    repo_id: str | None = None
    commit: str | None = None
    headers: tuple[SafetensorsHeader, ...] = ()

    def header(self, shard: Path) -> SafetensorsHeader:
        known = next((header for header in self.headers if header.path == shard), None)
        return known if known is not None else read_checkpoint_header(shard)


@dataclass(frozen=True)
class AdapterFiles:
    folder: Path
    config: Path
    weights: Path
    name: str = ""  # what the plan records: the folder, or ``org/name@commit``


def resolve_base(name: str) -> BaseFiles:
    folder = Path(name).expanduser()
    gguf = [folder] if folder.is_file() and folder.suffix == ".gguf" else []
    if folder.is_dir() and not any((folder / entry).is_file() for entry in _WEIGHT_ENTRY_POINTS):
        gguf = sorted(folder.glob("*.gguf"))
    if gguf:  # llama.cpp's inference format, quantized for inference, not for merging
        raise InputError(
            "the base is a GGUF file, which shardmerge does not read",
            file=gguf[0],
            hint="merge into the model's safetensors release, then convert the merged model to GGUF",
        )
    if not folder.is_dir() and is_hub_id(name):
        return _hub_base(name)
    if not folder.is_dir():
        raise InputError(
            "base model folder not found",
            file=folder,
            hint="give the folder that holds config.json and the .safetensors shards",
        )
    weights = next((folder / name for name in _WEIGHT_ENTRY_POINTS if (folder / name).is_file()), None)
    if weights is None:
        raise InputError(
            f"no {SINGLE_FILE}, {INDEX_NAME} or pytorch_model.bin found",
            file=folder,
            hint="give the folder a model was saved to with save_pretrained()",
        )
    metadata: dict[str, object] | None = None
    if weights.name.endswith(".index.json"):
        shards, metadata = _read_index(weights)
    else:
        shards = (weights,)
    problems: list[ShardmergeError] = []  # the shards are checked as their headers are read
    extra = _side_files(folder, problems)
    if problems:
        raise PlanError(problems)
    return BaseFiles(folder, shards, metadata, extra, name=str(folder))


def _is_extra(name: str) -> bool:
    """A base file copied to the output: not a weight file, an index or a hidden file."""
    return not name.startswith(".") and not name.endswith(_WEIGHT_SUFFIXES) and name not in _WEIGHT_INDEXES


def _side_files(folder: Path, problems: list[ShardmergeError]) -> tuple[Path, ...]:
    """The files of the base's folder that the output copies: regular files, or links that end
    on one inside the folder (see ``formats/confined.py``). Folders, and links to folders or to
    nothing, are neither read nor copied. A link to a file elsewhere, or a FIFO, device or
    socket, is a problem."""
    found = []
    for path in sorted(folder.iterdir()):
        if not _is_extra(path.name) or os.path.isdir(path) or not os.path.exists(path):
            continue
        if _check(path, problems):
            found.append(path)
    return tuple(found)


def _check(path: Path, problems: list[ShardmergeError]) -> bool:
    """Whether input file ``path`` may be read (see ``formats/confined.py``); a problem if not."""
    try:
        confined.check(path)
    except InputError as exc:
        problems.append(exc)
        return False
    return True


def _hub_base(name: str) -> BaseFiles:
    """A Hub base: the small files downloaded, the shards' headers read, the shards not."""
    repo, revision = hub.split_ref(name)
    if hub.offline():
        folder = hub.snapshot(name, None)
        local = resolve_base(str(folder))
        pinned = f"{repo}@{folder.name}"
        return BaseFiles(folder, local.shards, local.index_metadata, local.extra_files, pinned, repo, folder.name)
    commit, sizes = hub.remote_files(name)
    pinned = f"{repo}@{commit}"
    top = [file for file in sizes if "/" not in file]
    entry = next((file for file in _WEIGHT_ENTRY_POINTS if file in sizes), None)
    if entry is None:
        raise InputError(
            f"no {SINGLE_FILE}, {INDEX_NAME} or pytorch_model.bin in the repo",
            file=pinned,
            hint="give a repo a model was pushed to with push_to_hub() or save_pretrained()",
        )
    small = sorted(file for file in top if _is_extra(file))
    wanted = [*small, entry] if entry.endswith(".json") else small
    # The first file by the name the user gave, so the cache maps it to the commit, for offline runs.
    first = hub.download(repo, revision or "main", wanted[0] if wanted else entry)
    if first.parent.name != commit:
        raise InputError("the repo changed while it was being read", file=name, hint="run the same command again")
    for file in wanted[1:]:
        hub.download(repo, commit, file)
    folder = first.parent
    metadata: dict[str, object] | None = None
    if entry.endswith(".index.json"):
        shards, metadata = _read_index(folder / entry, present=False)
    else:
        shards = (folder / entry,)
    headers = []
    for shard in shards:
        if shard.suffix == ".bin" or hub.cached(repo, commit, shard.name) is not None:
            hub.download(repo, commit, shard.name)  # pickle headers need the file; a cached one is free
            continue
        if shard.name not in sizes:
            raise InputError("shard named in the index is not in the repo", file=f"{pinned}/{shard.name}")
        headers.append(hub.remote_header(repo, commit, shard.name, sizes[shard.name], shard))
    extra = tuple(folder / file for file in small)
    problems: list[ShardmergeError] = []
    for path in extra:
        _check(path, problems)
    if problems:
        raise PlanError(problems)
    return BaseFiles(folder, shards, metadata, extra, pinned, repo, commit, tuple(headers))


def _read_index(index: Path, present: bool = True) -> tuple[tuple[Path, ...], dict[str, object] | None]:
    """The shards an index names, which must be ``present`` on disk (not yet for a Hub base).
    Every entry must name a file of the index's own kind in the index's folder, checked
    before any is opened: one problem per entry that does not."""
    try:
        parsed = parse(confined.read_input(index, MAX_HEADER_BYTES))
        weight_map = parsed["weight_map"]
        metadata = parsed.get("metadata")
        if not isinstance(weight_map, dict) or not isinstance(metadata, (dict, type(None))):
            raise TypeError("weight_map and metadata must be objects")
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"unreadable index ({exc})", file=index, hint="download or save the model again") from exc
    kind = ".bin" if index.name.startswith("pytorch_model") else ".safetensors"
    problems: list[ShardmergeError] = [
        InputError(f"the index names {name!r}, {why}", file=index, hint="the index is damaged or not this model's")
        for name in names
        if (why := _entry_problem(name, kind))
    ]
    if problems:
        raise PlanError(problems)
    shards = tuple(index.parent / name for name in names)
    missing = [shard.name for shard in shards if present and not shard.is_file()]
    if missing:
        raise InputError(
            f"index lists shards that are missing: {', '.join(missing)}",
            file=index,
            hint="the download is incomplete: fetch the missing shards",
        )
    return shards, metadata


def _entry_problem(name: object, kind: str) -> str | None:
    """Why index entry ``name`` cannot be a shard of the index's folder, if it cannot."""
    if not isinstance(name, str):
        return "which is not a file name"
    if os.path.isabs(name) or "/" in name or "\\" in name:
        return "a path that leaves the model's folder: every shard must be a file name in that folder"
    if name.startswith("."):
        return "a hidden file name"
    if not name.isprintable():
        return "a file name with control characters"
    if not name.endswith(kind):
        return f"which is not a {kind} file"
    return None


def resolve_adapter(name: str) -> AdapterFiles:
    folder = Path(name).expanduser()
    if not folder.is_dir() and is_hub_id(name):
        folder = hub.snapshot(name, [ADAPTER_CONFIG, *ADAPTER_WEIGHTS])
        local = resolve_adapter(str(folder))
        return AdapterFiles(local.folder, local.config, local.weights, f"{hub.split_ref(name)[0]}@{folder.name}")
    if not folder.is_dir():
        raise AdapterError(
            "adapter folder not found", file=folder, hint="give the folder that holds adapter_config.json"
        )
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        raise AdapterError(
            f"no {ADAPTER_CONFIG} in the adapter folder",
            file=folder,
            hint="shardmerge merges PEFT adapters saved with save_pretrained(); check the path",
        )
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise AdapterError(
            f"no {' or '.join(ADAPTER_WEIGHTS)} in the adapter folder",
            file=folder,
            hint="save the adapter with PEFT's save_pretrained()",
        )
    return AdapterFiles(folder, config, weights, str(folder))  # both checked as they are read


def output_shard_name(source: Path) -> str:
    """The safetensors name of a base shard: ``pytorch_model-00001-of-00002.bin`` becomes
    ``model-00001-of-00002.safetensors``, as transformers names them."""
    if source.suffix != ".bin":
        return source.name
    return source.name.removesuffix(".bin").replace("pytorch_model", "model", 1) + ".safetensors"
