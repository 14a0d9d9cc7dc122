"""Inputs written by an adversary: links, FIFOs and index entries that lead out of the input's
folder, and links planted in the output folder. Nothing outside the inputs is read, nothing
outside the output is written, nothing is published, and every refusal is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import load_file

from conftest import Base, save_adapter, shard_bytes
from hub_server import HubServer

TOKEN = "hf_loopbackTestToken0123456789"
REPO = "shardmerge-tests/untrusted"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def base(models: Callable[[str], Base], tmp_path: Path) -> Path:
    """A copy of a small sharded base, to plant things in."""
    folder = tmp_path / "base"
    shutil.copytree(models("llama-bf16").path, folder)
    return folder


@pytest.fixture(scope="module")
def adapter(models: Callable[[str], Base], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("untrusted") / "adapter"
    return save_adapter(models("llama-bf16"), folder, seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(TOKEN) as server:
        yield server


def shardmerge(
    *args: object, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The command in a child process: a refusal must come as one line, not a hang."""
    command = [sys.executable, "-m", "shardmerge.cli", *(str(arg) for arg in args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def hub_env(hub: HubServer, home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def first_shard(folder: Path) -> Path:
    return folder / sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))[0]


def test_a_side_file_linked_to_the_process_environment_is_refused_and_nothing_is_published(
    base: Path, adapter: Path, hub: HubServer, tmp_path: Path
) -> None:
    (base / "notes.txt").symlink_to("/proc/self/environ")
    out = tmp_path / "out"
    result = shardmerge("merge", base, adapter, "-o", out, "--quiet", "--push-to-hub", REPO, env=hub_env(hub, tmp_path))
    err = one_line(result)
    assert f"{base / 'notes.txt'}: a link to /proc/self/environ (/proc/" in err
    assert "shardmerge follows links only to files inside an input's own folder" in err
    assert TOKEN not in result.stdout + err
    assert not out.exists() and not hub.state.repos and hub.state.commits_made == 0


@pytest.mark.parametrize("victim", ["side file", "shard", "index", "config", "adapter config", "adapter weights"])
def test_any_input_file_linked_out_of_its_folder_is_refused_naming_link_and_target(
    base: Path, adapter: Path, tmp_path: Path, victim: str
) -> None:
    theirs = shutil.copytree(adapter, tmp_path / "adapter")
    place = {
        "side file": base / "tokenizer.model",
        "shard": first_shard(base),
        "index": base / INDEX,
        "config": base / "config.json",
        "adapter config": theirs / "adapter_config.json",
        "adapter weights": theirs / "adapter_model.safetensors",
    }[victim]
    elsewhere = tmp_path / "elsewhere" / place.name
    elsewhere.parent.mkdir()
    if place.exists():
        place.rename(elsewhere)  # the same bytes, outside the folder: still refused
    else:
        elsewhere.write_bytes(os.urandom(64))
    place.symlink_to(os.path.relpath(elsewhere, place.parent))
    out = tmp_path / "out"
    err = one_line(shardmerge("merge", base, theirs, "-o", out, "--quiet"))
    assert f"{place}: a link to ../elsewhere/{place.name} ({elsewhere}), outside {place.parent}" in err
    assert not out.exists()


def test_links_inside_the_folder_and_a_hub_cache_snapshot_are_followed(
    base: Path, adapter: Path, hub: HubServer, tmp_path: Path
) -> None:
    """A real ``snapshot_download`` folder, whose files are links into ``../../blobs``, merges
    as the folder it came from; so does a side file linked to another file of its folder."""
    reference = tmp_path / "reference"
    assert shardmerge("merge", base, adapter, "-o", reference, "--quiet").returncode == 0
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=base)
    api.upload_folder(repo_id=REPO, folder_path=adapter, path_in_repo="adapters/first")
    snapshot = Path(snapshot_download(REPO, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "cache"))
    assert (snapshot / "config.json").is_symlink() and "blobs" in os.readlink(snapshot / "config.json")
    out = tmp_path / "out"
    done = shardmerge("merge", snapshot, snapshot / "adapters" / "first", "-o", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert shard_bytes(out) == shard_bytes(reference)
    assert (out / "config.json").read_bytes() == (reference / "config.json").read_bytes()

    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "template.jinja").symlink_to("chat_template.jinja")
    inside = tmp_path / "inside"
    assert shardmerge("merge", base, adapter, "-o", inside, "--quiet").returncode == 0
    assert (inside / "template.jinja").read_text() == "{{ messages }}"
    assert not (inside / "template.jinja").is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "device link", "hidden file link"])
def test_fifos_devices_and_hidden_files_are_never_read(base: Path, adapter: Path, tmp_path: Path, kind: str) -> None:
    name = base / "tokenizer.model"
    if kind == "fifo":
        os.mkfifo(name)  # opening it to read would wait for a writer forever
        expected = "is a FIFO, not a file: shardmerge does not read it"
    elif kind == "device link":
        name.symlink_to("/dev/zero")
        expected = f"a link to /dev/zero, outside {base}"
    else:  # a clone's credentials: inside the folder, but hidden
        (base / ".git").mkdir()
        (base / ".git" / "config").write_text('[remote "origin"]\n\turl = https://user:hf_secret@hub.example/x\n')
        name.symlink_to(".git/config")
        expected = f"a link to .git/config ({base / '.git' / 'config'}), a hidden file or folder"
    err = one_line(shardmerge("merge", base, adapter, "-o", tmp_path / "out", "--quiet", timeout=60))
    assert f"{name}: {expected}" in err
    assert not (tmp_path / "out").exists()


def test_links_to_folders_or_to_nothing_are_neither_read_nor_copied(base: Path, adapter: Path, tmp_path: Path) -> None:
    (base / "images").symlink_to("/", target_is_directory=True)
    (base / "gone.txt").symlink_to(tmp_path / "nothing")
    out = tmp_path / "out"
    done = shardmerge("merge", base, adapter, "-o", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert not (out / "images").exists() and not (out / "gone.txt").exists()


def test_a_sparse_side_file_stays_sparse(base: Path, adapter: Path, tmp_path: Path) -> None:
    big = base / "vectors.dat"
    with big.open("wb") as handle:
        handle.write(b"head")
        handle.truncate(2**30)
        handle.seek(2**30 - 4)
        handle.write(b"tail")
    out = tmp_path / "out"
    done = shardmerge("merge", base, adapter, "-o", out, "--quiet")
    assert done.returncode == 0, done.stderr
    copy = out / "vectors.dat"
    journal = json.loads((out / ".shardmerge" / "journal.json").read_text())
    assert journal["inputs"]["base_files"]["vectors.dat"].startswith("sparse-sha256:"), "holes not read to plan"
    assert copy.stat().st_size == 2**30
    assert copy.stat().st_blocks * 512 < 2**20, "the holes were not written"
    with copy.open("rb") as handle:
        assert handle.read(4) == b"head"
        handle.seek(2**29)
        assert handle.read(4) == bytes(4)
        handle.seek(-4, os.SEEK_END)
        assert handle.read() == b"tail"


def _rewrite_index(base: Path, change: Callable[[str], str]) -> None:
    index = json.loads((base / INDEX).read_text())
    index["weight_map"] = {name: change(file) for name, file in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))


def test_index_entries_that_leave_the_folder_are_refused_before_any_is_opened(
    base: Path, adapter: Path, tmp_path: Path
) -> None:
    shards = sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(base / shards[0], outside / shards[0])
    os.mkfifo(base / "notes.txt")  # opened, it would hang
    entries = {
        shards[0]: str(outside / shards[0]),  # absolute
        shards[1]: f"../outside/{shards[0]}",  # climbs out
        shards[2]: "notes.txt",  # not a shard
    }
    _rewrite_index(base, lambda file: entries.get(file, file))
    err = one_line(shardmerge("plan", base, adapter, timeout=60))
    lines = err.strip().splitlines()
    assert "refusing to merge, nothing was written: 3 problems found" in lines[0]
    assert f"  - {base / INDEX}: the index names {str(outside / shards[0])!r}, a path that leaves" in err
    assert f"the index names '../outside/{shards[0]}', a path that leaves the model's folder" in err
    assert "the index names 'notes.txt', which is not a .safetensors file" in err
    assert len(lines) == 4


def test_shards_of_the_same_name_in_two_folders_are_refused(base: Path, adapter: Path, tmp_path: Path) -> None:
    """Today's index lists ``a/NAME`` and ``b/NAME``: both would be written as ``NAME``."""
    shards = sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
    for folder, shard in zip("ab", shards[:2], strict=True):
        (base / folder).mkdir()
        (base / shard).rename(base / folder / shards[0])
    moved = {shards[0]: f"a/{shards[0]}", shards[1]: f"b/{shards[0]}"}
    _rewrite_index(base, lambda file: moved.get(file, file))
    out = tmp_path / "out"
    err = one_line(shardmerge("merge", base, adapter, "-o", out, "--quiet"))
    assert f"the index names 'a/{shards[0]}', a path that leaves the model's folder" in err
    assert f"the index names 'b/{shards[0]}', a path that leaves the model's folder" in err
    assert not out.exists()


def test_pickle_shards_that_would_be_written_under_one_name_are_refused(
    models: Callable[[str], Base], adapter: Path, tmp_path: Path
) -> None:
    """``pytorch_model-00001-of-00002.bin`` and ``model-00001-of-00002.bin`` both become
    ``model-00001-of-00002.safetensors``."""
    tensors = load_file(models("llama-fp32").path / "model.safetensors")
    names = sorted(tensors)
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(models("llama-fp32").path / "config.json", base / "config.json")
    files = ["pytorch_model-00001-of-00002.bin", "model-00001-of-00002.bin"]
    halves = [names[::2], names[1::2]]
    for file, half in zip(files, halves, strict=True):
        torch.save({name: tensors[name].clone() for name in half}, base / file)
    weight_map = {name: file for file, half in zip(files, halves, strict=True) for name in half}
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    err = one_line(shardmerge("merge", base, adapter, "-o", out, "--quiet"))
    assert "model-00001-of-00002.safetensors: two base shards would be written to this one file" in err
    assert all(file in err for file in files)
    assert not out.exists()


@pytest.mark.parametrize(
    "planted", [".shardmerge/lock", ".shardmerge/journal.json.tmp", ".shardmerge/journal.json", ".shardmerge", "shard"]
)
def test_a_link_planted_in_the_output_folder_is_refused_and_its_target_untouched(
    base: Path, adapter: Path, tmp_path: Path, planted: str
) -> None:
    out = tmp_path / "out"
    assert shardmerge("merge", base, adapter, "-o", out, "--quiet").returncode == 0
    victim = tmp_path / "victim"
    place = out / planted if planted != "shard" else first_shard(out).with_name(first_shard(out).name + ".tmp")
    if planted == ".shardmerge":
        shutil.copytree(out / ".shardmerge", victim)  # a look-alike state folder elsewhere
        shutil.rmtree(place)
        place.symlink_to(victim, target_is_directory=True)
        before = {path.name: path.read_bytes() for path in victim.iterdir()}
    else:
        victim.write_text("precious")
        if place.exists():
            place.unlink()
        place.symlink_to(victim)
    err = one_line(shardmerge("merge", base, adapter, "-o", out, "--quiet"))
    assert f"{place}: a link (to {victim}) where shardmerge keeps its own file" in err
    if planted == ".shardmerge":
        assert {path.name: path.read_bytes() for path in victim.iterdir()} == before
    else:
        assert victim.read_text() == "precious"


def test_push_refuses_a_link_planted_in_the_output_and_publishes_nothing(
    base: Path, adapter: Path, hub: HubServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert shardmerge("merge", base, adapter, "-o", out, "--quiet").returncode == 0
    (out / "notes.txt").symlink_to("/proc/self/environ")
    result = shardmerge("push", out, REPO, "--quiet", env=hub_env(hub, tmp_path))
    err = one_line(result)
    assert f"{out / 'notes.txt'}: a link (to /proc/self/environ) where shardmerge keeps its own file" in err
    assert not hub.state.repos and TOKEN not in result.stdout + err


def test_push_publishes_the_merge_and_nothing_else_that_lies_in_the_folder(
    base: Path, adapter: Path, hub: HubServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert shardmerge("merge", base, adapter, "-o", out, "--quiet").returncode == 0
    written = {path.name for path in out.iterdir() if path.is_file()}
    (out / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (out / "notes.txt").write_text("dropped here by someone else")
    done = shardmerge("push", out, REPO, "--quiet", env=hub_env(hub, tmp_path))
    assert done.returncode == 0, done.stderr
    head = hub.state.head(REPO, "main")
    assert head is not None and set(head.files) == written | {".gitattributes"}


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("in the base", "inside the input folder"),
        ("above the base", "holds the input folder"),
        ("in the adapter", "inside the input folder"),
    ],
)
def test_an_output_folder_inside_an_input_or_holding_one_is_refused(
    base: Path, adapter: Path, tmp_path: Path, where: str, said: str
) -> None:
    theirs = shutil.copytree(adapter, tmp_path / "adapter")
    out = {"in the base": base / "merged", "above the base": tmp_path, "in the adapter": theirs / "merged"}[where]
    before = {folder: sorted(p.name for p in folder.iterdir()) for folder in (base, theirs)}
    err = one_line(shardmerge("merge", base, theirs, "-o", out, "--quiet"))
    assert f"{out}: output folder {said}" in err
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in (base, theirs)} == before
