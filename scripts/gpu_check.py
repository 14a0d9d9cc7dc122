"""The CUDA path on a machine with a GPU, checked and measured in one run (``gpu_check.sh``).

1. The ``gpu`` tests (a CUDA merge against PEFT, CPU against GPU output for packed weights).
2. Host-to-device copy speed from locked host memory.
3. For the bench's default model and its 70B slice (``bench.py``): ``shardmerge merge --device
   cuda`` against ``cp`` + ``sync`` of the same shards (medians of 3, alternating order), its
   peak host RSS, and through the Python API the host memory it locked and the GPU memory
   it held at most, against the plan's estimates.
4. For the default model: the GPU merge against the CPU merge of the same inputs (the largest
   difference, in units of bfloat16's last place), and ``verify --recompute`` of the GPU
   merge on the CPU.

Prints one table; without CUDA, one line, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench

# In a child process, so that its memory figures are its own.
FIGURES = """
import json, sys
import shardmerge
base, adapter, out, device = sys.argv[1:]
report = shardmerge.merge(base=base, adapters=[adapter], output=out, device=device)
plan = shardmerge.plan(base=base, adapters=[adapter])
gpu = plan.gpu_memory
print(json.dumps([report.locked_bytes, report.device_bytes, gpu.locked_bytes, gpu.device_bytes]))
"""


def host_to_device() -> float:
    """GB/s of a 1 GiB copy from locked host memory to the GPU, the best of 5."""
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return host.numel() / best / 1e9


def gpu_tests() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:warnings", "tests"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"pytest exited {done.returncode}"


def figures(data: Path, out: Path, device: str) -> list[int]:
    """A merge's locked host memory and GPU memory, and the plan's estimates of both (bytes)."""
    command = [sys.executable, "-c", FIGURES, str(data / "base"), str(data / "adapter"), str(out), device]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return [int(value) for value in json.loads(done.stdout.strip().splitlines()[-1])]


def largest_difference(cpu: Path, gpu: Path) -> float:
    """The largest difference between two merges, in units of bfloat16's last place."""
    from safetensors.torch import load_file

    worst = 0.0
    for shard in sorted(cpu.glob("*.safetensors")):
        ours, theirs = load_file(gpu / shard.name), load_file(shard)
        for name, value in theirs.items():
            if not value.is_floating_point():
                continue
            a, b = ours[name].float(), value.float()
            _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()))
            ulp = torch.exp2((exponent - 1).float()) * torch.finfo(value.dtype).eps
            worst = max(worst, float(((a - b).abs() / ulp.clamp(min=1e-45)).max()))
    return worst


def measure(preset: str, work: Path, repeats: int) -> dict[str, str]:
    from shardmerge.verify import verify

    made = bench.setup(bench.PRESETS[preset], work, "cuda")
    commands = {name: made.commands[name] for name in ("cp+sync", "start-up", "shardmerge")}
    samples = bench.alternate(commands, repeats, made.fresh, cold=False)
    wall = {name: statistics.median(s.wall for s in runs) for name, runs in samples.items()}
    made.fresh()
    locked, held, plan_locked, plan_held = figures(made.data, made.data / "out", "cuda")
    less = wall["shardmerge"] - wall["start-up"]
    row = {
        "model": f"{preset} ({made.size / 2**30:.1f} GiB)",
        "merge less start-up": f"{less:.1f} s = {less / wall['cp+sync']:.2f} x cp+sync",
        "peak host RSS": f"{max(s.rss for s in samples['shardmerge']) / 2**20:.0f} MB",
        "locked RAM (plan)": f"{locked / 2**20:.0f} MB ({plan_locked / 2**20:.0f})",
        "peak GPU memory (plan)": f"{held / 2**20:.0f} MB ({plan_held / 2**20:.0f})",
        "CPU vs GPU": "-",
    }
    if preset == "default":
        figures(made.data, made.data / "out-cpu", "cpu")
        difference = largest_difference(made.data / "out-cpu", made.data / "out")
        checked = verify(made.data / "out", recompute=32).recomputed
        row["CPU vs GPU"] = f"{difference:.0f} ulp; verify --recompute {checked}: ok"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing was checked")
        return 1
    started = time.monotonic()
    tests = gpu_tests()
    speed = host_to_device()
    rows = [measure(preset, args.workdir, args.repeats) for preset in ("default", "70b-slice")]
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}; gpu tests: {tests}")
    print(f"host-to-device copy from locked memory: {speed:.1f} GB/s")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[column] for column in columns) + " |")
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
