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
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Weight files of other formats that the output replaces and so must not copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


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
    index = folder / INDEX_NAME
    metadata: dict[str, object] | None = None
    if index.is_file():
        try:
            parsed = json.loads(index.read_text())
            weight_map = parsed["weight_map"]
            metadata = parsed.get("metadata")
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"unreadable index ({exc})", file=index, hint="download or save the model again") from exc
        shards = tuple(folder / shard for shard in sorted(names))
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise InputError(
                f"index lists shards that are missing: {', '.join(missing)}",
                file=index,
                hint="the download is incomplete: fetch the missing shards",
            )
    elif (folder / SINGLE_FILE).is_file():
        shards = (folder / SINGLE_FILE,)
    else:
        raise InputError(
            f"no {SINGLE_FILE} or {INDEX_NAME} found",
            file=folder,
            hint="shardmerge reads safetensors checkpoints; save the base with "
            "save_pretrained(safe_serialization=True)",
        )
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
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(
            f"no {ADAPTER_WEIGHTS} in the adapter folder",
            file=folder,
            hint="save the adapter with save_pretrained(safe_serialization=True)",
        )
    return AdapterFiles(folder, config, weights)
