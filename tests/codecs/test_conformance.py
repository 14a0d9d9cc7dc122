"""What every registered codec must pass, each against its format's own library: transformers'
FP8 code and compressed-tensors for FP8, the MXFP4 definition (OpenAI's reference quantizer,
element by element) and transformers' MXFP4 decoder, compressed-tensors' packer and
decompressor for packed integers, its NVFP4 rules and compressor for NVFP4. A codec
registered without cases here fails the first test.

For each codec and each of its formats: its configs are read by it alone; the tensors a
checkpoint stores are found with their companions, and a weight missing one is refused by
name; the kernel dequantizes the reference's stored values exactly as the library does, and
quantizes float32 values into the reference's very bytes; codes are told within one step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from bnb_checkpoints import KINDS, bnb_config, library_bnb_values, reference_bnb
from fp8_checkpoints import compressed_tensors, fine_grained
from packed_checkpoints import (
    int_config,
    library_int_values,
    library_nvfp4_values,
    mxfp4_config,
    nvfp4_config,
    reference_int,
    reference_mxfp4,
    reference_nvfp4,
)
from shardmerge.codecs import QuantFormat, QuantizedWeight, read_quantization, registered
from shardmerge.errors import InputError, ShardmergeError
from shardmerge.formats.safetensors import read_header
from shardmerge.run import codecs as kernels
from shardmerge.run.codecs.base import PackedReader

Stored = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One format of a codec. ``shape``: the weight's values as stored (rows, columns);
    ``store``: the reference library's stored tensors for float32 values, by the names a
    checkpoint gives them for module ``m`` (the weight first, then its companions in the
    order the codec reads them, then what it drops); ``values``: the library's float32
    reading of stored tensors, rows by columns; ``model``: the model's name for the weight."""

    name: str
    config: dict[str, Any]
    shape: tuple[int, int]
    store: Callable[[torch.Tensor], Stored]
    values: Callable[[Stored], torch.Tensor]
    model: str = "m.weight"


def _fine_grained_store(config: dict[str, Any]) -> Callable[[torch.Tensor], Stored]:
    def store(value: torch.Tensor) -> Stored:
        settings = type("Config", (), {"scale_fmt": None, "weight_block_size": None} | config)
        holder = type("Quantizer", (), {"quantization_config": settings})
        out = Fp8Quantize(holder)._quantize_one("m.weight", value)
        return {"m.weight": out["m.weight"], "m.weight_scale_inv": out["m.weight_scale_inv"].float()}

    return store


def _fine_grained_values(config: dict[str, Any]) -> Callable[[Stored], torch.Tensor]:
    block = config.get("weight_block_size")
    return lambda stored: _dequantize_fp8_weight(stored["m.weight"], stored["m.weight_scale_inv"], block, torch.float32)


def _ct_args(config: dict[str, Any]) -> QuantizationArgs:
    return QuantizationArgs(**config["config_groups"]["group_0"]["weights"])


def _ct_fp8_store(config: dict[str, Any]) -> Callable[[torch.Tensor], Stored]:
    def store(value: torch.Tensor) -> Stored:
        args = _ct_args(config)
        if args.strategy == "channel":
            low, high = value.amin(1, keepdim=True), value.amax(1, keepdim=True)
        else:
            low, high = value.amin().reshape(1), value.amax().reshape(1)
        scale, _ = calculate_qparams(low, high, args)
        held = scale.to(torch.bfloat16)
        return {"m.weight": ct_quantize(value, held, None, args, dtype=torch.float8_e4m3fn), "m.weight_scale": held}

    return store


def _ct_fp8_values(config: dict[str, Any]) -> Callable[[Stored], torch.Tensor]:
    def values(stored: Stored) -> torch.Tensor:
        scale = stored["m.weight_scale"].float()
        return ct_dequantize(stored["m.weight"], scale, args=_ct_args(config), dtype=torch.float32)

    return values


def _mxfp4_store(value: torch.Tensor) -> Stored:
    blocks, scales = reference_mxfp4(value)
    rows = value.shape[0]
    return {"m_blocks": blocks.view(2, rows // 2, -1, 16), "m_scales": scales.view(2, rows // 2, -1)}


def _mxfp4_values(stored: Stored) -> torch.Tensor:
    """transformers' decoder gives the model's [experts, in, out]: back to stored rows."""
    model = convert_moe_packed_tensors(stored["m_blocks"], stored["m_scales"], dtype=torch.float32)
    return model.transpose(1, 2).reshape(-1, model.shape[1])


def _int_store(config: dict[str, Any]) -> Callable[[torch.Tensor], Stored]:
    def store(value: torch.Tensor) -> Stored:
        packed = reference_int(value, config)
        order = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        return {f"m.{key}": packed[key] for key in order if key in packed}

    return store


def _int_values(config: dict[str, Any]) -> Callable[[Stored], torch.Tensor]:
    return lambda stored: library_int_values({k.removeprefix("m."): v for k, v in stored.items()}, config)


def _fp8_cases() -> list[Case]:
    cases = []
    for name, config in (("blocks", fine_grained((16, 32))), ("tensor", fine_grained(None))):
        cases.append(
            Case(f"fine-grained-{name}", config, (48, 64), _fine_grained_store(config), _fine_grained_values(config))
        )
    for strategy in ("channel", "tensor"):
        config = compressed_tensors(strategy)
        cases.append(Case(f"ct-{strategy}", config, (48, 64), _ct_fp8_store(config), _ct_fp8_values(config)))
    return cases


def _int_cases() -> list[Case]:
    cases = []
    for bits, symmetric, group in ((4, True, 8), (4, False, 8), (8, True, None)):
        config = int_config(bits, symmetric, group)
        name = f"int{bits}-{'sym' if symmetric else 'asym'}-{group or 'channel'}"
        cases.append(Case(name, config, (24, 32), _int_store(config), _int_values(config)))
    return cases


def _nvfp4_store(value: torch.Tensor) -> Stored:
    packed = reference_nvfp4(value)
    return {f"m.{key}": packed[key] for key in ("weight_packed", "weight_scale", "weight_global_scale")}


def _nvfp4_values(stored: Stored) -> torch.Tensor:
    return library_nvfp4_values({k.removeprefix("m."): v for k, v in stored.items()})


def _nvfp4_refused() -> list[dict[str, Any]]:
    weights = nvfp4_config()["config_groups"]["group_0"]["weights"]
    return [
        nvfp4_config() | {"config_groups": {"g": {"weights": weights | changed}}}
        for changed in ({"group_size": 32}, {"symmetric": False}, {"scale_dtype": "torch.bfloat16"})
    ]


# Every registered codec's cases, by codec name.
CASES: dict[str, list[Case]] = {
    "fp8": _fp8_cases(),
    "mxfp4": [Case("experts", mxfp4_config(), (16, 64), _mxfp4_store, _mxfp4_values, model="m")],
    "int": _int_cases(),
    "nvfp4": [Case("groups", nvfp4_config(), (24, 64), _nvfp4_store, _nvfp4_values)],
    # 40 x 512: 320 blocks of 64 values, more than one nested block of 256
    "bnb": [
        Case(
            kind, bnb_config(kind), (40, 512), partial(reference_bnb, kind=kind), partial(library_bnb_values, kind=kind)
        )
        for kind in KINDS
    ],
}
ALL = [pytest.param(codec, case, id=f"{codec}-{case.name}") for codec, cases in CASES.items() for case in cases]
WRITTEN = [param for param in ALL if next(c for c in registered() if c.name == param.values[0]).writes]

# Configs each codec must refuse, one line naming the file.
REFUSED = {
    "fp8": [fine_grained(weight_block_size=[0, 128]), compressed_tensors("group")],
    "mxfp4": [mxfp4_config() | {"dequantize": True}],
    "int": [int_config(3), int_config(4) | {"config_groups": {"group_0": {"weights": {"type": "int", "num_bits": 4}}}}],
    "nvfp4": _nvfp4_refused(),
    "bnb": [
        {"quant_method": "bitsandbytes"},
        bnb_config("nf4") | {"bnb_4bit_quant_type": "int4"},
        bnb_config("nf4") | {"bnb_4bit_quant_storage": "bfloat16"},
    ],
}


def test_every_registered_codec_has_a_kernel_and_conformance_cases() -> None:
    names = {codec.name for codec in registered()}
    assert names == set(CASES) == set(REFUSED) == set(kernels.registered())


@pytest.mark.parametrize(("codec", "case"), ALL)
def test_its_configs_are_read_by_it_alone(codec: str, case: Case, tmp_path: Path) -> None:
    claims = [known.name for known in registered() if known.claims(case.config)]
    assert claims == [codec]
    fmt = read_quantization({"quantization_config": case.config}, tmp_path / "config.json")
    assert fmt is not None and fmt.codec.name == codec and kernels.registered()[codec].name == codec
    assert fmt.describe()
    for refused in REFUSED[codec]:
        with pytest.raises(InputError) as caught:
            read_quantization({"quantization_config": refused}, tmp_path / "config.json")
        assert caught.value.file == str(tmp_path / "config.json")


@pytest.mark.parametrize(("codec", "case"), ALL)
def test_its_weights_are_found_with_their_companions_and_half_present_ones_refused(
    codec: str, case: Case, tmp_path: Path
) -> None:
    fmt = _format(case, tmp_path)
    stored = case.store(_sample(case))
    located = _save(stored, tmp_path / "whole.safetensors")
    assert [name for name, (info, _) in located.items() if fmt.codec.is_stored(name, info)] == [next(iter(stored))]
    found = _find(fmt, stored, tmp_path / "whole.safetensors")
    assert list(found) == [case.model]
    weight = found[case.model]
    assert weight.stored == tuple(stored)
    assert (math.prod(weight.shape[:-1]), weight.shape[-1]) == case.shape
    names = list(stored)
    scale = stored[names[1]]  # the scale grid the format declares
    assert scale.numel() == 1 if fmt.strategy == "tensor" else fmt.scale_shape(weight.shape) == tuple(scale.shape)
    for missing in [info.name for info, _ in weight.companions]:
        problems = _problems(fmt, {k: v for k, v in stored.items() if k != missing}, tmp_path / "part.safetensors")
        assert problems, missing
        assert all(problem.tensor in names for problem in problems), missing


@pytest.mark.parametrize(("codec", "case"), ALL)
def test_dequantize_reads_the_reference_bytes_as_the_library_does(codec: str, case: Case, tmp_path: Path) -> None:
    fmt = _format(case, tmp_path)
    stored = case.store(_sample(case))
    found = _find(fmt, stored, tmp_path / "whole.safetensors")[case.model]
    values = _ours(fmt, case, stored, found)
    assert torch.equal(values.view(torch.int32), case.values(stored).view(torch.int32))


@pytest.mark.parametrize(("codec", "case"), WRITTEN)
def test_quantize_writes_the_reference_bytes(codec: str, case: Case, tmp_path: Path) -> None:
    fmt = _format(case, tmp_path)
    value = _sample(case)
    expected = case.store(value)
    kernel = kernels.kernel_of(fmt)
    names = list(expected)
    weight = expected[names[0]]
    rows = weight.reshape(case.shape[0], -1)
    out = torch.empty_like(rows)
    scale_dtype = expected[names[1]].dtype
    companions = kernel.written(fmt, kernel.quantize(fmt, value.clone(), out, scale_dtype))
    assert torch.equal(out.view(torch.uint8), rows.view(torch.uint8))
    for name, ours in zip(names[1:], companions, strict=False):
        theirs = expected[name]
        assert torch.equal(ours.reshape(theirs.shape).view(torch.uint8), theirs.view(torch.uint8)), name


@pytest.mark.parametrize(("codec", "case"), WRITTEN)
def test_codes_are_told_within_one_step(codec: str, case: Case, tmp_path: Path) -> None:
    fmt = _format(case, tmp_path)
    weight = next(iter(case.store(_sample(case)).values()))
    kernel = kernels.kernel_of(fmt)
    assert kernel.within_one_step(fmt, weight, weight.clone())
    far = weight.clone()
    far.view(torch.uint8).view(-1)[0] ^= 0x06  # two steps or more away, in every format's code
    assert not kernel.within_one_step(fmt, far, weight)


def _format(case: Case, tmp_path: Path) -> QuantFormat:
    fmt = read_quantization({"quantization_config": case.config}, tmp_path / "config.json")
    assert fmt is not None
    return fmt


def _sample(case: Case) -> torch.Tensor:
    """Values with a spread of magnitudes, a zero row and exact ties."""
    generator = torch.Generator().manual_seed(26)
    rows, cols = case.shape
    value = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 1, rows).unsqueeze(1)
    value[1] = 0.0
    value[2, :4] = torch.tensor([0.25, -0.75, 5.0, 2.5])
    return value


def _save(stored: Stored, path: Path) -> dict[str, tuple[Any, Path]]:
    save_file({name: tensor.contiguous() for name, tensor in stored.items()}, path)
    return {name: (info, path) for name, info in read_header(path).tensors.items()}


def _find(fmt: QuantFormat, stored: Stored, path: Path) -> dict[str, QuantizedWeight]:
    problems: list[ShardmergeError] = []
    found = fmt.codec.find(fmt, _save(stored, path), problems, transposed=True)
    assert not problems, problems
    return found


def _problems(fmt: QuantFormat, stored: Stored, path: Path) -> list[ShardmergeError]:
    problems: list[ShardmergeError] = []
    fmt.codec.find(fmt, _save(stored, path), problems, transposed=True)
    return problems


def _ours(fmt: QuantFormat, case: Case, stored: Stored, found: QuantizedWeight) -> torch.Tensor:
    """Our kernel's float32 values of ``stored``, rows by columns, the companions the codec
    ``found`` read row by row as the merge reads them (a vector's elements are its rows)."""
    kernel = kernels.registered()[fmt.codec.name]
    weight = stored[found.weight[0].name].reshape(case.shape[0], -1)
    companions = [stored[info.name] for info, _ in found.companions]
    if fmt.packed:
        lines = [c.reshape(-1, 1) if c.dim() < 2 else c.reshape(-1, c.shape[-1]) for c in companions]

        def read(index: int, span: tuple[int, int] | None) -> torch.Tensor:
            return lines[index] if span is None else lines[index][span[0] : span[1]]

        rows = (0, case.shape[0])
        reader = cast(PackedReader, kernel)
        companions = [reader.companion_rows(fmt, index, rows, read) for index in range(len(lines))]
    return kernel.dequantize(fmt, torch.empty(case.shape), weight, tuple(companions))


@pytest.mark.parametrize("shape", [(0, 32), (-24, 32), (24, 0)])
def test_a_packed_weight_shape_that_is_not_two_positive_numbers_is_refused(
    shape: tuple[int, int], tmp_path: Path
) -> None:
    """``weight_shape`` is data read from the shard: a weight of no rows or columns (whose
    stored tensors are empty too) would divide by zero when its rows are read."""
    case = CASES["int"][0]
    fmt = _format(case, tmp_path)
    rows, cols = shape
    stored = {
        "m.weight_packed": torch.zeros(max(rows, 0), max(cols, 0) * fmt.bits // 32, dtype=torch.int32),
        "m.weight_scale": torch.zeros(max(rows, 0), max(cols, 0) // 8, dtype=torch.bfloat16),
        "m.weight_shape": torch.tensor(shape, dtype=torch.int64),
    }
    problems = _problems(fmt, stored, tmp_path / "empty.safetensors")
    assert [problem.tensor for problem in problems] == ["m.weight_packed"]
    assert "weight_shape" in str(problems[0])
