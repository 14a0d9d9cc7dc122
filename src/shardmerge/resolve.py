"""Names to files: where a base model's shards and an adapter's files are.

Only local folders today; a Hub repo id resolves here to a local snapshot, and nothing
after this module needs to know the difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError, InputError
from .st_io import INDEX_NAME

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
    """A base model on disk: its shards in index order, and its other files."""

    folder: Path
    shards: tuple[Path, ...]
    index_metadata: dict[str, object] | None
    extra_files: tuple[Path, ...]


@dataclass(frozen=True)
class AdapterFiles:
    folder: Path
    config: Path
    weights: Path


def resolve_base(name: str) -> BaseFiles:
    folder = Path(name).expanduser()
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
    extra = tuple(
        sorted(
            path
            for path in folder.iterdir()
            if path.is_file()
            and not path.name.startswith(".")
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and path.name not in _WEIGHT_INDEXES
        )
    )
    return BaseFiles(folder, shards, metadata, extra)


def _read_index(index: Path) -> tuple[tuple[Path, ...], dict[str, object] | None]:
    try:
        parsed = json.loads(index.read_text())
        names = sorted(set(parsed["weight_map"].values()))
        metadata = parsed.get("metadata")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"unreadable index ({exc})", file=index, hint="download or save the model again") from exc
    shards = tuple(index.parent / name for name in names)
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise InputError(
            f"index lists shards that are missing: {', '.join(missing)}",
            file=index,
            hint="the download is incomplete: fetch the missing shards",
        )
    return shards, metadata


def resolve_adapter(name: str) -> AdapterFiles:
    folder = Path(name).expanduser()
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
    return AdapterFiles(folder, config, weights)


def output_shard_name(source: Path) -> str:
    """The safetensors name of a base shard: ``pytorch_model-00001-of-00002.bin`` becomes
    ``model-00001-of-00002.safetensors``, as transformers names them."""
    if source.suffix != ".bin":
        return source.name
    return source.name.removesuffix(".bin").replace("pytorch_model", "model", 1) + ".safetensors"
