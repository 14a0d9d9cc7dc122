"""Batch files: many jobs, one pass over a shared base, failures kept to their own job."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import shardmerge.run.merger
import shardmerge.run.shared
from conftest import Base, save_adapter
from shardmerge.batch import run_jobs
from shardmerge.cli import main
from shardmerge.config import load_job_file
from shardmerge.formats.safetensors import read_header


@pytest.fixture
def adapters(models: Callable[[str], Base], tmp_path: Path) -> dict[str, Path]:
    base = models("llama-bf16")
    return {
        "attention": save_adapter(base, tmp_path / "attention", seed=1, r=4, target_modules=["q_proj", "v_proj"]),
        "mlp": save_adapter(base, tmp_path / "mlp", seed=2, r=8, target_modules=["gate_proj", "down_proj"]),
        "all": save_adapter(base, tmp_path / "all", seed=3, r=2, target_modules="all-linear"),
        "gpt2": save_adapter(models("gpt2-bf16"), tmp_path / "gpt2", seed=4, r=4, target_modules=["c_attn"]),
    }


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _single(base: Path, adapter: Path, out: Path, *flags: str) -> dict[str, bytes]:
    assert main(["merge", str(base), str(adapter), "-o", str(out), "--quiet", *flags]) == 0
    return _shards(out)


def _write_batch(path: Path, body: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _one_adapter_each(tmp_path: Path, base: Path, adapters: dict[str, Path], names: list[str]) -> Path:
    """A batch of one job per adapter named, each called after its adapter, on ``base``."""
    jobs = [{"name": name, "adapters": [str(adapters[name])]} for name in names]
    return _write_batch(
        tmp_path / "batch.yaml", {"defaults": {"base": str(base), "output": "runs/{name}"}, "jobs": jobs}
    )


def test_a_batch_isolates_failures_and_matches_single_merges(
    models: Callable[[str], Base], adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = models("llama-bf16").path
    foreign = tmp_path / "runs" / "foreign"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a merge")
    batch = _write_batch(
        tmp_path / "batch.yaml",
        {
            "defaults": {"base": str(base), "output": "runs/{name}"},
            "jobs": [
                {"name": "attention", "adapters": [str(adapters["attention"])]},
                {"name": "mlp", "adapters": [{"path": str(adapters["mlp"]), "weight": 0.5}]},
                {"name": "wrong-model", "adapters": [str(adapters["gpt2"])]},
                {"name": "foreign", "adapters": [str(adapters["all"])]},
                {"name": "both", "adapters": [str(adapters["all"]), str(adapters["attention"])], "dtype": "float32"},
            ],
        },
    )
    assert main(["run", str(batch), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "5 jobs: 3 done, 2 failed" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert (
        "failed" in rows["wrong-model"] and "no base tensor 'transformer.h.0.attn.c_attn.weight'" in rows["wrong-model"]
    )
    assert "failed" in rows["foreign"] and "not written by shardmerge" in rows["foreign"]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    runs, single = tmp_path / "runs", tmp_path / "single"
    assert _shards(runs / "attention") == _single(base, adapters["attention"], single / "attention")
    assert _shards(runs / "mlp") == _single(base, adapters["mlp"], single / "mlp", "--weights", "0.5")
    both = _single(base, adapters["all"], single / "both", "--dtype", "float32")
    assert both != _single(base, adapters["all"], single / "all")  # the second adapter matters
    two = [str(adapters["all"]), str(adapters["attention"])]
    assert main(["merge", str(base), *two, "-o", str(single / "both2"), "--dtype", "float32", "--quiet"]) == 0
    assert _shards(runs / "both") == _shards(single / "both2")
    # Run again: finished jobs are skipped, the failed ones fail again.
    capsys.readouterr()
    assert main(["run", str(batch), "--quiet"]) == 1
    again = capsys.readouterr().out
    assert "3 up to date, 2 failed" in again
    assert main(["run", str(batch), "--quiet", "--only", "attention", "mlp"]) == 0


def test_a_shared_base_pass_reads_each_base_shard_once(
    models: Callable[[str], Base], adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = models("llama-bf16").path
    names = ["attention", "mlp", "all"]
    batch = _one_adapter_each(tmp_path, base, adapters, names)
    read: Counter[str] = Counter()

    def counting(module: object) -> Callable[[int, memoryview, int], None]:
        real = module.pread_into  # type: ignore[attr-defined]

        def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            read[path] += buffer.nbytes
            real(fd, buffer, offset)

        return pread_into

    for module in (shardmerge.run.shared, shardmerge.run.merger):
        monkeypatch.setattr(module, "pread_into", counting(module))
    results = run_jobs(list(load_job_file(batch).jobs), quiet=True)
    assert [result.status for result in results] == ["done", "done", "done"]
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        data = sum(info.nbytes for info in read_header(shard).tensors.values())
        assert read[str(shard)] == data, shard.name  # every tensor byte once, not once per job
    for name in names:
        assert _shards(tmp_path / "runs" / name) == _single(base, adapters[name], tmp_path / "single" / name)


def test_dry_run_plans_every_job_and_writes_nothing(
    models: Callable[[str], Base], adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = models("llama-bf16").path
    batch = _write_batch(
        tmp_path / "batch.yaml",
        {
            "defaults": {"base": str(base), "output": "runs/{name}"},
            "jobs": [{"name": "a", "adapters": [str(adapters["attention"])]}, {"name": "b", "adapters": ["nowhere"]}],
        },
    )
    assert main(["run", str(batch), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "1 planned, 1 failed" in out and "tensors merged" in out and "adapter folder not found" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"jobs": [{"name": "a", "base": "b", "adapters": ["x"], "output": "o", "wieght": 1}]},
            "jobs[0] (a): unknown key 'wieght'",
        ),
        (
            {
                "jobs": [
                    {"name": "a", "base": "b", "adapters": ["x"], "output": "o"},
                    {"name": "a", "base": "b", "adapters": ["x"], "output": "p"},
                ]
            },
            "jobs[0] and jobs[1] have the same name 'a'",
        ),
        (
            {
                "defaults": {"base": "b", "output": "same"},
                "jobs": [{"name": "a", "adapters": ["x"]}, {"name": "b", "adapters": ["y"]}],
            },
            "have the same output",
        ),
        ({"jobs": [{"base": "b", "adapters": ["x"], "output": "o"}]}, "jobs[0]: missing key 'name'"),
        ({"jobs": [], "defaults": {}}, "'jobs' must be a non-empty list"),
        ({"jobs": [{"name": "a"}], "default": {}}, "unknown key 'default' (did you mean 'defaults'?)"),
        ({"jobs": [{"name": "a", "base": "b", "adapters": ["x"]}]}, "jobs[0] (a): missing key 'output'"),
    ],
)
def test_batch_errors_name_the_job_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: dict[str, object], message: str
) -> None:
    batch = _write_batch(tmp_path / "batch.yaml", body)
    assert main(["run", str(batch)]) == 2
    assert message in capsys.readouterr().err


def test_only_names_a_known_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = _write_batch(
        tmp_path / "batch.yaml", {"jobs": [{"name": "a", "base": "b", "adapters": ["x"], "output": "o"}]}
    )
    assert main(["run", str(batch), "--only", "z"]) == 2
    assert "--only names no job called 'z' (jobs: a)" in capsys.readouterr().err


def test_running_a_batch_again_skips_finished_jobs_and_finishes_the_others(
    models: Callable[[str], Base], adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = models("llama-bf16").path
    names = ["attention", "mlp", "all"]
    batch = _one_adapter_each(tmp_path, base, adapters, names)
    assert main(["run", str(batch), "--quiet", "--only", "attention"]) == 0
    assert main(["run", str(batch), "--quiet", "--only", "mlp"]) == 0
    finished = _shards(tmp_path / "runs" / "mlp")
    lost = sorted(finished)[1]
    (tmp_path / "runs" / "mlp" / lost).unlink()  # as if the run had died before this shard
    capsys.readouterr()
    assert main(["run", str(batch), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert rows == {"attention": "up", "mlp": "done", "all": "done"}
    assert _shards(tmp_path / "runs" / "mlp") == finished
    assert _shards(tmp_path / "runs" / "all") == _single(base, adapters["all"], tmp_path / "single")
