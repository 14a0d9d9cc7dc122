"""Benchmark: shardmerge against copying the same shards, with wall time and peak memory.

Generates a Llama-shaped bf16 checkpoint (default: hidden 4096, intermediate 11008, 4 layers,
vocab 32000, 5 shards, about 2 GiB) and a LoRA adapter of rank 16 on every linear layer,
then alternates ``cp`` of the shards, ``cp`` then ``sync`` (as durable as shardmerge's fsyncs),
``python -c "import shardmerge, torch"`` (start-up) and ``shardmerge merge --device cpu``
``--repeats`` times, with ``--peft`` also PEFT's ``merge_and_unload()`` + ``save_pretrained``.
Peak RSS is the child process's own ``ru_maxrss``. ``--sweep 4,8`` repeats the whole run
for each layer count, to show how memory grows with the model. ``--batch N`` instead times N
adapters merged by one batch file (one pass over the base) against N separate merges.

    python scripts/bench.py                     # default model, 3 alternating runs each
    python scripts/bench.py --sweep 4,8         # peak RSS against model size
    python scripts/bench.py --batch 4           # 4 adapters: one batch against 4 merges
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
    adapters: int = 1


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    h, i = shape.hidden, shape.intermediate
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h),
        "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def generate(shape: Shape, folder: Path) -> None:
    """Write the base (shard by shard, so generation memory is one shard) and the adapter."""
    import torch
    from safetensors.torch import save_file

    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        names += [(f"{prefix}.input_layernorm.weight", (shape.hidden,))]
        names += [(f"{prefix}.{module}.weight", dims) for module, dims in linear_shapes(shape).items()]
        names += [(f"{prefix}.post_attention_layernorm.weight", (shape.hidden,))]
    names += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]
    total = sum(2 * _numel(dims) for _, dims in names)
    budget = total / shape.shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in names:
        nbytes = 2 * _numel(dims)
        if size and size + nbytes > budget and len(groups) < shape.shards:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16) for name, dims in group}
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
        "num_attention_heads": shape.hidden // 128,
        "num_key_value_heads": shape.hidden // 128,
        "vocab_size": shape.vocab,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    lora = {}
    for layer in range(shape.layers):
        for module, (out_features, in_features) in linear_shapes(shape).items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(shape.rank, in_features, generator=generator) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, shape.rank, generator=generator) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "r": shape.rank,
        "lora_alpha": 2 * shape.rank,
        "target_modules": list(LINEAR),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    for number in range(1, shape.adapters):  # more adapters of the same shape, other values
        other = folder / f"adapter-{number}"
        other.mkdir()
        save_file({key: value * (1 + number) for key, value in lora.items()}, other / "adapter_model.safetensors")
        (other / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one child process (its own, not its parent's)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss * 1024


def prepare(shape: Shape, work: Path) -> Path:
    """The generated base and adapters for ``shape``, made once and kept in ``work``."""
    data = work / (f"layers-{shape.layers}" + (f"-x{shape.adapters}" if shape.adapters > 1 else ""))
    if not (data / "ready").exists():
        shutil.rmtree(data, ignore_errors=True)
        # In a child process: a child's ru_maxrss starts from its parent's size at fork, so
        # this process must stay small for the figures to be the children's own.
        spec = json.dumps(shape.__dict__)
        subprocess.run([sys.executable, __file__, "--generate", spec, "--workdir", str(data)], check=True)
        (data / "ready").touch()
    return data


def run(shape: Shape, work: Path, repeats: int, peft: bool) -> dict[str, object]:
    data = prepare(shape, work)
    base = data / "base"
    shards = sorted(str(path) for path in base.glob("*.safetensors"))
    size = sum(Path(path).stat().st_size for path in shards)
    shardmerge = str(Path(sys.executable).with_name("shardmerge"))
    commands = {
        "cp": ["cp", *shards, str(data / "cp-out")],
        # cp does not wait for the disk; shardmerge fsyncs every shard. The same durability:
        "cp+sync": ["sh", "-c", 'cp "$@" && sync', "cp", *shards, str(data / "cp-out")],
        "startup": [sys.executable, "-c", "import shardmerge, torch"],
        "shardmerge": [
            *(shardmerge, "merge", str(base), str(data / "adapter")),
            *("-o", str(data / "out"), "--device", "cpu", "--quiet"),
        ],
    }
    if peft:
        commands["peft"] = [sys.executable, "-c", PEFT_MERGE, str(base), str(data / "adapter"), str(data / "out")]
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            shutil.rmtree(data / "out", ignore_errors=True)
            shutil.rmtree(data / "cp-out", ignore_errors=True)
            (data / "cp-out").mkdir()
            samples[name].append(timed(command))
    shutil.rmtree(data / "out", ignore_errors=True)
    shutil.rmtree(data / "cp-out", ignore_errors=True)
    wall = {name: statistics.median(s for s, _ in runs) for name, runs in samples.items()}
    rss = {name: max(r for _, r in runs) for name, runs in samples.items()}
    plan = subprocess.run(
        [shardmerge, "plan", str(base), str(data / "adapter"), "--json"], capture_output=True, check=True, text=True
    )
    estimate = json.loads(plan.stdout)["peak_memory_bytes"]
    return {"layers": shape.layers, "bytes": size, "wall": wall, "rss": rss, "estimate": estimate}


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
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            shutil.rmtree(data / "outs", ignore_errors=True)
            for number in range(len(adapters)):
                (data / "outs" / f"cp-{number}").mkdir(parents=True)
            samples[name].append(timed(command))
    shutil.rmtree(data / "outs", ignore_errors=True)
    size = sum(path.stat().st_size for path in base.glob("*.safetensors"))
    wall = {name: statistics.median(s for s, _ in runs) for name, runs in samples.items()}
    rss = {name: max(r for _, r in runs) for name, runs in samples.items()}
    count = len(adapters)
    print(f"\n{count} adapters on one base of {size / 2**30:.2f} GiB; medians of {repeats} alternating runs")
    print(f"{'':24} {'wall s':>8} {'x cp':>6} {'peak RSS':>10}")
    labels = {
        "cp": f"cp of the shards x{count}",
        "batch": "one batch (one pass)",
        "separate": f"{count} separate merges",
    }
    for name in commands:
        print(f"{labels[name]:24} {wall[name]:8.2f} {wall[name] / wall['cp']:6.2f} {rss[name] / 2**20:8.0f} MB")
    print(f"separate / batch wall time: {wall['separate'] / wall['batch']:.2f}")


def report(result: dict[str, object], repeats: int) -> None:
    wall, rss, size = result["wall"], result["rss"], result["bytes"]
    assert isinstance(wall, dict) and isinstance(rss, dict) and isinstance(size, int)
    print(
        f"\nmodel: {result['layers']} layers, {size / 2**30:.2f} GiB of shards; medians of {repeats} alternating runs"
    )
    print(f"{'':12} {'wall s':>8} {'x cp':>6} {'GB/s':>6} {'peak RSS':>10}")
    for name in wall:
        ratio = wall[name] / wall["cp"]
        print(f"{name:12} {wall[name]:8.2f} {ratio:6.2f} {size / wall[name] / 1e9:6.2f} {rss[name] / 2**20:8.0f} MB")
    corrected = wall["shardmerge"] - wall["startup"]
    print(
        f"shardmerge less start-up: {corrected:.2f} s, {corrected / wall['cp']:.2f} x cp, "
        f"{corrected / wall['cp+sync']:.2f} x cp+sync"
    )
    if "peft" in wall:
        print(f"PEFT / shardmerge wall time: {wall['peft'] / wall['shardmerge']:.2f}")
    working = rss["shardmerge"] - rss["startup"]
    estimate = result["estimate"]
    assert isinstance(estimate, int)
    verdict = "within" if working <= estimate else "OVER"
    print(
        f"shardmerge peak RSS above start-up: {working / 2**20:.0f} MB, {verdict} the plan's estimate of "
        f"{estimate / 2**20:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sweep", help="comma-separated layer counts, e.g. 4,8")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft", action="store_true", help="also time PEFT merge_and_unload + save_pretrained")
    parser.add_argument("--batch", type=int, default=0, metavar="N", help="time N adapters: one batch vs N merges")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"))
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Shape(**json.loads(args.generate)), args.workdir)
        return
    if args.batch:
        shape = Shape(args.layers, args.hidden, args.intermediate, args.vocab, args.shards, args.rank, args.batch)
        run_batch(shape, args.workdir, args.repeats)
        return
    counts = [int(item) for item in args.sweep.split(",")] if args.sweep else [args.layers]
    results = []
    for layers in counts:
        shape = Shape(layers, args.hidden, args.intermediate, args.vocab, args.shards, args.rank)
        results.append(run(shape, args.workdir, args.repeats, args.peft))
        report(results[-1], args.repeats)
    if len(results) > 1:
        print("\npeak RSS of shardmerge against model size:")
        for result in results:
            rss = result["rss"]
            assert isinstance(rss, dict)
            size = result["bytes"]
            assert isinstance(size, int)
            print(f"  {result['layers']:3} layers  {size / 2**30:6.2f} GiB  {rss['shardmerge'] / 2**20:8.0f} MB")


if __name__ == "__main__":
    main()
