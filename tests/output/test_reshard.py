"""``--max-shard-size``: the output split into shards of at most that much tensor data, named
as save_pretrained names them, each read from one base shard; resume, verify and batch
passes follow the new layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

import shardmerge
from conftest import Base, forget_shard, llama_config, read_output, save_adapter, save_base, shard_bytes
from shardmerge.config import parse_size
from shardmerge.formats.dtypes import TORCH_DTYPES
from shardmerge.verify import verify

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))
LIMIT = 15_000  # bytes: a few tensors of the 64-wide model a shard; its MLP weights (16 KB) alone
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Base, Path]:
    root = tmp_path_factory.mktemp("reshard")
    base = save_base(llama_config(hidden=64), root / "base", torch.bfloat16, seed=4, shard_kb=100)
    adapter = save_adapter(base, root / "adapter", seed=6, r=4, target_modules=LINEAR)
    return base, adapter


def _merge(inputs: tuple[Base, Path], output: Path, size: int | str | None = LIMIT) -> shardmerge.MergeReport:
    base, adapter = inputs
    return shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), max_shard_size=size)


def test_the_output_is_split_as_save_pretrained_splits_it(inputs: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    mirrored, split = tmp_path / "mirror", tmp_path / "split"
    _merge(inputs, mirrored, None)
    _merge(inputs, split)
    assert len(list(base.path.glob("*.safetensors"))) == 2
    shards = sorted(split.glob("*.safetensors"))
    count = len(shards)
    assert count > 4
    assert [p.name for p in shards] == [f"model-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]
    # The same tensors, the same bytes: only where they lie changed.
    ours, theirs = read_output(split), read_output(mirrored)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)) for name in ours)
    index = json.loads((split / "model.safetensors.index.json").read_text())
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)], max_shard_size=LIMIT)
    for shard in shards:
        with safe_open(shard, "pt") as file:
            names = list(file.keys())
            sizes = [file.get_slice(n).get_shape() for n in names]
        assert all(index["weight_map"][name] == shard.name for name in names)
        data = sum(torch.Size(size).numel() * 2 for size in sizes)
        assert data <= LIMIT or len(names) == 1, shard.name
    # save_pretrained's split (huggingface_hub's), of each base shard's tensors in their order
    mirror = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    expected = []
    for shard in mirror.shards:
        state = {t.name: torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype]) for t in shard.tensors}
        expected += list(split_torch_state_dict_into_shards(state, max_shard_size=LIMIT).filename_to_tensors.values())
    assert [[t.name for t in shard.tensors] for shard in plan.shards] == expected
    assert verify(split, recompute=6, against_base=True).recomputed == 6


def test_a_resumed_split_merge_gives_the_same_bytes(inputs: tuple[Base, Path], tmp_path: Path) -> None:
    clean, output = tmp_path / "clean", tmp_path / "out"
    _merge(inputs, clean)
    _merge(inputs, output)
    forget_shard(output, 3)
    report = _merge(inputs, output)
    assert report.shards_skipped == report.shards - 1
    assert shard_bytes(output) == shard_bytes(clean)


def test_another_max_shard_size_is_a_changed_input(inputs: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    output = tmp_path / "out"
    _merge(inputs, output)
    done = subprocess.run(
        [SHARDMERGE, "merge", str(base.path), str(adapter), "-o", str(output), "--max-shard-size", "80KB"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "max_shard_size" in done.stderr, done.stderr


def test_the_command_line_and_job_files_take_sizes(inputs: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    command = [SHARDMERGE, "merge", str(base.path), str(adapter), "-o", str(tmp_path / "cli"), "--quiet"]
    done = subprocess.run([*command, "--max-shard-size", "40KB"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job.yaml"
    body = {"base": str(base.path), "adapters": [str(adapter)], "output": str(tmp_path / "job")}
    job.write_text(json.dumps(body | {"max_shard_size": "40KB"}))
    done = subprocess.run([SHARDMERGE, "run", str(job), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert shard_bytes(tmp_path / "cli") == shard_bytes(tmp_path / "job") != {}
    bad = subprocess.run(
        [*command[:-3], "-o", str(tmp_path / "bad"), "--max-shard-size", "5XB"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "'5XB' is not a size such as 5GB, 500MB or 2GiB" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("40KB", 40_000),
        ("8Mb", 10**6),
        ("4.35GB", 4_350_000_000),
        (123, 123),
    ],
)
def test_sizes_read_as_save_pretrained_reads_them(text: str | int, size: int) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_size(text) == size
    if isinstance(text, str) and "." not in text:  # transformers reads whole numbers only
        assert convert_file_size_to_int(text) == size


def test_a_batch_pass_writes_split_outputs_as_single_merges(inputs: tuple[Base, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    other = save_adapter(base, tmp_path / "other", seed=7, r=4, target_modules=["q_proj"])
    jobs = {
        "defaults": {"base": str(base.path), "max_shard_size": LIMIT},
        "jobs": [
            {"name": a.name, "adapters": [str(a)], "output": str(tmp_path / f"out-{a.name}")} for a in (adapter, other)
        ],
    }
    (tmp_path / "batch.yaml").write_text(json.dumps(jobs))
    done = subprocess.run([SHARDMERGE, "run", str(tmp_path / "batch.yaml"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for each in (adapter, other):
        single = tmp_path / f"single-{each.name}"
        shardmerge.merge(base=str(base.path), adapters=[str(each)], output=str(single), max_shard_size=LIMIT)
        assert shard_bytes(single) == shard_bytes(tmp_path / f"out-{each.name}")
