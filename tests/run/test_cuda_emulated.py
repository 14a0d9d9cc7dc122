"""The CUDA path's choreography on the CPU (``SHARDMERGE_EMULATE_CUDA``, see run/emulated.py):
the very code of ``device.Staged`` with its locked buffers, read-ahead thread, copy stream,
events and device selection, and copies that land late, so that a missing wait writes wrong
bytes. The oracle is the CPU merge of the same inputs, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import shardmerge
from conftest import (
    edit_tensor,
    forget_shard,
    llama_config,
    read_output,
    save_adapter,
    save_base,
    shard_bytes,
)
from merge_cases import CASES, llama_case
from shardmerge.batch import run_jobs
from shardmerge.cli import main
from shardmerge.config import NamedJob
from shardmerge.errors import VerifyError
from shardmerge.planning import planner
from shardmerge.run import device as devices
from shardmerge.run.emulated import VARIABLE, emulated_runtime
from shardmerge.verify import _within_tolerance, verify

pytestmark = pytest.mark.cuda_emulated


@pytest.fixture
def emulate(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def set_to(spec: str) -> None:
        monkeypatch.setenv(VARIABLE, spec)

    return set_to


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_emulated_gpu_merge_writes_the_cpu_merges_bytes(
    case: str, tmp_path: Path, emulate: Callable[[str], None], small_blocks: None
) -> None:
    base, adapters = CASES[case](tmp_path)
    args = {"base": str(base), "adapters": [str(a) for a in adapters]}
    shardmerge.merge(**args, output=str(tmp_path / "cpu"), device="cpu")
    emulate("1")
    report = shardmerge.merge(**args, output=str(tmp_path / "gpu"), device="auto")
    runtime = emulated_runtime()
    assert runtime is not None
    assert report.device == "cuda:0"
    assert shard_bytes(tmp_path / "gpu") == shard_bytes(tmp_path / "cpu")
    journal = json.loads((tmp_path / "gpu" / ".shardmerge" / "journal.json").read_text())
    assert journal["device"] == "cuda:0"
    assert {record["device"] for record in journal["shards"].values()} == {"cuda:0"}
    # The host waited for single events, and for the whole device once, at the end.
    assert runtime.device_waits == 1
    assert runtime.event_waits > len(journal["shards"])
    assert runtime.touched == {0}
    assert not runtime.registered  # every locked buffer given back to the driver
    plan = shardmerge.plan(**args)
    assert 0 < report.device_bytes == runtime.peak_bytes <= plan.gpu_memory.device_bytes
    assert 0 < report.locked_bytes <= plan.gpu_memory.locked_bytes
    verify(tmp_path / "gpu", recompute=100)


def test_a_batch_shares_its_base_reads_on_an_emulated_gpu(
    tmp_path: Path, emulate: Callable[[str], None], small_blocks: None
) -> None:
    """Several jobs on one base, one read of each base shard: segments uploaded for each job's
    merge, the same bytes as each job merged alone on the CPU."""
    base, adapters = llama_case(tmp_path)
    for adapter in adapters:
        shardmerge.merge(
            base=str(base), adapters=[str(adapter)], output=str(tmp_path / "cpu" / adapter.name), device="cpu"
        )
    emulate("1")
    jobs = [
        NamedJob(name=a.name, base=str(base), adapters=[str(a)], output=str(tmp_path / "gpu" / a.name))
        for a in adapters
    ]
    results = run_jobs(jobs, quiet=True)
    assert all(result.error is None for result in results), results
    for adapter in adapters:
        assert shard_bytes(tmp_path / "gpu" / adapter.name) == shard_bytes(tmp_path / "cpu" / adapter.name)


def test_cuda_n_touches_no_other_device(tmp_path: Path, emulate: Callable[[str], None], small_blocks: None) -> None:
    """Locked buffers, the read-ahead thread's copies, the streams: all on device 1."""
    base, adapters = llama_case(tmp_path)
    emulate("devices=2")
    report = shardmerge.merge(base=str(base), adapters=[str(adapters[0])], output=str(tmp_path / "o"), device="cuda:1")
    runtime = emulated_runtime()
    assert runtime is not None
    assert report.device == "cuda:1"
    assert runtime.touched == {1}


def test_locked_memory_stays_bounded_for_ops_that_need_a_whole_tensor(
    tmp_path: Path, emulate: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRA on the embedding merges it whole; with buffers of at most 4 KiB locked, that
    block's buffers stay pageable, and locked memory is at most five such buffers (two read
    ahead, three outputs), whatever the tensor's size. The bytes are the CPU's."""
    base, adapters = llama_case(tmp_path)
    monkeypatch.setattr(devices, "PINNED_BUFFER_BYTES", 4096)
    monkeypatch.setattr(planner, "PINNED_BUFFER_BYTES", 4096)
    args = {"base": str(base), "adapters": [str(adapters[1])]}
    shardmerge.merge(**args, output=str(tmp_path / "cpu"), device="cpu")
    emulate("1")
    merged = tmp_path / "gpu"
    report = shardmerge.merge(**args, output=str(merged), device="cuda")
    assert shard_bytes(merged) == shard_bytes(tmp_path / "cpu")
    embedding = read_output(merged)["model.embed_tokens.weight"]
    assert embedding.numel() * embedding.element_size() > 4096
    assert 0 < report.locked_bytes <= shardmerge.plan(**args).gpu_memory.locked_bytes <= 5 * 4096


@pytest.mark.parametrize(
    ("spec", "device", "expected"),
    [
        ("memory=4KiB", "cuda", "out of memory on cuda:0: "),
        ("busy=0", "auto", "cuda:0 cannot be used: CUDA error: CUDA-capable device(s) is/are busy or unavailable"),
        ("devices=2", "cuda:2", "device 'cuda:2' requested but only 2 CUDA device(s) exist"),
    ],
)
def test_device_failures_are_one_line(
    spec: str,
    device: str,
    expected: str,
    tmp_path: Path,
    emulate: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, adapters = llama_case(tmp_path)
    emulate(spec)
    output = tmp_path / "o"
    capsys.readouterr()
    code = main(["merge", str(base), str(adapters[0]), "-o", str(output), "--device", device, "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, lines
    assert expected in lines[0]
    if spec.startswith("memory"):  # the tensor that needed the memory, and the way out
        assert ".weight: out of memory on cuda:0: " in lines[0] and "more needed" in lines[0]
        assert "--device cpu" in lines[0]
    assert not output.exists() or not list(output.glob("*.safetensors"))


def test_a_device_number_torch_would_refuse_is_refused_by_the_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["merge", "base", "adapter", "-o", str(tmp_path / "o"), "--device", "cuda:01"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "must be auto, cpu, cuda or cuda:N" in lines[0], lines


class _Precisions(TorchFunctionMode):
    """Notes the float32 matmul precision torch is set to at each product."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in ("addmm_", "addmm", "mm", "matmul", "__matmul__", "bmm", "baddbmm_"):
            matmul = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
            self.seen.add(matmul)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_tf32_set_by_the_caller_is_off_during_a_merge_and_back_on_after(
    device: str, tmp_path: Path, emulate: Callable[[str], None]
) -> None:
    base, adapters = llama_case(tmp_path)
    emulate("1")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a training notebook does
    try:
        with _Precisions() as products:
            shardmerge.merge(base=str(base), adapters=[str(adapters[0])], output=str(tmp_path / "o"), device=device)
        assert products.seen == {("ieee", "ieee")}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_resume_on_another_kind_of_device_is_refused(
    tmp_path: Path, emulate: Callable[[str], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Begun on the CPU, resumed where a GPU is: refused in one line (the output would mix
    two devices' products), resumed with --device cpu, or merged anew on the GPU with
    --restart. Every shard records its device, and verify checks each by its own."""
    base, adapters = llama_case(tmp_path)
    output = tmp_path / "o"
    merge = ["merge", str(base), str(adapters[0]), "-o", str(output), "--quiet"]
    assert main([*merge, "--device", "cpu"]) == 0
    forget_shard(output, 1)
    emulate("1")
    capsys.readouterr()
    assert main(merge) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "this merge began on cpu" in lines[0], lines
    assert "resume with --device cpu, or --restart to merge every shard on cuda:0" in lines[0]
    assert main([*merge, "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main([*merge, "--restart"]) == 0
    assert "of GPU memory at most, " in capsys.readouterr().out
    journal = json.loads((output / ".shardmerge" / "journal.json").read_text())
    assert {record["device"] for record in journal["shards"].values()} == {"cuda:0"}
    assert verify(output, recompute=100).recomputed > 0


class _GpuOrder(TorchFunctionMode):
    """Products summed as a GPU might: the rank's terms added in reverse order, each rounded
    on its own, where the CPU's BLAS adds them in order with fused multiply-adds."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") == "addmm_":
            value, left, right = args
            total = torch.zeros_like(value)
            for k in reversed(range(left.shape[1])):
                total += left[:, k : k + 1] * right[k : k + 1, :]
            return value.add_(total, alpha=(kwargs or {}).get("alpha", 1))
        return func(*args, **(kwargs or {}))


def test_verify_recomputes_a_gpu_merge_within_the_float32_error_of_the_merge(
    tmp_path: Path, emulate: Callable[[str], None]
) -> None:
    """A merge on (emulated) cuda:0 whose products are summed in another order, with half of
    q_proj's rows set to the update's negation, so that base and update nearly cancel there.
    In float32 output its values differ from the CPU's by hundreds of units in their last
    place, where the result is small; verify --recompute (on the CPU) accepts it, because
    the difference stays within the float32 error of the merge relative to the tensor."""
    base = save_base(llama_config(), tmp_path / "base", torch.bfloat16, seed=5)
    adapter = save_adapter(base, tmp_path / "adapter", seed=6, r=8, lora_alpha=16, target_modules=["q_proj"])
    name = "model.layers.0.self_attn.q_proj.weight"
    factors = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    update = 2.0 * factors[f"{prefix}.lora_B.weight"].float() @ factors[f"{prefix}.lora_A.weight"].float()
    weight = read_output(base.path)[name].clone()
    half = weight.shape[0] // 2
    weight[:half] = (-update[:half]).to(torch.bfloat16)
    edit_tensor(base.path, name, weight)
    args = {"base": str(base.path), "adapters": [str(adapter)], "dtype": "float32"}
    shardmerge.merge(**args, output=str(tmp_path / "cpu"), device="cpu")
    emulate("1")
    with _GpuOrder():
        shardmerge.merge(**args, output=str(tmp_path / "gpu"), device="cuda")
    cpu, gpu = read_output(tmp_path / "cpu")[name], read_output(tmp_path / "gpu")[name]
    ulps = ((gpu - cpu).abs() / torch.finfo(torch.float32).eps / cpu.abs().clamp(min=1e-30))[:half]
    assert ulps.max() > 100  # far more than one unit in the last place where they cancel
    report = verify(tmp_path / "gpu", recompute=100)
    assert report.recomputed > 0
    journal = json.loads((tmp_path / "gpu" / ".shardmerge" / "journal.json").read_text())
    assert all(record["device"] == "cuda:0" for record in journal["shards"].values())
    # A GPU merge that lost one block's update is not within the tolerance.
    with _DropsAnUpdate():
        shardmerge.merge(**args, output=str(tmp_path / "wrong"), device="cuda")
    with pytest.raises(VerifyError) as failed:
        verify(tmp_path / "wrong", recompute=100)
    (problem,) = failed.value.problems
    assert "differs from a fresh merge of the same inputs" in str(problem)


class _DropsAnUpdate(TorchFunctionMode):
    """A broken GPU: the first product of the merge is never added."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") == "addmm_" and not self.dropped:
            self.dropped = True
            return args[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("found", "expected", "dtype", "within"),
    [
        ([-1.0], [-1.0078125], torch.bfloat16, True),  # one unit below, measured at the larger
        ([-1.0, 8.0], [-1.015625, 8.0], torch.bfloat16, False),  # two units, and nothing cancels
        ([0.0, 1.0], [-0.0, 1.0], torch.float8_e4m3fn, True),  # +0 and -0
        ([0.5, 1.0], [0.5625, 1.0], torch.float8_e4m3fn, True),  # neighbouring codes
        ([0.5, 1.0], [0.625, 1.0], torch.float8_e4m3fn, False),  # two codes apart
        ([448.0], [float("nan")], torch.float8_e4m3fn, False),  # the NaN code beside 448's
        ([float("inf"), 1.0, 5.0], [float("inf"), 1.0, 1.0], torch.float16, False),  # an Inf from the base
        ([float("nan"), 1.0, 5.0], [float("nan"), 1.0, 5.0039], torch.float16, True),  # a NaN from the base
        ([float("nan"), 1.0], [2.0, 1.0], torch.float16, False),
    ],
)
def test_the_gpu_tolerance(found: list[float], expected: list[float], dtype: torch.dtype, within: bool) -> None:
    values = (torch.tensor(found).to(dtype), torch.tensor(expected).to(dtype))
    assert _within_tolerance(*values, _Plain()) is within  # type: ignore[arg-type]


class _Plain:
    """A tensor plan with no quantization, as ``_within_tolerance`` reads one."""

    quant = None
    dtype = "BF16"
    src_dtype = "BF16"
    combined = False


class _Combined(_Plain):
    combined = True


def test_a_combined_tensor_may_keep_a_few_values_on_the_other_side_of_a_threshold() -> None:
    expected = torch.linspace(-1, 1, 8192)
    found = expected.clone()
    found[:2] = 0.0  # an update one side of a threshold here, the other side there: 2 of 8192
    assert _within_tolerance(found, expected, _Combined())  # type: ignore[arg-type]
    assert not _within_tolerance(found, expected, _Plain())  # type: ignore[arg-type]
    found[:3] = 0.0  # more than one in 4096
    assert not _within_tolerance(found, expected, _Combined())  # type: ignore[arg-type]
