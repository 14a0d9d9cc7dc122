"""``--combine`` through the rest of the tool: a resumed run, a batch's shared pass and the
cluster's tasks give the same bytes as one uninterrupted merge; verify recomputes combined
tensors; the plan says each tensor's passes; the journal names a changed combination; and
what a combination is not defined on is refused in the planner."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import shardmerge
from conftest import Base, forget_shard, llama_config, read_output, save_adapter, save_base, shard_bytes
from fp8_checkpoints import fine_grained, quantize_checkpoint
from merge_cases import _fp8
from shardmerge.batch import run_jobs
from shardmerge.cli import main
from shardmerge.config import build_job, load_job_file
from shardmerge.errors import JobConfigError, PlanError
from shardmerge.output.journal import describe_changes
from shardmerge.planning.planner import build_plan
from shardmerge.run.emulated import VARIABLE, emulated_runtime
from shardmerge.verify import verify

DARE = ["--combine", "dare_ties", "--density", "0.5,0.4,0.6", "--seed", "3"]


@pytest.fixture(scope="module")
def inputs(models: Callable[[str], Base], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    base = models("llama-bf16")  # in several shards
    root = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "v_proj", "down_proj"], ["q_proj", "k_proj", "down_proj"], ["q_proj", "up_proj"]]
    return base.path, [
        save_adapter(base, root / str(i), seed=20 + i, r=4, target_modules=modules) for i, modules in enumerate(targets)
    ]


def _merge(base: Path, adapters: list[Path], out: Path, *flags: str) -> dict[str, bytes]:
    assert main(["merge", str(base), *map(str, adapters), "-o", str(out), "--quiet", *flags]) == 0
    return shard_bytes(out)


def test_a_resumed_combination_gives_the_uninterrupted_bytes(inputs, tmp_path: Path) -> None:
    base, adapters = inputs
    whole = _merge(base, adapters, tmp_path / "whole", *DARE)
    assert len(whole) >= 2
    out = tmp_path / "resumed"
    _merge(base, adapters, out, *DARE)
    for number in (len(whole) - 1, 0):
        forget_shard(out, number)
    assert _merge(base, adapters, out, *DARE) == whole
    assert verify(out, recompute=100).recomputed >= 10  # dare_ties, drawn again from the journal's job


def test_a_changed_combination_is_named_and_refused(inputs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapters = inputs
    out = tmp_path / "out"
    _merge(base, adapters, out, *DARE)
    forget_shard(out, 0)
    capsys.readouterr()
    assert main(["merge", str(base), *map(str, adapters), "-o", str(out), "--quiet", *DARE[:-1], "4"]) != 0
    assert "combine dare_ties changed: seed" in capsys.readouterr().err
    assert main(["merge", str(base), *map(str, adapters), "-o", str(out), "--quiet"]) != 0
    assert "combine changed from dare_ties to linear" in capsys.readouterr().err


def test_a_batch_combines_each_job_as_its_own_merge(inputs, tmp_path: Path) -> None:
    base, adapters = inputs
    jobs = [
        {"name": "ties", "adapters": [str(a) for a in adapters], "combine": "ties", "density": 0.4},
        {"name": "crumbs", "adapters": [str(a) for a in adapters[1:]], "combine": "breadcrumbs", "gamma": 0.05},
        {"name": "linear", "adapters": [str(adapters[0])]},
    ]
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump({"defaults": {"base": str(base), "output": "runs/{name}"}, "jobs": jobs}))
    results = run_jobs(list(load_job_file(batch).jobs), quiet=True)  # one shared pass over the base
    assert [result.status for result in results] == ["done"] * 3
    assert shard_bytes(tmp_path / "runs" / "ties") == _merge(
        base, adapters, tmp_path / "ties", "--combine", "ties", "--density", "0.4"
    )
    crumbs = _merge(base, adapters[1:], tmp_path / "crumbs", "--combine", "breadcrumbs", "--gamma", "0.05")
    assert shard_bytes(tmp_path / "runs" / "crumbs") == crumbs


def test_the_plan_says_each_tensors_passes(inputs, capsys: pytest.CaptureFixture) -> None:
    base, adapters = inputs

    def passes(*flags: str) -> set[int]:
        capsys.readouterr()
        assert main(["plan", str(base), *map(str, adapters), "--json", *flags]) == 0
        plan = json.loads(capsys.readouterr().out)
        return {t["passes"] for shard in plan["shards"] for t in shard["tensors"] if t["ops"]}

    assert passes("--combine", "ties", "--density", "0.5") == {3}
    assert passes(*DARE) == {2}
    assert passes("--combine", "ties") == {1}  # density 1 keeps every update whole
    assert passes() == {1}
    assert main(["plan", str(base), *map(str, adapters), "--combine", "breadcrumbs_ties", "--density", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "combine breadcrumbs_ties: density 0.5 0.5 0.5, gamma 0.01, sign election sum, not normalized" in text
    assert "model.layers.0.self_attn.q_proj.weight  combined from [0] [1] [2] in 3 passes" in text


def _plan(base: Path, adapters: list[Path], **job: object) -> None:
    build_plan(build_job("test", {"base": str(base), "adapters": [str(a) for a in adapters], **job}))


def test_what_a_combination_is_not_defined_on_is_refused(models: Callable[[str], Base], inputs, tmp_path: Path) -> None:
    base, adapters = inputs
    llama = models("llama-bf16")
    dora = save_adapter(llama, tmp_path / "dora", seed=1, r=4, use_dora=True, target_modules=["q_proj"])
    saved = save_adapter(llama, tmp_path / "saved", seed=2, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(PlanError) as refused:
        _plan(base, [adapters[0], dora, saved], combine="ties", density=0.5)
    lines = [problem.one_line() for problem in refused.value.problems]
    assert any("q_proj.weight: adapter 1's" in line and "(DoRA)" in line for line in lines), lines
    assert any("lm_head.weight: adapter 2's" in line and "replaces the tensor whole" in line for line in lines)
    assert all("--combine ties combines additive updates" in line for line in lines)
    with pytest.raises(PlanError) as refused:
        _plan(*_fp8(tmp_path / "fp8"), combine="dare_linear", density=0.5)
    lines = [problem.one_line() for problem in refused.value.problems]
    assert len(lines) == 6 and all("_proj.weight: " in line for line in lines)
    assert all(
        "--combine dare_linear merges into a quantized weight only where it is dequantized" in line for line in lines
    )


def test_a_dequantized_fp8_weight_combines_as_its_float32_values(tmp_path: Path) -> None:
    source = save_base(llama_config(hidden=64), tmp_path / "llama", torch.bfloat16, seed=3)
    fp8 = quantize_checkpoint(source.path, tmp_path / "fp8", fine_grained())
    adapters = [
        save_adapter(fp8.dequantized, tmp_path / str(i), seed=30 + i, r=4, target_modules=["q_proj", "down_proj"])
        for i in range(2)
    ]
    flags = ["--combine", "ties", "--density", "0.3", "--dtype", "float32"]
    _merge(fp8.path, adapters, tmp_path / "from-fp8", *flags)
    _merge(fp8.dequantized.path, adapters, tmp_path / "from-values", *flags)
    ours, values = read_output(tmp_path / "from-fp8"), read_output(tmp_path / "from-values")
    assert set(ours) == set(values)
    for name, value in ours.items():
        assert torch.equal(value, values[name]), name


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"density": 0.5}, "density does not apply to combine: linear"),
        ({"combine": "ties", "gamma": 0.1}, "gamma does not apply to combine: ties"),
        ({"combine": "ties", "seed": 1}, "seed does not apply to combine: ties"),
        ({"combine": "dare_linear", "sign_election": "count"}, "sign_election does not apply"),
        ({"combine": "ties", "density": 0}, "density: Input should be greater than 0"),
        ({"combine": "ties", "density": 1.5}, "density: Input should be less than or equal to 1"),
        ({"combine": "mean"}, "combine: Input should be 'linear', 'ties'"),
        ({"combine": "ties", "density": True}, "density: Value error, must be a number, not true or false"),
        ({"combine": "dare_ties", "seed": True}, "seed: Value error, must be a number, not true or false"),
    ],
)
def test_options_a_method_does_not_take_are_refused(inputs, job: dict, message: str) -> None:
    base, adapters = inputs
    with pytest.raises(JobConfigError, match=message):
        _plan(base, adapters, **job)


def test_densities_on_the_command_line(inputs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, adapters = inputs
    assert main(["merge", str(base), *map(str, adapters), "-o", str(tmp_path / "o"), "--density", "0.5,0.5"]) == 2
    assert "--density has 2 values for 3 adapters" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


@pytest.mark.cuda_emulated
@pytest.mark.parametrize(
    "job", [{"combine": "dare_ties", "density": 0.5, "seed": 3}, {"combine": "breadcrumbs_ties", "density": 0.5}]
)
def test_an_emulated_gpu_combines_as_the_cpu_within_the_plans_device_memory(
    inputs, job: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: None
) -> None:
    base, adapters = inputs
    args = {"base": str(base), "adapters": [str(a) for a in adapters], **job}
    shardmerge.merge(**args, output=str(tmp_path / "cpu"), device="cpu")
    monkeypatch.setenv(VARIABLE, "1")
    report = shardmerge.merge(**args, output=str(tmp_path / "gpu"), device="auto")
    assert report.device == "cuda:0"
    assert shard_bytes(tmp_path / "gpu") == shard_bytes(tmp_path / "cpu")
    runtime = emulated_runtime()
    assert runtime is not None
    assert 0 < runtime.peak_bytes <= shardmerge.plan(**args).gpu_memory.device_bytes


def test_an_update_holding_nan_stops_the_pruning_naming_adapter_and_tensor(
    inputs, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, adapters = inputs
    broken = tmp_path / "broken"
    shutil.copytree(adapters[1], broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(key for key in sorted(tensors) if "k_proj.lora_B" in key)
    tensors[key][3, 1] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    out = tmp_path / "out"
    flags = ["--combine", "ties", "--density", "0.5"]
    assert main(["merge", str(base), str(adapters[0]), str(broken), "-o", str(out), "--quiet", *flags]) != 0
    error = capsys.readouterr().err
    assert f"{broken}/adapter_model.safetensors: model.layers.0.self_attn.k_proj.weight: adapter 1's update" in error
    assert "holds NaN or Inf" in error
    assert not list(out.glob("*.safetensors"))


def test_a_journal_whose_combination_is_not_a_mapping_reads_as_changed() -> None:
    new = {"combine": {"method": "ties", "densities": [0.5]}}
    assert describe_changes({"combine": ["ties"]}, new) == ["combine changed"]
    assert describe_changes({}, new) == ["combine changed from linear to ties"]
