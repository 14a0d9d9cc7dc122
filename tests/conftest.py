"""Tiny real checkpoints and adapters, and PEFT's own merge as the reference.

Bases are built with transformers and saved with save_pretrained; adapters are built with
peft on the same base, every LoRA parameter (B included) drawn at random so that no delta is
zero. The reference is PEFT's merge_and_unload() computed in float32.
"""

from __future__ import annotations

import os

# Tests never reach the real Hub; the loopback server speaks the LFS protocol, not Xet. Set
# before huggingface_hub is imported (by peft and transformers below), which reads it once.
os.environ["HF_HUB_DISABLE_XET"] = "1"

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from shardmerge.planning import planner

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class Base:
    path: Path
    dtype: torch.dtype


def llama_config(layers: int = 2, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def save_base(config: object, folder: Path, dtype: torch.dtype, seed: int = 0, shard_kb: int | None = 24) -> Base:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(folder, **kwargs)
    return Base(folder, dtype)


def load_fp32(folder: Path, model_class: type[PreTrainedModel] | None = None) -> PreTrainedModel:
    return (model_class or AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32)


def save_adapter(
    base: Base,
    folder: Path,
    seed: int,
    dtype: torch.dtype = torch.float32,
    config: PeftConfig | None = None,
    model_class: type[PreTrainedModel] | None = None,
    **lora: object,
) -> Path:
    """A PEFT adapter trained on ``base`` in spirit: its trainable parameters set at random."""
    model = get_peft_model(load_fp32(base.path, model_class), config or LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:  # the frozen base
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.25 * noise.abs())
            elif "ia3_l" in name:
                param.copy_(1 + 0.25 * noise)
            elif "hada_" in name or "lokr_" in name:
                param.copy_(0.3 * noise)  # products of factors: large enough to matter
            else:
                param.copy_(0.05 * noise)
    model.to(dtype).save_pretrained(folder)
    return folder


def peft_reference(
    base: Base, adapters: Sequence[tuple[Path, float]], model_class: type[PreTrainedModel] | None = None
) -> PreTrainedModel:
    """PEFT's merge in float32: each adapter in turn, its scaling multiplied by its weight."""
    model = load_fp32(base.path, model_class)
    for folder, weight in adapters:
        peft_model = PeftModel.from_pretrained(model, folder)
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for name in module.scaling:
                    module.scaling[name] *= weight
        model = peft_model.merge_and_unload()
    return model


def unmerged_logits(base: Base, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """The adapter's own forward pass (PEFT, not merged) in float32: the oracle where PEFT's
    merge itself is wrong, as for adapters on tied embeddings."""
    model = PeftModel.from_pretrained(load_fp32(base.path), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def saved_reference(reference: PreTrainedModel, folder: Path) -> dict[str, torch.Tensor]:
    """The reference as transformers saves it: checkpoint names, whatever the module names."""
    reference.save_pretrained(folder)
    return read_output_like_base(folder)


def assert_matches_saved(output: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    ours = read_output(output)
    assert set(ours) == set(expected), sorted(set(ours) ^ set(expected))
    for name, tensor in ours.items():
        if tensor.is_floating_point():
            assert tensor.dtype == dtype, name
            assert_within_tolerance(name, tensor, expected[name].float())
        else:
            assert torch.equal(tensor, expected[name]), name


def read_output(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``values``' magnitudes (normal range)."""
    _, exponent = torch.frexp(values.float())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float32), exponent - 1 - MANTISSA_BITS[dtype])


def assert_within_tolerance(name: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """One unit in the last place of the output dtype, or 2^-16 of the tensor's RMS where the
    value nearly cancels; ``reference`` is float32."""
    assert ours.shape == reference.shape, name
    expected = reference.to(ours.dtype).float()
    diff = (ours.float() - expected).abs()
    rms = reference.float().pow(2).mean().sqrt()
    tolerance = torch.maximum(ulp(expected, ours.dtype), rms * 2**-16)
    worst = (diff - tolerance).max()
    assert worst <= 0, f"{name}: {int((diff > tolerance).sum())} elements off by up to {diff.max().item():.3g}"


def assert_matches_reference(output: Path, base: Base, reference: PreTrainedModel, dtype: torch.dtype) -> None:
    ours = read_output(output)
    base_tensors = read_output_like_base(base.path)
    assert set(ours) == set(base_tensors), "output tensor names differ from the base"
    state = reference.state_dict()
    for name, tensor in ours.items():
        if tensor.is_floating_point():
            assert tensor.dtype == dtype, name
            assert_within_tolerance(name, tensor, state[name])
        else:
            assert torch.equal(tensor, base_tensors[name]), name


def read_output_like_base(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    return load_file(single) if single.exists() else read_output(folder)


def assert_same_logits(output: Path, reference: PreTrainedModel, dtype: torch.dtype) -> None:
    """The output loads with AutoModelForCausalLM and gives the reference model's logits, the
    reference's weights rounded once to the output dtype."""
    ours = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    rounded = {name: value.to(dtype).float() for name, value in reference.state_dict().items()}
    reference.load_state_dict(rounded)
    ids = torch.arange(24).reshape(2, 12) % reference.config.vocab_size
    with torch.no_grad():
        got, want = ours(ids).logits, reference.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Base]:
    """Bases by name, built once per session."""
    root = tmp_path_factory.mktemp("bases")
    builders = {
        "llama-bf16": lambda path: save_base(llama_config(), path, torch.bfloat16),
        "llama-fp32": lambda path: save_base(llama_config(), path, torch.float32, seed=1, shard_kb=None),
        "gpt2-bf16": lambda path: save_base(gpt2_config(), path, torch.bfloat16, seed=2),
    }
    built: dict[str, Base] = {}

    def get(name: str) -> Base:
        if name not in built:
            built[name] = builders[name](root / name)
        return built[name]

    return get


def save_in_two_shards(tensors: dict[str, torch.Tensor], folder: Path, apart: set[str], owner: str) -> None:
    """Save ``tensors`` in two shards with their index, by name, those ``apart`` (a weight's
    scales, say) in the other shard than the tensors named ``owner...`` (the weight)."""
    names = sorted(n for n in tensors if n not in apart)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_half = 0 if any(n.startswith(owner) for n in halves[0]) else 1
    halves[1 - weight_half] += sorted(apart)
    weight_map = {}
    for index, half in enumerate(halves):
        shard = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in half}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def forget_shard(output: Path, number: int) -> None:
    """Delete shard ``number`` of a finished merge and its journal entry: a run that stopped
    before writing it."""
    shard = sorted(output.glob("*.safetensors"))[number]
    journal_path = output / ".shardmerge" / "journal.json"
    journal = json.loads(journal_path.read_text())
    del journal["shards"][shard.name]
    journal["complete"] = False
    journal_path.write_text(json.dumps(journal))
    shard.unlink()


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.glob("*.safetensors")}


def merge_broken_copy(
    base: Path, adapter: Path, change: Callable[[Path, dict], None], folder: Path, *options: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A copy of ``base`` in ``folder``, changed by ``change`` (given the copy and its config,
    which is written back), merged with ``adapter`` by the command line: the finished
    process and its output folder."""
    broken = folder / "broken"
    shutil.copytree(base, broken)
    config = json.loads((broken / "config.json").read_text())
    change(broken, config)
    (broken / "config.json").write_text(json.dumps(config))
    output = folder / "out"
    command = [str(Path(sys.executable).with_name("shardmerge")), "merge", str(broken), str(adapter), "-o", str(output)]
    return subprocess.run([*command, *options], capture_output=True, text=True), output


def assert_refused(done: subprocess.CompletedProcess[str], message: str, output: Path) -> None:
    """A merge that failed, saying ``message``, with no shard written."""
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert not output.exists() or not any(output.iterdir())


def edit_tensor(folder: Path, name: str, value: torch.Tensor | None) -> None:
    """In the sharded checkpoint ``folder``: remove tensor ``name``, or store ``value`` under
    it (a new one in the shard of its module's ``weight_packed``)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shard = folder / weight_map.get(name, weight_map.get(f"{name.rpartition('.')[0]}.weight_packed", ""))
    tensors = load_file(shard)
    if value is None:
        del tensors[name], weight_map[name]
    else:
        tensors[name] = value
        weight_map[name] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 96 values (and packed blocks of 128): every merged tensor spans many blocks, so the read-ahead thread,
    the two buffers it alternates and the events between them all come into play."""
    monkeypatch.setattr(planner, "MERGE_BLOCK_ELEMENTS", 3 * 32)
    monkeypatch.setattr(planner, "PACKED_BLOCK_ELEMENTS", 4 * 32)
