"""The ``shardmerge`` command. The one place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import MergeJob, build_job, load_job_file
from .errors import JobConfigError, PlanError, ShardmergeError
from .plan_data import AdapterSummary, Plan
from .planner import build_plan

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ShardmergeError as exc:
        if args.debug:
            raise
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("shardmerge: interrupted; no file was left under a final name half-written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _report(exc: ShardmergeError) -> None:
    print(f"shardmerge: error: {exc.one_line()}", file=sys.stderr)
    if isinstance(exc, PlanError):
        for problem in exc.problems:
            print(f"  - {problem.one_line()}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmerge",
        description="Merge LoRA adapters into a base model, one safetensors shard at a time.",
    )
    parser.add_argument("--version", action="version", version=f"shardmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("base", help="base model folder (config.json + safetensors shards)")
    inputs.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folder(s), applied in order")
    inputs.add_argument("--weights", help="comma-separated weight per adapter, e.g. 1.0,0.5 (default 1 each)")
    inputs.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")

    merge = commands.add_parser("merge", parents=[common, inputs], help="merge adapters and write the model")
    merge.add_argument("-o", "--output", required=True, help="output folder (new or empty)")
    merge.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(handler=_cmd_merge)

    plan = commands.add_parser("plan", parents=[common, inputs], help="check the inputs and print the plan")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_cmd_plan)

    run = commands.add_parser("run", parents=[common], help="run a YAML job file")
    run.add_argument("job", type=Path, help="YAML job: base, adapters, output, dtype, device")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=_cmd_run)
    return parser


def _job_from_args(args: argparse.Namespace) -> MergeJob:
    weights = [1.0] * len(args.adapters)
    if args.weights:
        try:
            weights = [float(item) for item in args.weights.split(",")]
        except ValueError:
            raise JobConfigError(f"--weights {args.weights!r} is not a comma-separated list of numbers") from None
        if len(weights) != len(args.adapters):
            raise JobConfigError(
                f"--weights has {len(weights)} values for {len(args.adapters)} adapters",
                hint="give one weight per adapter, in the same order",
            )
    data: dict[str, Any] = {
        "base": args.base,
        "adapters": [{"path": path, "weight": weight} for path, weight in zip(args.adapters, weights, strict=True)],
        "output": getattr(args, "output", None),
        "dtype": args.dtype,
        "device": getattr(args, "device", "auto"),
    }
    return build_job("command line", data)


def _cmd_merge(args: argparse.Namespace) -> int:
    return _merge(_job_from_args(args), quiet=args.quiet)


def _cmd_run(args: argparse.Namespace) -> int:
    return _merge(load_job_file(args.job), quiet=args.quiet)


def _merge(job: MergeJob, *, quiet: bool) -> int:
    from .executor import execute  # imports torch: only when a merge really runs

    plan = build_plan(job)
    report = execute(plan, quiet=quiet)
    count = len(plan.adapters)
    print(f"shardmerge: merged {count} adapter{'s' if count != 1 else ''} into {plan.base}")
    for adapter in plan.adapters:
        print(
            f"  adapter {adapter.path}  {_describe(adapter)}"
            f"  ({adapter.modules} LoRA modules, {adapter.full_tensors} full tensors)"
        )
    for note in plan.notes:
        print(f"  note    {note}")
    print(
        f"  output  {report.output}: {report.shards} shard{'s' if report.shards != 1 else ''}, "
        f"{report.tensors_merged} tensors merged, {report.tensors_copied} copied, "
        f"{_size(report.bytes_written)} {plan.dtype}, in {report.seconds:.1f} s on {report.device}"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    plan = build_plan(_job_from_args(args))
    if args.json:
        json.dump(plan.to_json(), sys.stdout, indent=2)
        print()
    else:
        _print_plan(plan)
    return 0


def _print_plan(plan: Plan) -> None:
    print(f"base    {plan.base}")
    for adapter in plan.adapters:
        print(f"adapter [{adapter.index}] {adapter.path}  {_describe(adapter)}")
    print(f"dtype   {plan.dtype}")
    for shard in plan.shards:
        copied = len(shard.tensors) - shard.merged
        print(f"shard   {shard.name}: {shard.merged} merged, {copied} copied, {_size(shard.size)}")
        for tensor in shard.tensors:
            for op in tensor.ops:
                print(f"  {tensor.name}  <- [{op.adapter}] {op.kind} {op.layout} {op.module} (rule {op.rule})")
    merged = sum(shard.merged for shard in plan.shards)
    tensors = sum(len(shard.tensors) for shard in plan.shards)
    print(
        f"total   {len(plan.shards)} shards, {merged} tensors merged, {tensors - merged} copied, "
        f"{_size(plan.total_bytes)} to write"
    )
    for note in plan.notes:
        print(f"note    {note}")
    print(f"memory  about {_size(plan.peak_memory_bytes)} of working memory, plus the interpreter and torch")


def _describe(adapter: AdapterSummary) -> str:
    parts = [adapter.peft_type, f"weight {adapter.weight:g}"]
    if adapter.r is not None and adapter.alpha is not None:
        parts.append(f"r={adapter.r} alpha={adapter.alpha:g}")
    parts += [flag for flag, on in (("rslora", adapter.use_rslora), ("dora", adapter.use_dora)) if on]
    parts.append(f"({adapter.modules} modules, {adapter.full_tensors} full tensors)")
    return "  ".join(parts)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


if __name__ == "__main__":
    sys.exit(main())
