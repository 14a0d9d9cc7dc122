"""The command line and YAML contract, the Python API, and the progress bar."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import shardmerge
from conftest import Base, save_adapter
from shardmerge.cli import main


@pytest.fixture
def setup(models: Callable[[str], Base], tmp_path: Path) -> tuple[Path, Path, Path]:
    base = models("llama-bf16").path
    first = save_adapter(models("llama-bf16"), tmp_path / "a1", seed=7, r=4, target_modules=["q_proj", "o_proj"])
    second = save_adapter(models("llama-bf16"), tmp_path / "a2", seed=8, r=2, target_modules=["v_proj"])
    return base, first, second


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_yaml_job_equals_the_merge_command(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, first, second = setup
    assert main(["merge", str(base), str(first), str(second), "-o", str(tmp_path / "cli"), "--weights", "1,0.5"]) == 0
    out = capsys.readouterr()
    assert "merged 2 adapters" in out.out
    assert "tensors merged" in out.out
    assert "merging" in out.err  # the progress bar, on stderr

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    # Relative paths in a job file are relative to the file.
    (jobs / "job.yaml").write_text(
        f"base: {base}\n"
        "adapters:\n"
        "  - path: ../a1\n"
        "  - {path: ../a2, weight: 0.5}\n"
        "output: ../yaml-out\n"
        "dtype: bfloat16\n"
        "device: cpu\n"
    )
    assert main(["run", str(jobs / "job.yaml"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert shards(tmp_path / "yaml-out") == shards(tmp_path / "cli")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base: b\nadpaters: [a]\noutput: o\n", "unknown key 'adpaters' (did you mean 'adapters'?)"),
        ("base: b\nadapters:\n  - path: a\n    wieght: 2\noutput: o\n", "unknown key 'adapters.0.wieght'"),
        ("base: b\nadapters: [a]\n", "missing key 'output'"),
        ("adapters: [a]\noutput: o\n", "missing key 'base'"),
        ("base: b\nadapters: [a]\noutput: o\ndtype: int8\n", "dtype: Input should be 'auto', 'base', 'bfloat16'"),
        ("base: b\nadapters: [a]\noutput: o\ndevice: tpu\n", "device: Value error, must be auto, cpu, cuda or cuda:N"),
        ("base: b\nadapters: []\noutput: o\n", "adapters: List should have at least 1 item"),
        ("- just\n- a list\n", "a job must be a mapping"),
        ("base: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_job_files_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"shardmerge: error: {job}: ")
    assert expected in err
    assert "\n" not in err


def test_weights_must_match_adapters(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, first, second = setup
    assert main(["plan", str(base), str(first), str(second), "--weights", "1"]) == 2
    assert "--weights has 1 values for 2 adapters" in capsys.readouterr().err


def test_plan_lists_shards_and_writes_nothing(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, first, second = setup
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["plan", str(base), str(first), str(second), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert [shard["name"] for shard in plan["shards"]] == sorted(p.name for p in base.glob("*.safetensors"))
    merged = {t["name"]: t["ops"] for shard in plan["shards"] for t in shard["tensors"] if t["ops"]}
    assert sorted(merged) == sorted(
        f"model.layers.{layer}.self_attn.{proj}.weight" for layer in (0, 1) for proj in ("q_proj", "o_proj", "v_proj")
    )
    assert all(op["rule"] == "exact" for ops in merged.values() for op in ops)
    assert plan["peak_memory_bytes"] > 0
    gpu = plan["gpu_memory"]
    assert 0 < gpu["locked_bytes"] < gpu["host_bytes"] and gpu["device_bytes"] > 0

    assert main(["plan", str(base), str(first)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight  <- [0] lora linear" in text
    assert "memory  about" in text and "of working memory on the CPU" in text
    assert "        on a GPU: about " in text and " of it locked) and " in text and " of GPU memory" in text
    assert "total   " in text


def test_python_api_takes_the_job_model(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, first, _ = setup
    job = shardmerge.MergeJob(base=str(base), adapters=[{"path": str(first)}], output=str(tmp_path / "api"))
    plan = shardmerge.plan(job)
    assert sum(shard.merged for shard in plan.shards) == 4
    report = shardmerge.merge(job)
    assert report.tensors_merged == 4
    assert (tmp_path / "api" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "api" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan.tensor_bytes


def run_console(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("shardmerge")
    return subprocess.run([str(script), *args], capture_output=True, text=True, check=False)


def test_console_script_exit_codes_and_debug(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_console("merge", str(missing), str(missing), "-o", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"shardmerge: error: {missing}: base model folder not found "
        "(give the folder that holds config.json and the .safetensors shards)"
    )
    debug = run_console("merge", str(missing), str(missing), "-o", str(tmp_path / "o"), "--debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


def test_importing_shardmerge_does_not_import_torch() -> None:
    code = "import sys, shardmerge; shardmerge.plan; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert result.stdout.strip() == "False"


def test_the_public_functions_survive_importing_every_module() -> None:
    """A subpackage named like a public function (a folder ``plan/``) would replace
    ``shardmerge.plan`` as soon as anything imported it."""
    for module in pkgutil.walk_packages(shardmerge.__path__, "shardmerge."):
        if module.name != "shardmerge.__main__":
            importlib.import_module(module.name)
    assert inspect.isfunction(shardmerge.plan)
    assert inspect.isfunction(shardmerge.merge)


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_the_example_job_files_are_valid(example: Path) -> None:
    from shardmerge.config import load_job_file

    jobs = load_job_file(example).jobs
    assert jobs and all(job.output and job.adapters for job in jobs)


def test_output_to_a_closed_pipe_ends_quietly(setup: tuple[Path, Path, Path]) -> None:
    base, first, _ = setup
    script = Path(sys.executable).with_name("shardmerge")
    for args in (["plan", str(base), str(first)], ["plan", str(base), str(first), "--json"]):
        process = subprocess.Popen([str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader is gone before the first line: every write fails
        stderr = process.stderr.read().decode()
        process.wait()
        assert stderr == "", stderr
        assert process.returncode == 128 + signal.SIGPIPE


def test_python_dash_m_runs_the_command(setup: tuple[Path, Path, Path]) -> None:
    base, first, _ = setup
    module = subprocess.run(
        [sys.executable, "-m", "shardmerge", "plan", str(base), str(first)], capture_output=True, text=True
    )
    console = run_console("plan", str(base), str(first))
    assert module.returncode == console.returncode == 0
    assert module.stdout == console.stdout and "total   " in module.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "shardmerge", "verify", "/nonexistent"], capture_output=True, text=True
    )
    assert missing.returncode == 1 and missing.stderr.startswith("shardmerge: error: /nonexistent")
