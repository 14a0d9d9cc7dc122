"""Bad inputs: a clear error naming the file and tensor, a non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import Base, save_adapter
from shardmerge.cli import main

ADAPTER_FILE = "adapter_model.safetensors"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(args)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def edit_adapter(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, folder / ADAPTER_FILE, metadata={"format": "pt"})


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def adapter(models: Callable[[str], Base], tmp_path: Path) -> Path:
    base = models("llama-bf16")
    return save_adapter(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def base(models: Callable[[str], Base]) -> Path:
    return models("llama-bf16").path


def test_every_problem_is_reported_at_once_and_nothing_is_written(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = "base_model.model.model.layers."

    def break_three_modules(tensors: dict[str, torch.Tensor]) -> None:
        # unmatched name, shape mismatch, and a rank that disagrees with the config
        for suffix in ("lora_A.weight", "lora_B.weight"):
            tensors[f"{prefix}0.self_attn.q_projx.{suffix}"] = tensors.pop(f"{prefix}0.self_attn.q_proj.{suffix}")
        tensors[f"{prefix}1.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 48)
        tensors[f"{prefix}0.self_attn.v_proj.lora_A.weight"] = torch.randn(2, 32)
        tensors[f"{prefix}0.self_attn.v_proj.lora_B.weight"] = torch.randn(16, 2)

    edit_adapter(adapter, break_three_modules)
    output = tmp_path / "out"

    for command in (["plan"], ["merge", "-o", str(output)]):
        code, lines = run_cli([*command, str(base), str(adapter)], capsys)
        assert code != 0
        assert "4 problems" in lines[0]
        details = "\n".join(lines[1:])
        assert len(lines) == 5
        # PEFT, too, would not load q_projx: the config does not target it
        assert "does not target 1 of the modules the weights hold (e.g. model.layers.0.self_attn.q_projx)" in details
        assert "q_projx.lora_A.weight: no base tensor 'model.layers.0.self_attn.q_projx.weight'" in details
        assert "closest base names: model.layers.0.self_attn.q_proj.weight" in details
        assert "layers.1.self_attn.q_proj.lora_A.weight: shape mismatch" in details
        assert "layers.0.self_attn.v_proj.lora_A.weight: r mismatch: the config gives r=4" in details
        assert all(str(adapter / ADAPTER_FILE) in line for line in lines[1:] if "target_modules" not in line)
    assert not output.exists()


def test_missing_adapter_config(base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (adapter / "adapter_config.json").unlink()
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")], capsys)
    assert code != 0
    assert f"{adapter}: no adapter_config.json in the adapter folder" in "\n".join(lines)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"peft_type": "FANCY"}, "unsupported peft_type 'FANCY'"),
        ({"peft_type": "VERA"}, "unsupported peft_type 'VERA'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changed the base weights"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is set"),
    ],
)
def test_adapters_we_cannot_merge_are_refused(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, expected: str
) -> None:
    edit_config(adapter, **changes)
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")], capsys)
    assert code != 0
    assert expected in "\n".join(lines)
    assert str(adapter / "adapter_config.json") in "\n".join(lines)
    assert not (tmp_path / "out").exists()


def test_adapter_from_another_model_is_a_shape_mismatch(
    models: Callable[[str], Base], base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_adapter(models("gpt2-bf16"), tmp_path / "gpt2-adapter", seed=1, r=4, target_modules=["c_attn"])
    code, lines = run_cli(["plan", str(base), str(other)], capsys)
    assert code != 0
    assert "no base tensor 'transformer.h.0.attn.c_attn.weight'" in "\n".join(lines)


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:18] = b"not json!!"
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def huge_header_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (corrupt_header, "header is not valid JSON"),
        (truncate, "file is truncated: tensor data ends at byte"),
        (huge_header_length, "does not fit in a"),
    ],
)
@pytest.mark.parametrize("where", ["base", "adapter"])
def test_damaged_safetensors_files(
    base: Path,
    adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    expected: str,
    where: str,
) -> None:
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    victim = sorted(copy.glob("*.safetensors"))[-1] if where == "base" else adapter / ADAPTER_FILE
    damage(victim)
    output = tmp_path / "out"
    code, lines = run_cli(["merge", str(copy), str(adapter), "-o", str(output)], capsys)
    assert code != 0
    text = "\n".join(lines)
    assert f"{victim}" in text and expected in text
    assert "Traceback" not in text
    assert not output.exists()


def test_foreign_non_empty_output_is_refused(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(output)], capsys)
    assert code != 0
    assert "output folder is not empty and was not written by shardmerge" in lines[0]
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]


def test_output_of_another_job_is_refused_and_the_same_job_resumes(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert run_cli(["merge", str(base), str(adapter), "-o", str(output), "--quiet"], capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in output.glob("*.safetensors")}

    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(output), "--dtype", "float16"], capsys)
    assert code != 0
    assert "output folder holds an earlier merge with other inputs: dtype changed from base to float16" in lines[0]
    assert "--restart" in lines[0]

    assert main(["merge", str(base), str(adapter), "-o", str(output), "--quiet"]) == 0
    assert f"resumed: {len(first)} of {len(first)} shards were already finished" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in output.glob("*.safetensors")} == first


def test_output_cannot_be_the_base(base: Path, adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(base)], capsys)
    assert code != 0
    assert "output" in lines[0]


def test_failed_write_leaves_no_final_file(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert run_cli(["merge", str(base), str(adapter), "-o", str(output), "--quiet"], capsys)[0] == 0
    (output / "model.safetensors.index.json").unlink()
    last = sorted(output.glob("*.safetensors"))[-1]
    last.unlink()
    last.mkdir()  # the shard's rename into place now fails, after its data was written
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(output), "--quiet"], capsys)
    assert code != 0
    assert lines[0].startswith(f"shardmerge: error: {last}")
    assert "I/O error" in lines[0]
    assert last.is_dir()
    assert not (output / "model.safetensors.index.json").exists()


def test_cuda_requested_without_cuda(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert code != 0
    assert "CUDA is not available" in lines[0]


class _Exploit:
    """A pickle that would run code when loaded without the weights-only unpickler."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_pickle_adapter_that_runs_code_is_refused(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (adapter / ADAPTER_FILE).unlink()
    torch.save(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Exploit()}, adapter / "adapter_model.bin"
    )
    code, lines = run_cli(["plan", str(base), str(adapter)], capsys)
    assert code != 0
    assert f"{adapter / 'adapter_model.bin'}: cannot read the checkpoint safely" in "\n".join(lines)
    assert not (tmp_path / "pwned").exists()


def test_legacy_pickle_base_is_refused(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_bytes((base / "config.json").read_bytes())
    torch.save({"w": torch.zeros(2)}, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    code, lines = run_cli(["plan", str(legacy), str(adapter)], capsys)
    assert code != 0
    assert "not a PyTorch zip checkpoint" in "\n".join(lines)


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_gguf_base_is_refused_for_its_root_cause(
    given: str, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """llama.cpp's GGUF, given as its folder or its file: one line naming the file and the way
    out, not a missing safetensors file nor a Hub lookup."""
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    model = folder / "model-Q4_K_M.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")
    base = folder if given == "folder" else model
    code, lines = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")], capsys)
    assert code != 0
    assert lines == [
        f"shardmerge: error: {model}: the base is a GGUF file, which shardmerge does not read (merge into the "
        "model's safetensors release, then convert the merged model to GGUF)"
    ]
    assert not (tmp_path / "out").exists()
