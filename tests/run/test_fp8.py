"""FP8 bases, in both formats: dequantized outputs against PEFT's merge on the dequantized
model, requantized outputs against the formats' own quantizers applied to that merge, the
fixtures themselves against the formats' libraries, and the bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.integrations.finegrained_fp8 import Fp8Quantize

import shardmerge
from conftest import (
    assert_matches_reference,
    assert_matches_saved,
    assert_same_logits,
    edit_tensor,
    forget_shard,
    llama_config,
    peft_reference,
    read_output,
    read_output_like_base,
    save_adapter,
    save_base,
    saved_reference,
    shard_bytes,
)
from fp8_checkpoints import (
    LEFT_16_BIT,
    Fp8Base,
    compressed_tensors,
    fine_grained,
    library_dequantize,
    quantize_checkpoint,
)
from shardmerge.codecs import QuantFormat
from shardmerge.run.codecs.fp8 import dequantize_into, largest, quantize_into, scales_for, widen_into
from shardmerge.verify import verify

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen3_moe_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, mlp_only_layers=[1],
    )  # fmt: skip


def _edges_config() -> object:
    config = llama_config(hidden=48)  # 48 and 24 rows, 96 columns: partial 32x32 blocks
    config.intermediate_size = 80
    return config


# name -> (model config, quantization_config, scale dtype)
BASES: dict[str, tuple[Callable[[], object], dict[str, Any], torch.dtype]] = {
    "llama-fp8": (lambda: llama_config(hidden=64), fine_grained(), torch.float32),
    "llama-fp8-edges": (_edges_config, fine_grained(), torch.float32),
    "llama-fp8-ue8m0": (lambda: llama_config(hidden=64), fine_grained(scale_fmt="ue8m0"), torch.float32),
    "llama-fp8-tensor": (lambda: llama_config(hidden=64), fine_grained(block=None), torch.float32),
    "llama-ct-channel": (lambda: llama_config(hidden=64), compressed_tensors("channel", static=True), torch.bfloat16),
    "llama-ct-tensor": (lambda: llama_config(hidden=64), compressed_tensors("tensor"), torch.bfloat16),
    "llama-ct-block": (lambda: llama_config(hidden=64), compressed_tensors("block", (32, 32)), torch.bfloat16),
    "qwen3moe-fp8": (qwen3_moe_config, fine_grained(), torch.float32),
}


@pytest.fixture(scope="session")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Fp8Base]:
    """FP8 bases by name, built once per session."""
    root = tmp_path_factory.mktemp("fp8")
    built: dict[str, Fp8Base] = {}

    def get(name: str) -> Fp8Base:
        if name not in built:
            config, quantization, scale_dtype = BASES[name]
            source = save_base(config(), root / f"{name}-bf16", torch.bfloat16, seed=3)
            built[name] = quantize_checkpoint(source.path, root / name, quantization, scale_dtype)
        return built[name]

    return get


def _quantization(base: Fp8Base) -> dict[str, Any]:
    return json.loads((base.path / "config.json").read_text())["quantization_config"]


def _weights_args(base: Fp8Base) -> QuantizationArgs:
    return QuantizationArgs(**_quantization(base)["config_groups"]["group_0"]["weights"])


def reference_requantize(base: Fp8Base, value: torch.Tensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``value`` (float32) quantized by the format's own code: transformers' Fp8Quantize, or
    compressed-tensors' calculate_qparams and quantize, the scale held in ``scale_dtype``
    as its modules hold it. Keys: ``q`` and ``scale``."""
    fmt = base.fmt
    if fmt.method == "fp8":
        holder = type("Quantizer", (), {"quantization_config": type("Config", (), _quantization(base))})
        holder.quantization_config.scale_fmt = _quantization(base).get("scale_fmt")
        holder.quantization_config.weight_block_size = _quantization(base).get("weight_block_size")
        out = Fp8Quantize(holder)._quantize_one("w.weight", value)
        return {"q": out["w.weight"], "scale": out["w.weight_scale_inv"].float()}
    args = _weights_args(base)
    low, high = _observed(value, fmt)
    scale, _ = calculate_qparams(low, high, args)
    held = scale.to(scale_dtype)
    return {"q": ct_quantize(value, held, None, args, dtype=torch.float8_e4m3fn), "scale": held}


def _observed(value: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max a minmax observer sees per scale (whole blocks only)."""
    if fmt.strategy == "tensor":
        return value.amin().reshape(1), value.amax().reshape(1)
    if fmt.strategy == "channel":
        return value.amin(1, keepdim=True), value.amax(1, keepdim=True)
    assert fmt.block is not None
    rows, cols = value.shape
    blocks = value.reshape(rows // fmt.block[0], fmt.block[0], cols // fmt.block[1], fmt.block[1])
    return blocks.amin((1, 3)), blocks.amax((1, 3))


def _scale_of(base: Fp8Base, name: str) -> str:
    return f"{name.removesuffix('.weight')}.{base.fmt.scale_suffix}"


# --- the fixtures, against the formats' own libraries -------------------------------------


@pytest.mark.parametrize(
    "name", ["llama-fp8", "llama-fp8-ue8m0", "llama-ct-channel", "llama-ct-tensor", "llama-ct-block"]
)
def test_fixtures_are_what_the_formats_own_quantizers_write(name: str, fp8: Callable[[str], Fp8Base]) -> None:
    """Our quantizer writes the bytes transformers' Fp8Quantize or compressed-tensors write for
    the same bfloat16 weights, and our dequantization reads what their dequantization reads."""
    base = fp8(name)
    stored = read_output(base.path)
    source = read_output_like_base(base.path.with_name(f"{name}-bf16"))
    dequantized = read_output_like_base(base.dequantized.path)
    assert LEFT_16_BIT + ".weight" not in base.quantized and stored[LEFT_16_BIT + ".weight"].dtype == torch.bfloat16
    for weight in base.quantized:
        scale = stored[_scale_of(base, weight)]
        expected = reference_requantize(base, source[weight].float(), scale.dtype)
        assert torch.equal(stored[weight].view(torch.uint8), expected["q"].view(torch.uint8)), weight
        assert torch.equal(scale.float().reshape(expected["scale"].shape), expected["scale"].float()), weight
        ours = dequantize_into(torch.empty(stored[weight].shape), stored[weight], scale, base.fmt)
        assert torch.equal(ours, dequantized[weight]), weight


@pytest.mark.parametrize("nan", [False, True])
def test_widening_reads_every_fp8_code_as_torch_does(nan: bool) -> None:
    """Every e4m3fn code, in a block larger than one chunk; with ``nan`` the two NaN codes
    too, which must stay NaN (not the +-480 the shift alone would make of them)."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(3000)
    if not nan:
        codes = codes[(codes & 0x7F) != 0x7F]
    fp8 = codes.view(torch.float8_e4m3fn)
    ours = widen_into(torch.empty(fp8.shape), fp8)
    expected = fp8.float()
    assert torch.equal(ours.isnan(), expected.isnan())
    assert torch.equal(ours.nan_to_num(0).view(torch.int32), expected.nan_to_num(0).view(torch.int32))


def test_fixture_loads_through_transformers_as_its_dequantized_values(fp8: Callable[[str], Fp8Base]) -> None:
    base = fp8("llama-fp8")
    loaded = AutoModelForCausalLM.from_pretrained(base.path).eval()  # dequantized to bfloat16 on a CPU
    expected = read_output_like_base(base.dequantized.path)
    state = loaded.state_dict()
    for weight in base.quantized:
        assert torch.equal(state[weight], expected[weight].to(state[weight].dtype)), weight


# --- dequantized output: PEFT on the dequantized model is the reference ------------------

FEATURES: dict[str, Any] = {
    "lora-all-linear": LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR),
    "rslora-patterns": LoraConfig(
        r=8,
        lora_alpha=12,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"down_proj": 3},
    ),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj", "o_proj"]),
    "loha": LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"]),
    "lokr": LoKrConfig(r=2, alpha=3, target_modules=["v_proj", "gate_proj"], decompose_both=True),
    "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "tokens-and-head": LoraConfig(
        r=4, target_modules=["v_proj"], trainable_token_indices=[1, 40, 77], modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_every_feature_on_an_fp8_base_matches_peft_on_the_dequantized_model(
    feature: str, fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=41, config=FEATURES[feature])
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    reference = peft_reference(base.dequantized, [(adapter, 1.0)])
    assert_matches_reference(output, base.dequantized, reference, torch.float32)
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert_same_logits(output, reference, torch.float32)


@pytest.mark.parametrize(
    "name", ["llama-fp8-edges", "llama-fp8-tensor", "llama-ct-channel", "llama-ct-tensor", "llama-ct-block"]
)
def test_each_format_dequantized_to_bfloat16_matches_peft(
    name: str, fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    """Partial edge blocks, per-tensor, per-channel (with static input scales, dropped) and
    block scales, each dequantized in float32 and rounded once to bfloat16."""
    base = fp8(name)
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=42, r=4, lora_alpha=8, target_modules=LINEAR)
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="bfloat16")
    reference = peft_reference(base.dequantized, [(adapter, 1.0)])
    assert_matches_reference(output, base.dequantized, reference, torch.bfloat16)
    assert_same_logits(output, reference, torch.bfloat16)


def test_moe_experts_on_an_fp8_base_match_peft(fp8: Callable[[str], Fp8Base], tmp_path: Path) -> None:
    """Qwen3-MoE style: per-expert FP8 weights, LoRA on the fused expert parameters and on
    attention, the router and one projection left in 16 bits."""
    base = fp8("qwen3moe-fp8")
    adapter = save_adapter(
        base.dequantized, tmp_path / "adapter", seed=43, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    reference = peft_reference(base.dequantized, [(adapter, 1.0)])
    assert_matches_saved(output, saved_reference(reference, tmp_path / "reference"), torch.float32)
    assert_same_logits(output, reference, torch.float32)


# --- requantized output: the formats' own quantizers on PEFT's merge are the reference ----


REQUANTIZED_TARGETS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "up_proj", "o_proj"]},  # layer 1's o_proj is 16-bit
    "qwen3moe": {"target_modules": ["q_proj", "v_proj", "o_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]},
}


@pytest.mark.parametrize(
    "name",
    [
        "llama-fp8",
        "llama-fp8-ue8m0",
        "llama-fp8-tensor",
        "llama-ct-channel",
        "llama-ct-tensor",
        "llama-ct-block",
        "qwen3moe-fp8",
    ],
)
def test_requantized_output_is_the_reference_quantization_of_peft_merge(
    name: str, fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    """Merged weights: the format's own quantizer applied to PEFT's float32 merge; everything
    else (other quantized weights with their scales, 16-bit tensors, config.json) as in the base."""
    base = fp8(name)
    targets = REQUANTIZED_TARGETS[name.split("-")[0]]
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=44, r=4, lora_alpha=8, **targets)
    output = tmp_path / "out"
    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    reference = peft_reference(base.dequantized, [(adapter, 1.0)])
    merged = saved_reference(reference, tmp_path / "reference")
    dequantized = read_output_like_base(base.dequantized.path)
    changed = {w for w in base.quantized if not torch.equal(merged[w], dequantized[w])}
    ours, stored = read_output(output), read_output(base.path)
    assert set(ours) == set(stored)
    assert (output / "config.json").read_bytes() == (base.path / "config.json").read_bytes()
    assert len(changed) >= 4 and report.requantized == len(changed)
    rewritten = changed | {_scale_of(base, w) for w in changed}
    for tensor, value in ours.items():
        if tensor in rewritten:
            continue
        if value.dtype == torch.float8_e4m3fn or tensor.endswith(("_scale", "_scale_inv")) or tensor not in merged:
            assert torch.equal(value.view(torch.uint8), stored[tensor].view(torch.uint8)), f"{tensor} was not copied"
        else:  # 16-bit: the base's, or rounded once from PEFT's merge
            assert torch.equal(value, merged[tensor].to(value.dtype)) or torch.equal(value, stored[tensor]), tensor
    for weight in sorted(changed):
        # Bit for bit: PEFT's float32 merge and ours agree here to the last bit, and both
        # quantizers are deterministic. (A BLAS that rounds a product differently could move
        # an element that sits on a tie to the neighbouring FP8 value.)
        scale = ours[_scale_of(base, weight)]
        expected = reference_requantize(base, merged[weight].float(), scale.dtype)
        assert torch.equal(scale.float().reshape(expected["scale"].shape), expected["scale"].float()), weight
        assert torch.equal(ours[weight].view(torch.uint8), expected["q"].view(torch.uint8)), weight
    # The report's figures, from PEFT's merge and the library's reading of what was written.
    quantization = _quantization(base)
    written = {w: library_dequantize(ours[w], ours[_scale_of(base, w)], base.fmt, quantization) for w in changed}
    update = sum(float((merged[w].float() - dequantized[w]).square().sum()) for w in changed)
    kept = sum(float((written[w] - dequantized[w]).square().sum()) for w in changed)
    error = sum(float((written[w] - merged[w].float()).square().sum()) for w in changed)
    assert report.update_kept == pytest.approx((kept / update) ** 0.5, rel=1e-4)
    assert report.update_error == pytest.approx((error / update) ** 0.5, rel=1e-4)
    AutoModelForCausalLM.from_pretrained(output)  # loads through the format's own path


@pytest.mark.parametrize("name", ["llama-fp8-edges", "llama-ct-channel"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_blocks_of_rows_match_whole_tensors(
    name: str, dtype: str, fp8: Callable[[str], Fp8Base], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of 5 rows: a dequantized weight's blocks start inside its 32-row scale blocks;
    a requantized one's are rounded up to whole scale blocks (or single rows, per channel),
    its new scales found block by block; both merged in pieces of 32 columns where they can.
    The BLAS may round a product of a few rows in another last bit (see test_merge_peft), so:
    PEFT's merge within one unit in the last place, and FP8 codes within one step of the
    whole tensors' (scales to float32 rounding)."""
    from shardmerge.planning import planner
    from shardmerge.run import gridded
    from shardmerge.run.codecs import fp8 as quant

    base = fp8(name)
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=52, r=4, target_modules=LINEAR)
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "whole"), dtype=dtype)
    monkeypatch.setattr(planner, "MERGE_BLOCK_ELEMENTS", 5 * 48)
    for module in (gridded, quant):  # and pieces of 32 columns (one scale block) where merged by columns
        monkeypatch.setattr(module, "WIDEN_CHUNK", 64)
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)], dtype=dtype)
    assert len([t for shard in plan.shards for t in shard.tensors if 0 < t.block_rows < t.shape[0] and t.quant]) >= 5
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "blocks"), dtype=dtype)
    if dtype == "bfloat16":
        reference = peft_reference(base.dequantized, [(adapter, 1.0)])
        assert_matches_reference(tmp_path / "blocks", base.dequantized, reference, torch.bfloat16)
        return
    whole, blocks = read_output(tmp_path / "whole"), read_output(tmp_path / "blocks")
    assert whole.keys() == blocks.keys()
    for tensor, value in whole.items():
        if value.dtype == torch.float8_e4m3fn:
            steps = (value.view(torch.uint8).int() - blocks[tensor].view(torch.uint8).int()).abs()
            assert int(steps.max()) <= 1, tensor
        else:
            torch.testing.assert_close(blocks[tensor], value, rtol=2**-20, atol=0)


def test_partial_edge_blocks_requantize_to_their_own_largest_value(
    fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    """transformers' quantizer leaves non-divisible weights unquantized, so the reference here
    is the rule itself: each block's scale is its largest |value| / 448, each value within one
    FP8 step of PEFT's merge, read back by transformers' own dequantization."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    base = fp8("llama-fp8-edges")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=45, r=4, lora_alpha=8, target_modules=LINEAR)
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    merged = peft_reference(base.dequantized, [(adapter, 1.0)]).state_dict()
    ours = read_output(output)
    for weight in base.quantized:
        value, scale = merged[weight].float(), ours[_scale_of(base, weight)]
        rows, cols = value.shape
        padded = torch.zeros(scale.shape[0] * 32, scale.shape[1] * 32)
        padded[:rows, :cols] = value.abs()
        amax = padded.reshape(scale.shape[0], 32, scale.shape[1], 32).amax((1, 3))
        torch.testing.assert_close(scale, amax / 448, rtol=2**-22, atol=0)
        read_back = _dequantize_fp8_weight(ours[weight], scale, [32, 32], torch.float32)
        per_element = scale.repeat_interleave(32, 0)[:rows].repeat_interleave(32, 1)[:, :cols]
        step = torch.maximum(value.abs() * 2**-3, per_element * 2**-9)
        assert bool(((read_back - value).abs() <= step).all()), weight


def test_untouched_quantized_weights_and_the_plan_say_what_is_read_and_written(
    fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=46, r=4, target_modules=["q_proj"])
    shown = subprocess.run([SHARDMERGE, "plan", str(base.path), str(adapter)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "quant   base in fine-grained FP8 (32x32 blocks)" in shown.stdout
    q_proj = "model.layers.0.self_attn.q_proj"
    assert f"{q_proj}.weight  F8_E4M3 x F32 weight_scale_inv -> dequantized, merged in float32, requantized" in (
        shown.stdout
    )
    assert f"{q_proj}.weight_scale_inv  F32 scales -> recomputed for the requantized {q_proj}.weight" in shown.stdout
    as_bf16 = subprocess.run(
        [SHARDMERGE, "plan", str(base.path), str(adapter), "--dtype", "bfloat16"], capture_output=True, text=True
    )
    assert (
        "model.layers.0.mlp.up_proj.weight  F8_E4M3 x F32 weight_scale_inv -> dequantized in float32, written in BF16"
        in (as_bf16.stdout)
    )


# --- resume, verify and batch on FP8 bases ------------------------------------------------


@pytest.mark.parametrize("redo", [0, 1])
def test_resume_redoes_either_shard_alike_though_a_scale_sits_apart(
    redo: int, fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    """One scale sits in the other shard than its weight in the base; the output puts it in
    its weight's, so that redoing either shard alone gives the same bytes."""
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=47, r=4, target_modules=LINEAR)
    clean, output = tmp_path / "clean", tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(clean))
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    # Every new scale lies in its weight's shard, the one stored apart in the base included.
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    based = json.loads((base.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(based[_scale_of(base, w)] != based[w] for w in base.quantized)
    assert all(index[_scale_of(base, w)] == index[w] for w in base.quantized)
    forget_shard(output, redo)
    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output))
    assert report.shards_skipped == 1
    assert shard_bytes(output) == shard_bytes(clean)
    verified = verify(output, recompute=4, against_base=True)
    assert verified.recomputed == 4


def test_a_batch_pass_over_an_fp8_base_writes_what_single_merges_write(
    fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    base = fp8("llama-ct-channel")
    first = save_adapter(base.dequantized, tmp_path / "a", seed=48, r=4, target_modules=["q_proj", "down_proj"])
    second = save_adapter(base.dequantized, tmp_path / "b", seed=49, r=8, target_modules=["q_proj", "down_proj"])
    plans = [shardmerge.plan(base=str(base.path), adapters=[str(a)]) for a in (first, second)]
    layouts = [[[(t.name, t.begin, t.end, t.dtype) for t in shard.tensors] for shard in p.shards] for p in plans]
    assert layouts[0] == layouts[1]  # laid out alike: one pass over the base writes both
    jobs = {
        "jobs": [
            {"name": a.name, "base": str(base.path), "adapters": [str(a)], "output": str(tmp_path / f"out-{a.name}")}
            for a in (first, second)
        ]
    }
    batch = tmp_path / "batch.yaml"
    batch.write_text(json.dumps(jobs))
    done = subprocess.run([SHARDMERGE, "run", str(batch), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for adapter in (first, second):
        single = tmp_path / f"single-{adapter.name}"
        shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(single))
        assert shard_bytes(single) == shard_bytes(tmp_path / f"out-{adapter.name}")


# --- bad inputs: one line each, nothing written ------------------------------------------


def _broken_copy(base: Fp8Base, folder: Path, change: Callable[[Path, dict[str, Any]], None]) -> Path:
    shutil.copytree(base.path, folder)
    config = json.loads((folder / "config.json").read_text())
    change(folder, config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


Q = "model.layers.0.self_attn.q_proj"
BAD: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "missing-scale": (
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_scale_inv", None),
        f"{Q}.weight: F8_E4M3 tensor without a weight_scale_inv beside it",
    ),
    "misshapen-scale": (
        lambda folder, config: edit_tensor(folder, f"{Q}.weight_scale_inv", torch.ones(2, 3)),
        f"{Q}.weight_scale_inv: scale shape [2, 3] does not match the weight [64, 64]",
    ),
    "grid-against-block-size": (
        lambda folder, config: config["quantization_config"].update(weight_block_size=[16, 16]),
        "scale shape [2, 2] does not match the weight [64, 64] in fine-grained FP8 (16x16 blocks): expected [4, 4]",
    ),
    "scale-without-fp8-weight": (
        lambda folder, config: edit_tensor(folder, f"{Q}.weight", torch.zeros(64, 64, dtype=torch.bfloat16)),
        f"{Q}.weight_scale_inv: a weight scale whose weight is BF16, not F8_E4M3",
    ),
    "quantized-but-ignored": (
        lambda folder, config: config["quantization_config"]["modules_to_not_convert"].append(Q),
        "the weight is quantized, but the config lists its module as left unquantized",
    ),
    "ignore-not-an-expression": (
        lambda folder, config: config["quantization_config"]["modules_to_not_convert"].append("lm_head("),
        "ignore entry 'lm_head(' is not a regular expression",
    ),
    "hqq": (
        lambda folder, config: config.update(quantization_config={"quant_method": "hqq", "nbits": 4}),
        "the base is quantized with hqq, which shardmerge cannot merge into",
    ),
    "awq": (
        lambda folder, config: config.update(quantization_config={"quant_method": "awq", "bits": 4}),
        "the base is quantized with awq, which shardmerge cannot merge into",
    ),
    "torchao": (
        lambda folder, config: config.update(quantization_config={"quant_method": "torchao", "quant_type": {}}),
        "the base is quantized with torchao, which shardmerge cannot merge into",
    ),
    "gptq": (
        lambda folder, config: config.update(quantization_config={"quant_method": "gptq", "bits": 4}),
        "the base is quantized with gptq, which shardmerge cannot merge into",
    ),
    "mxfp4": (
        lambda folder, config: config.update(quantization_config={"quant_method": "mxfp4"}),
        "stored as F8_E4M3, as are 12 more tensors, but config.json declares MXFP4",
    ),
    "ct-int4": (
        lambda folder, config: config.update(
            quantization_config={**compressed_tensors("channel"), "format": "pack-quantized"}
        ),
        "pack-quantized float8 weights are not supported (int4 and int8 are)",
    ),
    "ct-nvfp4": (
        lambda folder, config: config.update(
            quantization_config={**compressed_tensors("channel"), "format": "nvfp4-pack-quantized"}
        ),
        "nvfp4-pack-quantized weights of type, bits, strategy and group ['float', 8, 'channel', None] are not "
        "supported",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fp8_inputs_are_one_line_and_nothing_is_written(
    case: str, fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=50, r=4, target_modules=["q_proj"])
    change, message = BAD[case]
    broken = _broken_copy(base, tmp_path / "broken", change)
    output = tmp_path / "out"
    done = subprocess.run(
        [SHARDMERGE, "merge", str(broken), str(adapter), "-o", str(output)], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "16-bit release" in done.stderr or "incomplete" in done.stderr
    assert not output.exists() or not any(output.iterdir())


def test_an_update_of_zero_is_found_in_dequantized_and_requantized_merges(
    fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    """lora_B zero: every merged weight comes out as the base's (dequantized and rounded, or
    its own FP8 codes), and the merge says so."""
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=53, r=4, target_modules=["q_proj", "up_proj"])
    weights = adapter / "adapter_model.safetensors"
    factors = load_file(weights)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in factors.items()}, weights, metadata={"format": "pt"})
    for dtype in ("bfloat16", "auto"):
        report = shardmerge.merge(
            base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / dtype), dtype=dtype
        )
        assert report.unchanged == report.tensors_merged == 4, dtype


def test_tiny_and_nan_blocks_requantize_without_new_nan() -> None:
    """A block whose largest value is too small for a float16 scale, and a NaN in another:
    no NaN is written but the base's own, and the NaN's neighbours keep their own scale."""
    for method in ("fp8", "compressed-tensors"):
        fmt = QuantFormat(method, "s", "block", (2, 2), False, (), ())
        value = torch.tensor([[1e-7, -2e-7, 3.0, 1.0], [0.0, 1e-7, float("nan"), 2.0]])
        stored, factor = scales_for(largest(value, fmt), fmt, torch.float16)
        codes = quantize_into(torch.empty(2, 4, dtype=torch.float8_e4m3fn), value.clone(), factor, fmt)
        read_back = dequantize_into(torch.empty(2, 4), codes, stored, fmt)
        assert int(read_back.isnan().sum()) == 1 and bool(read_back[1, 2].isnan()), method
        assert float(read_back[0, 2]) == pytest.approx(3.0, rel=2**-3), method
        assert bool((stored > 0).all()), method


def test_a_quantized_kv_cache_cannot_be_dequantized(fp8: Callable[[str], Fp8Base], tmp_path: Path) -> None:
    base = fp8("llama-ct-tensor")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=51, r=4, target_modules=["q_proj"])

    def kv_cache(folder: Path, config: dict[str, Any]) -> None:
        config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}

    broken = _broken_copy(base, tmp_path / "kv", kv_cache)
    with pytest.raises(shardmerge.PlanError) as caught:
        shardmerge.plan(base=str(broken), adapters=[str(adapter)], dtype="bfloat16")
    assert "quantizes its KV cache" in caught.value.problems[0].one_line()
    assert shardmerge.plan(base=str(broken), adapters=[str(adapter)]).dtype == "base"


def test_a_quantization_config_that_no_tensor_carries_is_refused(fp8: Callable[[str], Fp8Base], tmp_path: Path) -> None:
    """An FP8 config on 16-bit weights would be kept in the output, which then loads as FP8."""
    base = fp8("llama-fp8")
    sixteen = Path(shutil.copytree(base.dequantized.path, tmp_path / "bf16"))
    config = json.loads((sixteen / "config.json").read_text())
    config["quantization_config"] = fine_grained()
    (sixteen / "config.json").write_text(json.dumps(config))
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=50, r=4, target_modules=["q_proj"])
    done = subprocess.run(
        [SHARDMERGE, "merge", str(sixteen), str(adapter), "-o", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert f"{sixteen / 'config.json'}: declares fine-grained FP8 (32x32 blocks), but no tensor" in done.stderr
    assert not (tmp_path / "out").exists()
    undeclared = _broken_copy(base, tmp_path / "undeclared", lambda folder, config: config.pop("quantization_config"))
    done = subprocess.run(
        [SHARDMERGE, "merge", str(undeclared), str(adapter), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "stored as F8_E4M3, as are 12 more tensors, but config.json declares no quantization" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["hqq", "gptq", "ct-nvfp4"])
def test_a_refused_base_is_the_one_problem_reported(case: str, fp8: Callable[[str], Fp8Base], tmp_path: Path) -> None:
    """Its reason, not a line per adapter module blaming the adapter for the base's format."""
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=50, r=4, target_modules=["q_proj", "v_proj"])
    broken = _broken_copy(base, tmp_path / "broken", BAD[case][0])
    done = subprocess.run([SHARDMERGE, "plan", str(broken), str(adapter)], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "1 problem found" in lines[0]
    assert len(lines) == 2 and BAD[case][1] in lines[1]


def test_a_nan_base_scale_is_reported_apart_and_never_written_to_the_journal(
    fp8: Callable[[str], Fp8Base], tmp_path: Path
) -> None:
    base = fp8("llama-fp8")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=52, r=4, target_modules=["q_proj", "up_proj"])

    def nan_scale(folder: Path, config: dict[str, Any]) -> None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        scale = load_file(folder / index["weight_map"][f"{Q}.weight_scale_inv"])[f"{Q}.weight_scale_inv"]
        scale[0, 0] = float("nan")
        edit_tensor(folder, f"{Q}.weight_scale_inv", scale)

    broken = _broken_copy(base, tmp_path / "nan", nan_scale)
    output = tmp_path / "out"
    done = subprocess.run(
        [SHARDMERGE, "merge", str(broken), str(adapter), "-o", str(output), "--quiet"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    requant = next(line for line in done.stdout.splitlines() if line.startswith("  requant"))
    assert "1 requantized weight holding NaN or Inf from the base, left out of the figures" in requant
    assert "3 merged weights requantized: the change written is" in requant
    assert "their updates are zero" not in requant
    assert f"NaN or Inf kept from the base in 1 tensors: {Q}.weight" in done.stdout

    def forbidden(name: str) -> None:
        raise AssertionError(f"the journal holds {name}")

    journal = json.loads((output / ".shardmerge" / "journal.json").read_text(), parse_constant=forbidden)
    figures = [entry for record in journal["shards"].values() for entry in record["requantized"]]
    assert len(figures) == 3 and f"{Q}.weight" not in {entry[0] for entry in figures}
    assert verify(output).merged_checked == 4
