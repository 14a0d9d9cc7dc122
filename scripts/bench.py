"""Benchmark: shardmerge against copying the same shards with ``cp`` and ``sync``.

Generates a Llama-shaped bf16 checkpoint and a LoRA adapter of rank 16 on every linear layer
(default: hidden 4096, intermediate 11008, 4 layers, vocab 32000, 5 shards, about 2 GiB;
``--preset 70b-slice``: two layers of a 70B model with its 8 key-value heads and 128256-token
vocabulary, 2 shards, about 7.6 GB), then times, ``--repeats`` times each:

- ``cp`` of the shards then ``sync``: the yardstick, as durable as shardmerge's fsyncs;
- ``cp`` alone, which only fills the page cache;
- ``python -c "import shardmerge, torch"``: the start-up, subtracted from shardmerge's figures;
- ``shardmerge merge --device DEVICE`` (and with ``--peft``, PEFT's ``merge_and_unload()``).

The protocol: every run starts from the same state (the previous output deleted and ``sync``
called, untimed), the order of the commands alternates (A B C, C B A, ...), and the report
gives medians, the ratio to cp+sync, and CPU seconds (user + system) per GiB of shards, which
are far steadier than wall times on a shared machine. Run as root, the bench also times every
command with the page cache dropped first (a cold cache), in a second table; ``--no-cold``
skips it. Peak RSS is each child's own ``ru_maxrss``; CPU time is shown in user and kernel
mode apart too. The first line names the machine (CPU model, cores and the vector features
that decide the arithmetic's speed, the kernel, the file system of the work folder), since
figures from different machines differ by more than any change measured on one. ``--sweep 4,8`` repeats the run for each
layer count, to show how memory grows with the model; ``--batch N`` times N adapters merged by
one batch file (one pass over the base) against N separate merges. ``--fp8`` stores the
preset's linear weights in fine-grained FP8 (128x128 blocks, float32 ``weight_scale_inv``,
quantized as transformers does) and times two merges: requantized to FP8 (the default) and
dequantized to bfloat16. ``--preset gpt-oss`` is a gpt-oss-shaped model (hidden and
intermediate size 2880, 8 fused experts a layer, stored [experts, in, out] as the -BF16
releases store them) with LoRA of rank 16 on attention and on both expert parameters;
``--mxfp4`` stores its experts in MXFP4 as the gpt-oss releases do, and times the merge
requantized to MXFP4 and dequantized to bfloat16. ``--nvfp4`` stores the preset's linear
weights in compressed-tensors NVFP4 (times the merge kept in NVFP4 and dequantized to
bfloat16), ``--bnb4`` in bitsandbytes NF4 with double quantization (a QLoRA base, merged to
bfloat16); both also time the merge into the same model in bfloat16 ("16-bit base").
``--executor ray --nodes N`` starts a Ray cluster of N one-CPU worker nodes on this machine
(on 127.0.0.1) and times the same merge by the local executor and by ``--executor ray`` on it.
``--combine METHOD --adapters N`` times N adapters combined by METHOD (``--density``, 0.5 by
default) against the same N applied in turn, with each one's peak RSS against its plan.

    python scripts/bench.py                       # default model, 5 runs of each command
    python scripts/bench.py --preset 70b-slice    # a 70B model's largest tensors
    python scripts/bench.py --sweep 4,8           # peak RSS against model size
    python scripts/bench.py --batch 4             # 4 adapters: one batch against 4 merges
    python scripts/bench.py --fp8                 # the same model with FP8 linear weights
    python scripts/bench.py --preset gpt-oss      # fused experts in bfloat16
    python scripts/bench.py --mxfp4               # the same model with MXFP4 experts
    python scripts/bench.py --nvfp4               # NVFP4 linear weights, beside the 16-bit merge
    python scripts/bench.py --bnb4                # a bitsandbytes NF4 base, beside the 16-bit merge
    python scripts/bench.py --executor ray --nodes 2   # local executor against a 2-node Ray cluster
    python scripts/bench.py --combine ties --adapters 3  # 3 adapters by TIES against applied in turn
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD_DIM = 128
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
LOOPBACK = "127.0.0.1"
PROTOCOL = "medians of {repeats} runs in alternating order, each after deleting its output and sync"
# What users run today: the whole model in memory, merged by PEFT, saved by transformers.
PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    shards: int
    rank: int
    key_value_heads: int
    adapters: int = 1
    fp8: bool = False
    experts: int = 0  # gpt-oss's fused experts a layer (0: a Llama)
    mxfp4: bool = False
    nvfp4: bool = False  # linear weights in compressed-tensors NVFP4
    bnb4: bool = False  # linear weights in bitsandbytes NF4, double-quantized (a QLoRA base)

    @property
    def name(self) -> str:
        name = (
            f"h{self.hidden}-i{self.intermediate}-kv{self.key_value_heads}-v{self.vocab}-l{self.layers}-s{self.shards}"
        )
        name += f"-e{self.experts}" if self.experts else ""
        return (
            name
            + (f"-x{self.adapters}" if self.adapters > 1 else "")
            + ("-fp8" if self.fp8 else "")
            + ("-mxfp4" if self.mxfp4 else "")
            + ("-nvfp4" if self.nvfp4 else "")
            + ("-bnb4" if self.bnb4 else "")
        )

    @property
    def quantized(self) -> str:
        kinds = {
            "fp8": ", FP8 linear weights",
            "mxfp4": ", MXFP4 experts",
            "nvfp4": ", NVFP4 linear weights",
            "bnb4": ", bitsandbytes NF4 linear weights (double-quantized)",
        }
        return next((text for kind, text in kinds.items() if getattr(self, kind)), "")

    @property
    def sixteen_bit(self) -> Shape:
        """The same model in bfloat16."""
        return replace(self, fp8=False, mxfp4=False, nvfp4=False, bnb4=False)


DEFAULT = Shape(layers=4, hidden=4096, intermediate=11008, vocab=32000, shards=5, rank=16, key_value_heads=32)
PRESETS = {
    "default": DEFAULT,
    "70b-slice": Shape(layers=2, hidden=8192, intermediate=28672, vocab=128256, shards=2, rank=16, key_value_heads=8),
    "gpt-oss": Shape(
        layers=2, hidden=2880, intermediate=2880, vocab=32000, shards=3, rank=16, key_value_heads=8, experts=8
    ),
}
GPT_OSS_HEADS, GPT_OSS_HEAD_DIM = 64, 64
LAYERS_OF_70B = 80
FP8_BLOCK = 128


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    h, i, kv = shape.hidden, shape.intermediate, shape.key_value_heads * HEAD_DIM
    if shape.experts:  # gpt-oss: attention only; its experts are fused (see expert_shapes)
        q, kv = GPT_OSS_HEADS * GPT_OSS_HEAD_DIM, shape.key_value_heads * GPT_OSS_HEAD_DIM
        return {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
        }
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def expert_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """gpt-oss's fused expert parameters: (in, out) of each expert's matrix."""
    return {
        "mlp.experts.gate_up_proj": (shape.hidden, 2 * shape.intermediate),
        "mlp.experts.down_proj": (shape.intermediate, shape.hidden),
    }


def generate(shape: Shape, folder: Path) -> None:
    """Write the base (shard by shard, so generation memory is one shard) and the adapter."""
    import torch
    from safetensors.torch import save_file

    from shardmerge.codecs import read_quantization
    from shardmerge.run.codecs.fp8 import largest, quantize_into, scales_for
    from shardmerge.run.codecs.mxfp4 import mxfp4_quantize

    quantization = {"quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "activation_scheme": "dynamic"}
    if shape.nvfp4:
        quantization = NVFP4_CONFIG
    if shape.bnb4:
        quantization = BNB4_CONFIG
    fmt = read_quantization({"quantization_config": quantization}, folder) if shape.fp8 else None
    quantize = _linear_quantizer(shape)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        names += [(f"{prefix}.input_layernorm.weight", (shape.hidden,))]
        names += [(f"{prefix}.{module}.weight", dims) for module, dims in linear_shapes(shape).items()]
        names += [(f"{prefix}.post_attention_layernorm.weight", (shape.hidden,))]
        if shape.experts:
            names += [(f"{prefix}.mlp.router.weight", (shape.experts, shape.hidden))]
            for module, (inputs, outputs) in expert_shapes(shape).items():
                if shape.mxfp4:
                    names += [(f"{prefix}.{module}_blocks", (shape.experts, outputs, inputs // 32, 16))]
                    names += [(f"{prefix}.{module}_scales", (shape.experts, outputs, inputs // 32))]
                else:
                    names += [(f"{prefix}.{module}", (shape.experts, inputs, outputs))]
                names += [(f"{prefix}.{module}_bias", (shape.experts, outputs))]
    names += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]
    quantized = {name for name, dims in names if (fmt or quantize) and len(dims) == 2 and "_proj" in name}

    def nbytes_of(name: str, dims: tuple[int, ...]) -> int:
        if name in quantized and quantize is not None:
            return _numel(dims) // 2
        return (1 if name in quantized or name.endswith(("_blocks", "_scales")) else 2) * _numel(dims)

    total = sum(nbytes_of(name, dims) for name, dims in names)
    budget = total / shape.shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in names:
        nbytes = nbytes_of(name, dims)
        if size and size + nbytes > budget and len(groups) < shape.shards:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, dims in group:
            if name.endswith("_scales"):
                continue  # written with its blocks
            if name.endswith("_blocks"):
                experts, outputs, blocks, _ = dims
                value = torch.randn(experts * outputs, blocks * 32, generator=generator) * 0.02
                packed = torch.empty(experts * outputs, blocks * 16, dtype=torch.uint8)
                scales = torch.empty(experts * outputs, blocks, dtype=torch.uint8)
                mxfp4_quantize(value, packed, scales)
                tensors[name] = packed.view(dims)
                tensors[name.removesuffix("_blocks") + "_scales"] = scales.view(dims[:3])
                continue
            value = torch.randn(dims, generator=generator) * 0.02
            if quantize is not None and name in quantized:
                tensors.update(quantize(name.removesuffix(".weight"), value))
            elif fmt is not None and name in quantized:
                stored, factor = scales_for(largest(value, fmt), fmt, torch.float32)
                tensors[name] = quantize_into(torch.empty(dims, dtype=torch.float8_e4m3fn), value, factor, fmt)
                tensors[name.removesuffix("weight") + "weight_scale_inv"] = stored
            else:
                tensors[name] = value.to(torch.bfloat16)
        save_file(tensors, base / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.hidden // HEAD_DIM,
        "num_key_value_heads": shape.key_value_heads,
        "vocab_size": shape.vocab,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    if fmt is not None or quantize is not None:
        config["quantization_config"] = quantization
    if shape.experts:
        config |= {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_attention_heads": GPT_OSS_HEADS,
            "head_dim": GPT_OSS_HEAD_DIM,
            "num_local_experts": shape.experts,
        }
    if shape.mxfp4:
        keep = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": keep}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    lora = {}
    for layer in range(shape.layers):
        for module, (out_features, in_features) in linear_shapes(shape).items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(shape.rank, in_features, generator=generator) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, shape.rank, generator=generator) * 0.01
        # PEFT's target_parameters: the first parameter's LoRA sits on base_layer, the second's on the module.
        for owner, (inputs, outputs) in zip(
            ("experts.base_layer", "experts"), expert_shapes(shape).values(), strict=True
        ):
            if not shape.experts:
                break
            key = f"base_model.model.model.layers.{layer}.mlp.{owner}"
            rank = shape.rank * shape.experts
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "r": shape.rank,
        "lora_alpha": 2 * shape.rank,
        "target_modules": [module.rpartition(".")[2] for module in linear_shapes(shape)],
        "target_parameters": list(expert_shapes(shape)) if shape.experts else None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    for number in range(1, shape.adapters):  # more adapters of the same shape, values of their own
        other = folder / f"adapter-{number}"
        other.mkdir()
        values = {key: torch.randn(value.shape, generator=generator) * 0.01 for key, value in lora.items()}
        save_file(values, other / "adapter_model.safetensors")
        (other / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


NVFP4_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": False, "scale_dtype": "torch.float8_e4m3fn",
            },
        }
    },
    "ignore": ["lm_head"],
}  # fmt: skip
BNB4_CONFIG = {
    "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
}  # fmt: skip


def _linear_quantizer(shape: Shape) -> Callable[[str, Any], dict[str, Any]] | None:
    """The stored tensors of a module's linear weight in NVFP4 (shardmerge's quantizer, which
    the tests hold to compressed-tensors') or bitsandbytes NF4 (bitsandbytes' own)."""
    import torch

    if shape.nvfp4:
        from shardmerge.codecs import read_quantization
        from shardmerge.run.codecs import kernel_of

        fmt = read_quantization({"quantization_config": NVFP4_CONFIG}, Path("config.json"))
        assert fmt is not None
        kernel = kernel_of(fmt)

        def nvfp4(module: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
            packed = torch.empty(value.shape[0], value.shape[1] // 2, dtype=torch.uint8)
            scales, scale_of_scales = kernel.quantize(fmt, value, packed, torch.float8_e4m3fn)
            return {
                f"{module}.weight_packed": packed,
                f"{module}.weight_scale": scales,
                f"{module}.weight_global_scale": scale_of_scales,
            }

        return nvfp4
    if shape.bnb4:
        from bitsandbytes import functional as bnb

        def nf4(module: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
            packed, state = bnb.quantize_4bit(value.bfloat16(), quant_type="nf4", compress_statistics=True)
            parts = {f"{module}.weight.{key}": tensor for key, tensor in state.as_dict(packed=True).items()}
            return {f"{module}.weight": packed, **parts}

        return nf4
    return None


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    user: float  # CPU seconds in user mode
    system: float  # CPU seconds in the kernel
    rss: int  # peak resident bytes

    @property
    def cpu(self) -> float:
        return self.user + self.system


def timed(command: list[str]) -> Sample:
    """One child process: its wall time, its CPU time and its peak RSS (its own, not its parent's)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(command)}")
    return Sample(seconds, usage.ru_utime, usage.ru_stime, usage.ru_maxrss * 1024)


def alternate(
    commands: dict[str, list[str]], repeats: int, fresh: Callable[[], None], *, cold: bool
) -> dict[str, list[Sample]]:
    """``repeats`` runs of each command, in alternating order; before each (untimed) ``fresh()``
    clears the outputs, then ``sync``, then with ``cold`` the page cache is dropped."""
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    names = list(commands)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            fresh()
            os.sync()
            if cold:
                DROP_CACHES.write_text("3\n")
            samples[name].append(timed(commands[name]))
    return samples


def prepare(shape: Shape, work: Path) -> Path:
    """The generated base and adapters for ``shape``, made once and kept in ``work``."""
    data = work / shape.name
    if not (data / "ready").exists():
        shutil.rmtree(data, ignore_errors=True)
        # In a child process: a child's ru_maxrss starts from its parent's size at fork, so
        # this process must stay small for the figures to be the children's own.
        spec = json.dumps(shape.__dict__)
        subprocess.run([sys.executable, __file__, "--generate", spec, "--workdir", str(data)], check=True)
        (data / "ready").touch()
    return data


@dataclass(frozen=True)
class Result:
    shape: Shape
    size: int  # bytes of shards
    estimate: int  # the plan's peak memory estimate
    warm: dict[str, list[Sample]]
    cold: dict[str, list[Sample]] | None


@dataclass(frozen=True)
class Setup:
    """The generated model, the commands every run times, and where their outputs go."""

    data: Path
    size: int  # bytes of shards
    commands: dict[str, list[str]]  # cp+sync, cp, start-up, shardmerge

    def fresh(self) -> None:
        shutil.rmtree(self.data / "out", ignore_errors=True)
        shutil.rmtree(self.data / "cp-out", ignore_errors=True)
        (self.data / "cp-out").mkdir()


def setup(shape: Shape, work: Path, device: str) -> Setup:
    data = prepare(shape, work)
    # The package's bytecode, compiled once as an installed wheel's is: from a source checkout
    # (with PYTHONDONTWRITEBYTECODE set, as on some CI machines) each run would compile every
    # module again, about 0.15 s of CPU that is not the merge's.
    spec = importlib.util.find_spec("shardmerge")
    assert spec is not None and spec.submodule_search_locations
    subprocess.run([sys.executable, "-m", "compileall", "-q", *spec.submodule_search_locations], check=True)
    base = data / "base"
    shards = sorted(str(path) for path in base.glob("*.safetensors"))
    shardmerge = str(Path(sys.executable).with_name("shardmerge"))
    out, copies = data / "out", data / "cp-out"
    merge = [shardmerge, "merge", str(base), str(data / "adapter"), "-o", str(out), "--device", device, "--quiet"]
    commands = {
        "cp+sync": ["sh", "-c", 'cp "$@" && sync', "cp", *shards, str(copies)],
        "cp": ["cp", *shards, str(copies)],
        "start-up": [sys.executable, "-c", "import shardmerge, torch"],
        "shardmerge": merge,
    }
    return Setup(data, sum(Path(path).stat().st_size for path in shards), commands)


def run(shape: Shape, work: Path, repeats: int, *, peft: bool, cold: bool, device: str) -> Result:
    made = setup(shape, work, device)
    data, size, commands, out = made.data, made.size, dict(made.commands), made.data / "out"
    base = data / "base"
    shardmerge = commands["shardmerge"][0]
    if shape.fp8 or shape.mxfp4 or shape.nvfp4:  # the default keeps the format; also the dequantized output
        commands["to-bf16"] = [*commands["shardmerge"], "--dtype", "bfloat16"]
    if shape.nvfp4 or shape.bnb4:  # the 16-bit merge of the same model, beside it
        plain = prepare(shape.sixteen_bit, work) / "base"
        commands["16-bit base"] = [*commands["shardmerge"][:2], str(plain), *commands["shardmerge"][3:]]
    if peft:
        commands["peft"] = [sys.executable, "-c", PEFT_MERGE, str(base), str(data / "adapter"), str(out)]

    warm = alternate(commands, repeats, made.fresh, cold=False)
    dropped = alternate(commands, repeats, made.fresh, cold=True) if cold else None
    made.fresh()
    plan = subprocess.run(
        [shardmerge, "plan", str(base), str(data / "adapter"), "--json"], capture_output=True, check=True, text=True
    )
    return Result(shape, size, json.loads(plan.stdout)["peak_memory_bytes"], warm, dropped)


def run_batch(shape: Shape, work: Path, repeats: int) -> None:
    """N adapters on one base: one batch file (one pass over the base) against N merges."""
    data = prepare(shape, work)
    base = data / "base"
    adapters = [data / "adapter", *(data / f"adapter-{number}" for number in range(1, shape.adapters))]
    shardmerge = str(Path(sys.executable).with_name("shardmerge"))
    jobs = [{"name": f"job{number}", "adapters": [str(adapter)]} for number, adapter in enumerate(adapters)]
    batch = data / "batch.yaml"
    batch.write_text(
        json.dumps({"defaults": {"base": str(base), "output": "outs/batch-{name}", "device": "cpu"}, "jobs": jobs})
    )
    separate = " && ".join(
        f"{shardmerge} merge {base} {adapter} -o {data / 'outs' / f'separate-{number}'} --device cpu --quiet"
        for number, adapter in enumerate(adapters)
    )
    commands = {
        "cp": [
            "sh",
            "-c",
            " && ".join(f"cp {base}/*.safetensors {data / 'outs' / f'cp-{n}'}" for n in range(len(adapters))),
        ],
        "batch": [shardmerge, "run", str(batch), "--quiet"],
        "separate": ["sh", "-c", separate],
    }

    def fresh() -> None:
        shutil.rmtree(data / "outs", ignore_errors=True)
        for number in range(len(adapters)):
            (data / "outs" / f"cp-{number}").mkdir(parents=True)

    samples = alternate(commands, repeats, fresh, cold=False)
    shutil.rmtree(data / "outs", ignore_errors=True)
    size = sum(path.stat().st_size for path in base.glob("*.safetensors"))
    wall = {name: statistics.median(run.wall for run in runs) for name, runs in samples.items()}
    rss = {name: max(run.rss for run in runs) for name, runs in samples.items()}
    count = len(adapters)
    print(f"\n{count} adapters on one base of {size / 2**30:.2f} GiB; {PROTOCOL.format(repeats=repeats)}")
    print(f"{'':24} {'wall s':>8} {'x cp':>6} {'peak RSS':>10}")
    labels = {
        "cp": f"cp of the shards x{count}",
        "batch": "one batch (one pass)",
        "separate": f"{count} separate merges",
    }
    for name in commands:
        print(f"{labels[name]:24} {wall[name]:8.2f} {wall[name] / wall['cp']:6.2f} {rss[name] / 2**20:8.0f} MB")
    print(f"separate / batch wall time: {wall['separate'] / wall['batch']:.2f}")


def run_combine(shape: Shape, work: Path, repeats: int, method: str, density: float) -> None:
    """``shape.adapters`` adapters on every linear layer combined by ``method`` against the same
    adapters applied in turn (``--combine linear``): time, CPU and peak RSS, each against the
    plan's estimate."""
    made = setup(shape, work, "cpu")
    data, commands = made.data, dict(made.commands)
    base = data / "base"
    adapters = [str(data / "adapter"), *(str(data / f"adapter-{n}") for n in range(1, shape.adapters))]
    linear = [*commands["shardmerge"][:3], *adapters, *commands["shardmerge"][4:]]
    options = ["--combine", method, "--density", str(density)]
    commands["shardmerge"] = linear
    commands[method] = [*linear, *options]
    samples = alternate(commands, repeats, made.fresh, cold=False)
    made.fresh()
    shardmerge = linear[0]
    plans = {
        name: json.loads(
            subprocess.run(
                [shardmerge, "plan", str(base), *adapters, "--json", *extra],
                capture_output=True,
                check=True,
                text=True,
            ).stdout
        )
        for name, extra in (("shardmerge", []), (method, options))
    }
    tensors = [t for shard in plans[method]["shards"] for t in shard["tensors"] if t["ops"]]
    merged = sum(t["end"] - t["begin"] for t in tensors)
    passes = sorted({t["passes"] for t in tensors})
    print(
        f"\n{shape.adapters} adapters (rank {shape.rank}, every linear layer) on {shape.layers} layers, hidden "
        f"{shape.hidden}: {made.size / 2**30:.2f} GiB, {merged / 2**30:.2f} GiB of it merged; --combine {method} "
        f"--density {density} takes {', '.join(map(str, passes))} passes a merged tensor"
    )
    print(f"warm page cache; {PROTOCOL.format(repeats=repeats)}")
    table(samples, made.size)
    wall = {name: statistics.median(s.wall for s in runs) for name, runs in samples.items()}
    cpu = {name: statistics.median(s.cpu for s in runs) for name, runs in samples.items()}
    rss = {name: max(s.rss for s in runs) for name, runs in samples.items()}
    for name in ("shardmerge", method):
        working = rss[name] - rss["start-up"]
        estimate = plans[name]["peak_memory_bytes"]
        verdict = "within" if working <= estimate else "OVER"
        print(
            f"{'linear' if name == 'shardmerge' else name}: peak RSS above start-up {working / 2**20:.0f} MB, "
            f"{verdict} the plan's estimate of {estimate / 2**20:.0f} MB"
        )
    extra = (cpu[method] - cpu["shardmerge"]) / (merged / 2**30)
    print(
        f"{method} / linear: wall {wall[method] / wall['shardmerge']:.2f}, CPU {cpu[method] / cpu['shardmerge']:.2f}; "
        f"{extra:.2f} CPU s more per GiB of merged weights"
    )


def run_on_cluster(shape: Shape, work: Path, repeats: int, nodes: int) -> None:
    """The same merge by the local executor and by ``--executor ray`` on a Ray cluster of
    ``nodes`` worker nodes of one CPU each, all on this machine and on 127.0.0.1."""
    # Ray binds to the address of the route outside unless told to stay on loopback; read
    # when Ray is imported, and inherited by the drivers below.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    made = setup(shape, work, "cpu")
    root = Path(tempfile.mkdtemp(prefix="smbench-"))  # Ray's socket paths must stay short
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK, "temp_dir": str(root), "include_dashboard": False},
    )
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        ray = [*made.commands["shardmerge"], "--executor", "ray", "--ray-address", str(cluster.address)]
        samples = alternate({**made.commands, "ray": ray}, repeats, made.fresh, cold=False)
        made.fresh()
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    size = made.size
    print(f"\n{size / 2**30:.2f} GiB in {shape.shards} shards; Ray: {nodes} worker nodes of 1 CPU on this machine")
    print(f"warm page cache; {PROTOCOL.format(repeats=repeats)}")
    wall = table(samples, size)
    print(f"ray / local wall time: {wall['ray'] / wall['shardmerge']:.2f}")


def table(samples: dict[str, list[Sample]], size: int) -> dict[str, float]:
    """Print the medians of each command; returns the median wall times."""
    wall = {name: statistics.median(s.wall for s in runs) for name, runs in samples.items()}
    cpu = {name: statistics.median(s.cpu for s in runs) for name, runs in samples.items()}
    user = {name: statistics.median(s.user for s in runs) for name, runs in samples.items()}
    system = {name: statistics.median(s.system for s in runs) for name, runs in samples.items()}
    rss = {name: max(s.rss for s in runs) for name, runs in samples.items()}
    heads = f"{'wall s':>8} {'x cp+sync':>10} {'x cp':>6} {'CPU s':>7} {'user s':>7} {'kernel s':>8} {'peak RSS':>10}"
    print(f"{'':12} {heads}")
    for name in samples:
        memory = f"{rss[name] / 2**20:7.0f} MB" if name not in ("cp", "cp+sync") else ""
        ratios = f"{wall[name] / wall['cp+sync']:10.2f} {wall[name] / wall['cp']:6.2f}"
        times = f"{cpu[name]:7.2f} {user[name]:7.2f} {system[name]:8.2f}"
        print(f"{name:12} {wall[name]:8.2f} {ratios} {times} {memory:>10}")
    less = wall["shardmerge"] - wall["start-up"]
    per_gib = (cpu["shardmerge"] - cpu["start-up"]) / (size / 2**30)
    print(
        f"shardmerge less start-up: {less:.2f} s = {less / wall['cp+sync']:.2f} x cp+sync "
        f"({less / wall['cp']:.2f} x cp alone); CPU {per_gib:.2f} s per GiB of shards"
    )
    return wall


def machine(work: Path) -> str:
    """The machine the figures were measured on: CPU model, cores and the flags that decide
    the arithmetic's speed, the kernel, and the file system of the work folder."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
    mounts = (
        [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        if Path("/proc/mounts").exists()
        else []
    )
    where = str(work.resolve())
    mount = max(
        (fields for fields in mounts if where == fields[1] or where.startswith(fields[1].rstrip("/") + "/")),
        key=lambda fields: len(fields[1]),
        default=["?", "?", "?"],
    )
    features = " ".join(flag for flag in wanted if flag in flags) or "no AVX2"
    return (
        f"machine: {model}, {os.cpu_count()} cores ({features}); "
        f"kernel {platform.release()}; work folder on {mount[2]} ({mount[0]} at {mount[1]})"
    )


def report(result: Result, repeats: int) -> None:
    shape, size = result.shape, result.size
    print(
        f"\nmodel: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.key_value_heads} key-value heads, vocab {shape.vocab}"
        f"{f', {shape.experts} experts a layer' if shape.experts else ''}{shape.quantized}: "
        f"{size / 2**30:.2f} GiB in {shape.shards} shards"
    )
    print(f"warm page cache; {PROTOCOL.format(repeats=repeats)}")
    wall = table(result.warm, size)
    rss = {name: max(s.rss for s in runs) for name, runs in result.warm.items()}
    working = rss["shardmerge"] - rss["start-up"]
    verdict = "within" if working <= result.estimate else "OVER"
    print(
        f"shardmerge peak RSS above start-up: {working / 2**20:.0f} MB, {verdict} the plan's estimate of "
        f"{result.estimate / 2**20:.0f} MB"
    )
    if "peft" in wall:
        print(f"PEFT / shardmerge wall time: {wall['peft'] / wall['shardmerge']:.2f}")
    if result.cold is not None:
        print(f"\ncold page cache (dropped before each run); {PROTOCOL.format(repeats=repeats)}")
        table(result.cold, size)
    if shape.layers < LAYERS_OF_70B and not shape.experts:
        whole = replace(shape, layers=LAYERS_OF_70B)
        scale = model_bytes(whole) / model_bytes(shape)
        less = (wall["shardmerge"] - wall["start-up"]) * scale
        print(
            f"projected for {LAYERS_OF_70B} layers ({model_bytes(whole) / 2**30:.0f} GiB) at these rates per byte: "
            f"shardmerge {less + wall['start-up']:.0f} s, cp+sync {wall['cp+sync'] * scale:.0f} s"
        )


def model_bytes(shape: Shape) -> int:
    per = 1 if shape.fp8 else 0.5 if shape.nvfp4 or shape.bnb4 else 2  # bytes a linear weight's value
    linear = int(sum(out * inp for out, inp in linear_shapes(shape).values()) * per)
    return 2 * (2 * shape.vocab * shape.hidden + shape.hidden + shape.layers * shape.hidden * 2) + shape.layers * linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--layers", type=int, help="layers of the preset's model (default: the preset's)")
    parser.add_argument("--sweep", help="comma-separated layer counts, e.g. 4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="shardmerge's --device (cpu, cuda)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--peft", action="store_true", help="also time PEFT merge_and_unload + save_pretrained")
    parser.add_argument("--batch", type=int, default=0, metavar="N", help="time N adapters: one batch vs N merges")
    parser.add_argument("--fp8", action="store_true", help="the preset's model with FP8 linear weights")
    parser.add_argument("--mxfp4", action="store_true", help="the gpt-oss preset with MXFP4 experts")
    parser.add_argument("--nvfp4", action="store_true", help="the preset's model with NVFP4 linear weights")
    parser.add_argument("--bnb4", action="store_true", help="the preset's model in bitsandbytes NF4 (QLoRA base)")
    parser.add_argument(
        "--combine",
        choices=["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"],
        help="time --adapters adapters combined by this method against --combine linear",
    )
    parser.add_argument("--adapters", type=int, default=3, help="with --combine: adapters combined (default 3)")
    parser.add_argument("--density", type=float, default=0.5, help="with --combine: the density (default 0.5)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--nodes", type=int, default=2, help="with --executor ray: worker nodes of the local cluster")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"))
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Shape(**json.loads(args.generate)), args.workdir)
        return
    print(machine(args.workdir))
    kinds = {"fp8": args.fp8, "mxfp4": args.mxfp4, "nvfp4": args.nvfp4, "bnb4": args.bnb4}
    preset = replace(PRESETS["gpt-oss" if args.mxfp4 else args.preset], **kinds)
    if args.layers:
        preset = replace(preset, layers=args.layers)
    if args.executor == "ray":
        run_on_cluster(preset, args.workdir, args.repeats, args.nodes)
        return
    if args.combine:
        run_combine(replace(preset, adapters=args.adapters), args.workdir, args.repeats, args.combine, args.density)
        return
    if args.batch:  # absolute: a batch file's paths are taken from the file's own folder
        run_batch(replace(preset, adapters=args.batch), args.workdir.resolve(), args.repeats)
        return
    cold = not args.no_cold and os.geteuid() == 0 and DROP_CACHES.exists()
    counts = [int(item) for item in args.sweep.split(",")] if args.sweep else [preset.layers]
    results = []
    for layers in counts:
        shape = replace(preset, layers=layers)
        results.append(run(shape, args.workdir, args.repeats, peft=args.peft, cold=cold, device=args.device))
        report(results[-1], args.repeats)
    if len(results) > 1:
        print("\npeak RSS of shardmerge against model size:")
        for result in results:
            peak = max(s.rss for s in result.warm["shardmerge"])
            print(f"  {result.shape.layers:3} layers  {result.size / 2**30:6.2f} GiB  {peak / 2**20:8.0f} MB")


if __name__ == "__main__":
    main()
