"""Packed bases: MXFP4 (gpt-oss's experts) and compressed-tensors pack-quantized integers
(INT4 and INT8, symmetric and asymmetric, per group and per channel). Dequantized outputs
against PEFT's merge on the dequantized model, requantized outputs against the formats'
reference quantizers applied to that merge, the fixtures against the formats' libraries,
and the bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, GptOssForCausalLM, Mxfp4Config

import shardmerge
from conftest import (
    assert_matches_saved,
    assert_refused,
    assert_same_logits,
    edit_tensor,
    forget_shard,
    llama_config,
    merge_broken_copy,
    peft_reference,
    read_output,
    read_output_like_base,
    save_adapter,
    save_base,
    saved_reference,
    shard_bytes,
)
from packed_checkpoints import (
    LEFT_16_BIT,
    PackedBase,
    fused_parts,
    gpt_oss_config,
    int_checkpoint,
    int_config,
    library_int_values,
    library_nvfp4_values,
    mxfp4_checkpoint,
    nvfp4_checkpoint,
    nvfp4_config,
    ours_int,
    reference_int,
    reference_mxfp4,
    reference_nvfp4,
    shared_global_scales,
)
from planning.test_architectures import olmoe_config
from shardmerge.codecs import read_quantization
from shardmerge.formats.dtypes import TORCH_DTYPES
from shardmerge.run.codecs.int_packed import int_dequantize, int_pack, int_quantize, int_values, zero_rows
from shardmerge.run.codecs.mxfp4 import mxfp4_values
from shardmerge.run.codecs.nvfp4 import nvfp4_values
from shardmerge.verify import verify

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))


def _odd_llama() -> object:
    """81 intermediate features: gate and up scales of an odd byte count of bfloat16, after
    which no int32 tensor could stay aligned: new scales are found in a first pass instead."""
    config = llama_config(hidden=64)
    config.intermediate_size = 81
    return config


# name -> (model config, quantization_config or None for MXFP4)
BASES: dict[str, tuple[Callable[[], object], dict[str, Any] | None]] = {
    "gpt-oss-mxfp4": (gpt_oss_config, None),
    "olmoe-int4": (olmoe_config, int_config(4, symmetric=True, group=8)),
    "olmoe-int4-asym": (olmoe_config, int_config(4, symmetric=False, group=8)),
    "llama-int8-channel-asym": (_odd_llama, int_config(8, symmetric=False, group=None)),
    "llama-nvfp4": (llama_config, nvfp4_config()),
}


@pytest.fixture(scope="session")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], PackedBase]:
    """Packed bases by name, built once per session."""
    root = tmp_path_factory.mktemp("packed")
    built: dict[str, PackedBase] = {}

    def get(name: str) -> PackedBase:
        if name not in built:
            config, quantization = BASES[name]
            source = save_base(config(), root / f"{name}-bf16", torch.bfloat16, seed=3)
            folder = root / name
            if quantization is None:
                built[name] = mxfp4_checkpoint(source.path, folder)
            elif quantization["format"] == "nvfp4-pack-quantized":
                built[name] = nvfp4_checkpoint(source.path, folder)
            else:
                built[name] = int_checkpoint(source.path, folder, quantization)
        return built[name]

    return get


def _adapter(base: PackedBase, folder: Path, experts: list[str] | None = None) -> Path:
    """LoRA on attention and on the fused expert parameters (PEFT's ``target_parameters``),
    on the dequantized model; for the dense Llama, on every Linear but ``o_proj``."""
    if "llama" in base.path.name:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    else:
        parameters = [f"mlp.experts.{name}" for name in experts or ["gate_up_proj", "down_proj"]]
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=parameters)
    return save_adapter(base.dequantized, folder, seed=31, config=config)


def _stored(base: PackedBase, name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of quantized weight ``name`` (its model name) in ``base``."""
    tensors = read_output(base.path)
    if base.fmt.packing == "mxfp4":
        return {"blocks": tensors[f"{name}_blocks"], "scales": tensors[f"{name}_scales"]}
    module = name.removesuffix(".weight")
    return {
        key: tensors[f"{module}.{key}"]
        for key in ("weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale")
        if f"{module}.{key}" in tensors
    }


# --- the fixtures, against the formats' own libraries -------------------------------------


@pytest.mark.parametrize("name", sorted(BASES))
def test_fixtures_are_what_the_reference_quantizers_write_and_read_back_as_the_libraries_do(
    name: str, packed: Callable[[str], PackedBase]
) -> None:
    base = packed(name)
    source = read_output_like_base(base.path.with_name(f"{name}-bf16"))
    dequantized = read_output_like_base(base.dequantized.path)
    assert base.quantized
    for weight in base.quantized:
        stored = _stored(base, weight)
        if base.fmt.packing == "mxfp4":
            experts, inputs, outputs = source[weight].shape
            rows = source[weight].float().transpose(1, 2).reshape(-1, inputs)
            blocks, scales = reference_mxfp4(rows)
            assert torch.equal(stored["blocks"].reshape(blocks.shape), blocks), weight
            assert torch.equal(stored["scales"].reshape(scales.shape), scales), weight
            ours = mxfp4_values(torch.empty(rows.shape), blocks, scales)
            assert torch.equal(ours.view(experts, outputs, inputs).transpose(1, 2), dequantized[weight]), weight
            continue
        if base.fmt.packing == "nvfp4":
            scales = shared_global_scales({w: source[w].float() for w in base.quantized})
            expected = reference_nvfp4(source[weight].float(), scales[weight])
            assert stored.keys() == expected.keys()
            for key, value in expected.items():
                assert torch.equal(stored[key].view(torch.uint8), value.view(torch.uint8)), (weight, key)
            ours = nvfp4_values(torch.empty(source[weight].shape), *stored.values())
            assert torch.equal(ours, library_nvfp4_values(expected)), weight
            assert torch.equal(ours, dequantized[weight]), weight
            continue
        expected = reference_int(source[weight].float(), base.quantization)
        assert stored.keys() == expected.keys() - {"weight_shape"}
        for key, value in ours_int(source[weight].float(), base.fmt).items():
            assert torch.equal(value, expected[key]), (weight, key)
        rows, cols = source[weight].shape
        zero = stored.get("weight_zero_point")
        ours = int_dequantize(
            torch.empty(rows, cols),
            int_values(stored["weight_packed"], base.fmt.bits, cols),
            stored["weight_scale"],
            None if zero is None else zero_rows(zero, base.fmt.bits, rows),
        )
        assert torch.equal(ours, library_int_values(expected, base.quantization)), weight
        assert torch.equal(ours, dequantized[weight]), weight


def test_the_mxfp4_fixture_loads_through_transformers_as_its_dequantized_values(
    packed: Callable[[str], PackedBase],
) -> None:
    base = packed("gpt-oss-mxfp4")
    model = GptOssForCausalLM.from_pretrained(base.path, quantization_config=Mxfp4Config(dequantize=True))
    state = model.state_dict()
    expected = read_output_like_base(base.dequantized.path)
    for weight in base.quantized:
        assert torch.equal(state[weight].float(), expected[weight]), weight


def test_the_nvfp4_fixture_and_a_merge_kept_in_nvfp4_load_through_transformers(
    packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    """transformers decompresses both (compressed-tensors, in bfloat16) into the values they
    stand for: the fixture's dequantized copy, and the merge's own bytes read by the library."""
    base = packed("llama-nvfp4")
    adapter = _adapter(base, tmp_path / "adapter")
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    ours = read_output(output)
    expected = read_output_like_base(base.dequantized.path)
    for folder, values in ((base.path, expected), (output, None)):
        config = CompressedTensorsConfig(run_compressed=False)
        state = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).state_dict()
        for weight in base.quantized:
            module = weight.removesuffix(".weight")
            keys = ("weight_packed", "weight_scale", "weight_global_scale")
            value = values[weight] if values else library_nvfp4_values({k: ours[f"{module}.{k}"] for k in keys})
            assert torch.equal(state[weight], value.bfloat16()), (folder.name, weight)


# --- dequantized output: PEFT on the dequantized model is the reference ------------------


def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 256 elements: several to each matrix (an expert's), whole words of packed
    zero points (a transposed MXFP4 expert dequantizes 32 rows at a time, none fewer)."""
    from shardmerge.planning import planner

    monkeypatch.setattr(planner, "PACKED_BLOCK_ELEMENTS", 8 * 32)


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize(("dtype", "blocks"), [("float32", False), ("bfloat16", False), ("float32", True)])
def test_dequantized_output_matches_peft_on_the_dequantized_model(
    name: str,
    dtype: str,
    blocks: bool,
    packed: Callable[[str], PackedBase],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter")
    if blocks:
        _small_blocks(monkeypatch)
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype=dtype)
    reference = peft_reference(base.dequantized, [(adapter, 1.0)])
    expected = saved_reference(reference, tmp_path / "reference")
    ours = read_output(output)
    assert ours.keys() == expected.keys(), "the 16-bit model's names, nothing packed left"
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert_matches_saved(output, expected, getattr(torch, dtype))
    assert_same_logits(output, reference, getattr(torch, dtype))
    assert verify(output, recompute=100, against_base=True).recomputed >= 4


# --- requantized output: the reference quantizer on our float32 merge ---------------------


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("blocks", [False, True])
def test_requantized_output_is_the_reference_quantization_of_the_merge(
    name: str, blocks: bool, packed: Callable[[str], PackedBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept in its format, a merged weight is the reference quantizer's output for the float32
    merge (itself PEFT's, as above); every other tensor is the base's, byte for byte. With
    ``blocks``, in blocks of 8 rows (whole words of packed zero points)."""
    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter", experts=["down_proj"])
    if blocks:
        _small_blocks(monkeypatch)
        plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
        merged = [t for shard in plan.shards for t in shard.tensors if t.ops and t.quant]
        assert merged and all(0 < t.block_rows < t.quant.values[-2] for t in merged if t.quant)
        assert all(t.block_rows % t.quant.format.row_step() == 0 for t in merged if t.quant)
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    follow = {t.scales_follow for shard in plan.shards for t in shard.tensors if t.ops and t.quant}
    # New scales right behind their weight, found as it is written; in the odd Llama's shards
    # they cannot be (alignment), and are found in a first pass over each weight.
    assert follow == ({False} if name == "llama-int8-channel-asym" else {True})
    exact, output = tmp_path / "float32", tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(exact), dtype="float32")
    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    assert {p.name for p in output.iterdir()} == {p.name for p in exact.iterdir()}, "no new scales left beside"
    merged, before = read_output(exact), read_output_like_base(base.dequantized.path)
    ours, theirs = read_output(output), read_output(base.path)
    assert ours.keys() == theirs.keys()
    assert json.loads((output / "config.json").read_text()) == json.loads((base.path / "config.json").read_text())
    changed = [weight for weight in base.quantized if not torch.equal(merged[weight], before[weight])]
    assert 0 < len(changed) < len(base.quantized), "the adapter changes some packed weights and leaves others"
    written = set()
    # NVFP4: the parts of a fused layer share a global scale, so the unmerged parts of a layer
    # whose other parts are merged (k beside q and v, up beside gate) are requantized with it.
    shared = shared_global_scales({w: merged[w] for w in base.quantized}) if base.fmt.packing == "nvfp4" else {}
    siblings = {
        part
        for group in fused_parts(list(base.quantized))
        if shared and set(group) & set(changed)
        for part in group
        if part not in changed
    }
    assert bool(siblings) == (base.fmt.packing == "nvfp4")
    for weight in [*changed, *sorted(siblings)]:
        value = merged[weight]
        stored = _stored(base, weight)
        if base.fmt.packing == "mxfp4":
            inputs = value.shape[1]
            blocks, scales = reference_mxfp4(value.transpose(1, 2).reshape(-1, inputs))
            expected = {f"{weight}_blocks": blocks, f"{weight}_scales": scales}
        elif base.fmt.packing == "nvfp4":
            module = weight.removesuffix(".weight")
            expected = {f"{module}.{key}": t for key, t in reference_nvfp4(value, shared[weight]).items()}
        else:
            module = weight.removesuffix(".weight")
            expected = {f"{module}.{key}": tensor for key, tensor in reference_int(value, base.quantization).items()}
        for name_, tensor in expected.items():
            assert torch.equal(ours[name_].reshape(tensor.shape), tensor), name_
            written.add(name_)
        assert weight in siblings or not all(torch.equal(ours[n], theirs[n]) for n in expected), "not copied"
        assert len(stored) <= len(expected)
    for name_ in theirs.keys() - written:
        if not any(key in name_ for key in ("q_proj", "v_proj", "gate_proj", "down_proj.weight")):
            assert torch.equal(ours[name_], theirs[name_]), name_
    assert report.requantized == len(changed), "the figures are the merged weights'"


# --- bad inputs ---------------------------------------------------------------------------


EXPERTS = "model.layers.0.mlp.experts"
Q = "model.layers.0.self_attn.q_proj"
BAD: dict[str, tuple[str, Callable[[Path, dict[str, Any]], None], str]] = {
    "mxfp4-blocks-without-scales": (
        "gpt-oss-mxfp4",
        lambda folder, config: edit_tensor(folder, f"{EXPERTS}.down_proj_scales", None),
        f"{EXPERTS}.down_proj_blocks: MXFP4 blocks without their _scales tensor",
    ),
    "mxfp4-misshapen-scales": (
        "gpt-oss-mxfp4",
        lambda folder, config: edit_tensor(
            folder, f"{EXPERTS}.down_proj_scales", torch.zeros(4, 32, 2, dtype=torch.uint8)
        ),
        "scale U8 [4, 32, 2] does not match the blocks: expected U8 [4, 32, 1]",
    ),
    "mxfp4-quantized-but-ignored": (
        "gpt-oss-mxfp4",
        lambda folder, config: config["quantization_config"]["modules_to_not_convert"].append(EXPERTS),
        "the weight is quantized, but the config lists its module as left unquantized",
    ),
    "mxfp4-unknown-architecture": (
        "gpt-oss-mxfp4",
        lambda folder, config: config.update(model_type="my_moe", architectures=["MyMoeForCausalLM"]),
        "MXFP4 experts of an architecture whose expert layout shardmerge does not know",
    ),
    "mxfp4-dequantize-on-load": (
        "gpt-oss-mxfp4",
        lambda folder, config: config["quantization_config"].update(dequantize=True),
        "the mxfp4 config asks transformers to dequantize on load",
    ),
    "int-act-order": (
        "olmoe-int4",
        lambda folder, config: config["quantization_config"]["config_groups"]["group_0"]["weights"].update(
            actorder="group"
        ),
        "act-ordered weights (actorder 'group') are not supported",
    ),
    "int-g-idx": (
        "olmoe-int4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_g_idx", torch.arange(32, dtype=torch.int32)),
        f"{Q}.weight_g_idx: act-ordered weights (weight_g_idx) are not supported",
    ),
    "int-missing-packed": (
        "olmoe-int4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_packed", None),
        f"{Q}.weight_scale: a packed weight without its weight_packed",
    ),
    "int-missing-zero-point": (
        "olmoe-int4-asym",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_zero_point", None),
        "the config declares an asymmetric scheme, but the weight has no weight_zero_point",
    ),
    "int-two-bits": (
        "olmoe-int4",
        lambda folder, config: config["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=2),
        "pack-quantized int2 weights are not supported (int4 and int8 are)",
    ),
    "int-tensor-strategy": (
        "olmoe-int4",
        lambda folder, config: config["quantization_config"]["config_groups"]["group_0"]["weights"].update(
            strategy="tensor", group_size=None
        ),
        "pack-quantized weights with strategy 'tensor' are not supported",
    ),
    "int-wrong-shape": (
        "olmoe-int4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_shape", torch.tensor([32, 40])),
        f"{Q}.weight_packed: weight_packed [32, 4] does not hold a [32, 40] weight: expected [32, 5]",
    ),
    "int-group-misfit": (
        "olmoe-int4",
        lambda folder, config: config["quantization_config"]["config_groups"]["group_0"]["weights"].update(
            group_size=64
        ),
        "32 columns are not a whole number of groups of 64",
    ),
    "int-declared-nvfp4": (
        "olmoe-int4",
        lambda folder, config: config["quantization_config"].update(format="nvfp4-pack-quantized"),
        "nvfp4-pack-quantized weights of type, bits, strategy and group ['int', 4, 'group', 8] are not supported",
    ),
    "nvfp4-missing-global-scale": (
        "llama-nvfp4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_global_scale", None),
        f"{Q}.weight_packed: an NVFP4 weight without its weight_global_scale",
    ),
    "nvfp4-misshapen-scale": (
        "llama-nvfp4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_scale", torch.zeros(32, 1, dtype=torch.float8_e4m3fn)),
        f"{Q}.weight_packed: weight_scale F8_E4M3 [32, 1] does not match: expected F8_E4M3 [32, 2]",
    ),
    "nvfp4-two-global-scales": (
        "llama-nvfp4",
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_global_scale", torch.ones(2)),
        "weight_global_scale must be one F32 number, not F32 [2]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_packed_inputs_are_one_line_and_nothing_is_written(
    case: str, packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    name, change, message = BAD[case]
    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter")
    done, output = merge_broken_copy(base.path, adapter, change, tmp_path)
    assert_refused(done, message, output)


def test_16_bit_weights_beside_packed_ones_stay_16_bit(packed: Callable[[str], PackedBase]) -> None:
    base = packed("olmoe-int4")
    assert f"{LEFT_16_BIT}.weight" in read_output(base.path)


# --- resume, verify and batch ----------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt-oss-mxfp4", "olmoe-int4-asym", "llama-int8-channel-asym", "llama-nvfp4"])
@pytest.mark.parametrize("redo", [0, 1])
def test_resume_redoes_either_shard_alike_and_verify_recomputes(
    name: str, redo: int, packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    """The base keeps one weight's scales (and zero points) in the other shard; the output
    puts them in their weight's, so that redoing either shard alone gives the same bytes, and
    a fresh merge of sampled tensors (their new scales found again) equals the files."""
    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter")
    clean, output = tmp_path / "clean", tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(clean))
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    based = json.loads((base.path / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    # a merged weight's tensors (but weight_shape, copied as it is)
    stored = {weight: _stored_names(base, weight) for weight in base.quantized}
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    written = {t.name for shard in plan.shards for t in shard.tensors if t.ops}
    merged = {weight: names for weight, names in stored.items() if names[0] in written}
    assert any(len({based[n] for n in names}) == 2 for names in merged.values()), "a weight's tensors apart"
    assert all(len({index[n] for n in names}) == 1 for names in merged.values()), "together in the output"
    forget_shard(output, redo)
    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    assert report.shards_skipped == 1
    assert shard_bytes(output) == shard_bytes(clean)
    verified = verify(output, recompute=100, against_base=True)
    assert verified.recomputed >= 4 and verified.against_base


def _stored_names(base: PackedBase, weight: str) -> list[str]:
    if base.fmt.packing == "mxfp4":
        return [f"{weight}_blocks", f"{weight}_scales"]
    module = weight.removesuffix(".weight")
    keys = ("weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale")
    names = [f"{module}.{key}" for key in keys]
    return [n for n in names if n in json.loads((base.path / "model.safetensors.index.json").read_text())["weight_map"]]


@pytest.mark.parametrize("name", ["gpt-oss-mxfp4", "olmoe-int4-asym", "llama-nvfp4"])
def test_a_batch_pass_over_a_packed_base_writes_what_single_merges_write(
    name: str, packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    """Two jobs on one base, one requantized and one dequantized, in one pass."""
    base = packed(name)
    first = _adapter(base, tmp_path / "a")
    second = _adapter(base, tmp_path / "b", experts=["down_proj"])
    jobs = {
        "jobs": [
            {"name": "a", "base": str(base.path), "adapters": [str(first)], "output": str(tmp_path / "out-a")},
            {
                "name": "b",
                "base": str(base.path),
                "adapters": [str(second)],
                "output": str(tmp_path / "out-b"),
                "dtype": "bfloat16",
            },
        ]
    }
    batch = tmp_path / "batch.yaml"
    batch.write_text(json.dumps(jobs))
    done = subprocess.run([SHARDMERGE, "run", str(batch), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for adapter, job, dtype in ((first, "a", "auto"), (second, "b", "bfloat16")):
        single = tmp_path / f"single-{job}"
        shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(single), dtype=dtype)
        assert shard_bytes(single) == shard_bytes(tmp_path / f"out-{job}")


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        (
            "gpt-oss-mxfp4",
            "auto",
            "model.layers.0.mlp.experts.down_proj_blocks  MXFP4 x E8M0 down_proj_scales (4x32x32, the transpose of "
            "the model) -> dequantized, merged in float32, requantized to MXFP4 with new scales",
        ),
        (
            "gpt-oss-mxfp4",
            "bfloat16",
            "model.layers.0.mlp.experts.gate_up_proj  MXFP4 x E8M0 gate_up_proj_scales (4x64x32, the transpose of "
            "the model) -> dequantized in float32, written in BF16",
        ),
        (
            "olmoe-int4-asym",
            "auto",
            "model.layers.0.self_attn.q_proj.weight_packed  INT4 x BF16 weight_scale with zero points (32x32) -> "
            "dequantized, merged in float32, requantized to INT4 with new scales",
        ),
        (
            "llama-nvfp4",
            "auto",
            "model.layers.0.self_attn.k_proj.weight_packed  NVFP4 x F8_E4M3 weight_scale / weight_global_scale (16x32)"
            " -> dequantized, requantized to NVFP4 with the scale it shares with a merged weight",
        ),
    ],
)
def test_the_plan_says_what_is_read_and_written(
    name: str, dtype: str, expected: str, packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter")
    done = subprocess.run(
        [SHARDMERGE, "plan", str(base.path), str(adapter), "--dtype", dtype], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout, done.stdout
    assert f"quant   base in {base.fmt.describe()}" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss-mxfp4", "olmoe-int4-asym"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_a_cuda_merge_writes_what_a_cpu_merge_writes(
    name: str, dtype: str, packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    """Up to the BLAS's last bit: dequantized values within one unit in the last place,
    requantized codes within one step where a value lay on a rounding boundary."""
    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter")
    for device in ("cpu", "cuda"):
        shardmerge.merge(
            base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / device), dtype=dtype, device=device
        )
    cpu, cuda = read_output(tmp_path / "cpu"), read_output(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for tensor, value in cpu.items():
        if value.is_floating_point():
            torch.testing.assert_close(cuda[tensor], value, rtol=2**-7, atol=0)
        else:
            assert (cuda[tensor] != value).float().mean() < 0.01, tensor


@pytest.mark.parametrize("name", ["gpt-oss-mxfp4", "olmoe-int4-asym"])
def test_verify_of_a_gpu_merge_allows_one_code_step_per_packed_value(
    name: str, packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    """A GPU merge's products may differ in the last bit, and a requantized value then by one
    code: verify compares a packed weight code by code (an E2M1 code by its signed magnitude),
    not as one float. The journal of a CUDA merge is simulated: no GPU here."""
    from shardmerge.verify import _within_tolerance

    base = packed(name)
    adapter = _adapter(base, tmp_path / "adapter")
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    journal_path = output / ".shardmerge" / "journal.json"
    journal = json.loads(journal_path.read_text())
    journal["device"] = "cuda:0"
    journal_path.write_text(json.dumps(journal))
    assert verify(output, recompute=100).recomputed >= 4
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    tensor = next(t for shard in plan.shards for t in shard.tensors if t.ops and t.quant)
    word = torch.tensor([0x21, 0x8F] if name.startswith("gpt") else [0x21, 0x7F], dtype=torch.uint8)
    near = torch.tensor([0x12, 0x0F] if name.startswith("gpt") else [0x12, 0x7E], dtype=torch.uint8)
    far = torch.tensor([0x23, 0x8F] if name.startswith("gpt") else [0x23, 0x7F], dtype=torch.uint8)
    dtype = TORCH_DTYPES[tensor.dtype]
    words = [w.repeat(2).view(dtype) for w in (word, near, far)]  # whole stored elements
    assert _within_tolerance(words[1], words[0], tensor)  # 1 <-> 2, and for E2M1 -0 <-> +0
    assert not _within_tolerance(words[2], words[0], tensor)  # 1 -> 3: two steps


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_group_too_small_for_a_float16_scale_packs_no_nan(symmetric: bool) -> None:
    """Values below about 1e-7 with float16 scales: the reference's scale rounds to 0 in
    float16 and would divide by it (NaN, then an integer that spills into its neighbours);
    the smallest normal float16 is stored instead, the group packs to zeros, and the other
    groups of the row are the reference's own."""
    fmt = read_quantization({"quantization_config": int_config(4, symmetric=symmetric, group=8)}, Path("config.json"))
    assert fmt is not None
    value = torch.randn(8, 16)
    value[:, :8] *= 1e-9  # the first group of every row: tiny
    values, scales, _ = int_quantize(value.clone(), fmt, torch.float16)
    assert torch.isfinite(scales.float()).all() and bool((scales > 0).all())
    words = torch.empty(8, 2, dtype=torch.int32)
    unpacked = int_values(int_pack(values, 4, words), 4, 16)
    assert unpacked.abs().max() <= 8
    quantization = int_config(4, symmetric=symmetric, group=8)
    reference = reference_int(value[:, 8:].contiguous(), quantization, torch.float16)  # the other group
    assert torch.equal(unpacked[:, 8:], int_values(reference["weight_packed"], 4, 8))


def test_a_4_bit_output_says_how_much_of_the_update_survived_and_warns_below_half(
    packed: Callable[[str], PackedBase], tmp_path: Path
) -> None:
    """The part of the update that survived NVFP4 requantization, <Q(W+dW) - W, dW> / |dW|^2
    over every requantized weight, computed here from the outputs read by compressed-tensors,
    is the one the summary prints; under half, a warning recommends a 16-bit output."""
    base = packed("llama-nvfp4")
    adapter = _adapter(base, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    small = {name: value * (0.02 if "lora_B" in name else 1.0) for name, value in load_file(weights).items()}
    save_file(small, weights)  # an update of about a hundredth of the weights, as trained ones are
    exact, output = tmp_path / "float32", tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(exact), dtype="float32")
    done = subprocess.run(
        [SHARDMERGE, "merge", str(base.path), str(adapter), "-o", str(output)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    merged, before, ours = read_output(exact), read_output_like_base(base.dequantized.path), read_output(output)
    along = update = 0.0
    for weight in base.quantized:
        delta = merged[weight].double() - before[weight].double()
        if not delta.any():
            continue
        module = weight.removesuffix(".weight")
        stored = {key: ours[f"{module}.{key}"] for key in ("weight_packed", "weight_scale", "weight_global_scale")}
        kept = library_nvfp4_values(stored).double() - before[weight].double()
        along += float((kept * delta).sum())
        update += float((delta * delta).sum())
    survived = along / update
    assert f"{survived:.1%} of the update survived" in done.stdout, done.stdout
    assert survived < 0.5, "a rank-4 update on 4-bit weights mostly rounds away"
    assert "warning: requantized to compressed-tensors NVFP4" in done.stderr
    assert "a 16-bit output (--dtype bfloat16) keeps all of it" in done.stderr


def test_nvfp4_scales_found_before_their_weight_are_the_reference_quantizers(
    packed: Callable[[str], PackedBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a shard's alignment keeps a requantized weight's new scales ahead of it, they are
    found in a pass that does not write (the global scale's largest magnitude found once for
    both), and are what compressed-tensors writes for the float32 merge."""
    from shardmerge.planning import planner

    monkeypatch.setattr(planner, "_scales_last", lambda infos, dtypes, quant: (infos, set()))
    base = packed("llama-nvfp4")
    adapter = _adapter(base, tmp_path / "adapter")
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    assert not any(t.scales_follow for shard in plan.shards for t in shard.tensors)
    exact, output = tmp_path / "float32", tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(exact), dtype="float32")
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    merged, ours = read_output(exact), read_output(output)
    shared = shared_global_scales({w: merged[w] for w in base.quantized})
    for weight in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        module = weight.removesuffix(".weight")
        for key, tensor in reference_nvfp4(merged[weight], shared[weight]).items():
            assert torch.equal(ours[f"{module}.{key}"].view(torch.uint8), tensor.view(torch.uint8)), (weight, key)
