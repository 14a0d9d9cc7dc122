"""The ``shardmerge`` command. The one place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import MergeJob, build_job, build_named, build_push, load_job_file
from .errors import JobConfigError, ProblemsError, ShardmergeError
from .formats.units import human_size as _size
from .inputs import hub
from .output.publish import PushTarget

if TYPE_CHECKING:
    from .batch import JobResult
    from .run.jobs import MergeReport
from .planning.model import AdapterSummary, Combine, Plan, TensorPlan
from .planning.planner import build_plan

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    # One progress display, ours: huggingface_hub's per-file bars would break up the merge's.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub.quiet_retries()
    parser = _parser()
    args = parser.parse_args(argv)
    # SIGTERM (a scheduler, a container stop) ends the run as Ctrl-C does: the tensor in hand
    # is discarded with its temp file, and the journal keeps every finished shard.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (``shardmerge plan ... | head``): end quietly, as a Unix tool
        # killed by SIGPIPE does, and keep the interpreter from flushing into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ShardmergeError as exc:
        if args.debug:
            raise
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            "shardmerge: interrupted; finished shards are kept and nothing half-written has a final name: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _report(exc: ShardmergeError) -> None:
    print(f"shardmerge: error: {exc.one_line()}", file=sys.stderr)
    if isinstance(exc, ProblemsError):
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
    inputs.add_argument(
        "--dtype",
        choices=["auto", "base", "bfloat16", "float16", "float32"],
        default="auto",
        help="output dtype: auto (default) keeps every tensor's dtype and a quantized base's format (a "
        "bitsandbytes base's weights are written in bfloat16, and only they); base keeps every tensor's dtype and "
        "format; bfloat16, float16 and float32 convert every floating-point tensor, dequantizing first",
    )
    inputs.add_argument(
        "--combine",
        choices=["linear", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"],
        default="linear",
        help="how the adapters' updates are combined: linear (default) applies them in turn, each times its weight; "
        "the others are mergekit's methods of the same names on each tensor's updates",
    )
    inputs.add_argument(
        "--density",
        metavar="D[,D...]",
        help="with --combine other than linear: the fraction of each update kept, one for all or one per adapter "
        "(default 1)",
    )
    inputs.add_argument("--seed", type=int, help="dare_*: the seed of the random masks (default 0)")
    inputs.add_argument(
        "--gamma", type=float, help="breadcrumbs*: the fraction of largest magnitudes dropped (default 0.01)"
    )
    inputs.add_argument(
        "--sign-election",
        choices=["sum", "count"],
        help="*_ties: elect each element's sign by the sum of the weighted updates (default) or by the count of signs",
    )
    inputs.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        help="divide the combined update by the sum of the weights (of those agreeing with the elected sign, for "
        "*_ties); default: only for ties, as in mergekit",
    )
    inputs.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="split the output into shards of at most SIZE of tensor data (e.g. 5GB, 500MB, 2GiB), named as "
        "save_pretrained names them; default: the base's shards",
    )
    inputs.add_argument(
        "--conv1d-modules",
        metavar="NAMES",
        help="comma-separated modules stored as GPT-2's Conv1D ([in, out]), every other one nn.Linear; 'none' for "
        "none. Only needed where the base's architecture does not say (e.g. custom modelling code)",
    )

    merge = commands.add_parser("merge", parents=[common, inputs], help="merge adapters and write the model")
    merge.add_argument("-o", "--output", required=True, help="output folder (new or empty)")
    merge.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument(
        "--strict", action="store_true", help="fail, and publish nothing, when the adapters change no tensor at all"
    )
    _resume_flags(merge)
    _cluster_flags(merge)
    _push_flags(merge, "--push-to-hub", "upload each shard as it is finished, then commit once to this repo")
    merge.set_defaults(handler=_cmd_merge)

    plan = commands.add_parser("plan", parents=[common, inputs], help="check the inputs and print the plan")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_cmd_plan)

    run = commands.add_parser("run", parents=[common], help="run a YAML job or batch file")
    run.add_argument("job", type=Path, help="YAML job (base, adapters, output, ...) or batch (defaults, jobs)")
    run.add_argument("--only", nargs="+", metavar="NAME", default=[], help="run only these jobs of a batch")
    run.add_argument("--dry-run", action="store_true", help="plan every job and print the plans; write nothing")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _resume_flags(run)
    _cluster_flags(run)
    run.set_defaults(handler=_cmd_run)

    push = commands.add_parser("push", parents=[common], help="publish a finished merge to the Hub")
    push.add_argument("output", type=Path, help="the output folder of a finished merge")
    push.add_argument("push_to_hub", metavar="ORG/NAME", help="the Hub repo to publish to (created if missing)")
    push.add_argument("--quiet", action="store_true", help="no progress bar")
    _push_flags(push, None, None)
    push.set_defaults(handler=_cmd_push)

    verify = commands.add_parser("verify", parents=[common], help="check a finished merge against its journal")
    verify.add_argument("output", type=Path, help="the output folder of a merge")
    verify.add_argument(
        "--recompute", type=int, default=0, metavar="N", help="also recompute N merged tensors from the inputs"
    )
    verify.add_argument(
        "--against-base",
        action="store_true",
        help="also check that every merged tensor differs from the base and every other one equals it",
    )
    verify.set_defaults(handler=_cmd_verify)
    return parser


def _resume_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restart", action="store_true", help="discard an earlier, different merge in the output folder and start over"
    )
    parser.add_argument(
        "--verify-resume", action="store_true", help="re-hash finished shards before skipping them on resume"
    )


def _cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where the shards are written: this process (local, the default) or tasks on a Ray cluster",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to use (e.g. 10.0.0.1:6379); default: Ray's own discovery (RAY_ADDRESS)",
    )
    parser.add_argument(
        "--ray-start-timeout",
        type=float,
        metavar="SECONDS",
        help="fail when the cluster has started no task after this long (default 60)",
    )


def _cluster_fields(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("executor", "ray_address", "ray_start_timeout")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


def _push_flags(parser: argparse.ArgumentParser, flag: str | None, help_text: str | None) -> None:
    if flag is not None:
        parser.add_argument(flag, dest="push_to_hub", metavar="ORG/NAME", help=help_text)
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created if missing)")
    parser.add_argument("--commit-message", metavar="TEXT", help="the commit's title")
    parser.add_argument(
        "--delete-after-upload",
        action="store_true",
        help="delete each shard once the Hub holds it: the disk holds at most two shards",
    )


def _push_fields(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("push_to_hub", "private", "revision", "commit_message", "delete_after_upload")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) not in (None, False)}


def _per_adapter(args: argparse.Namespace, flag: str, noun: str, default: float | None) -> list[float | None]:
    """The values of ``--FLAG``, one per adapter: a comma-separated list, or one for all where
    ``default`` is None."""
    text = getattr(args, flag)
    count = len(args.adapters)
    if not text:
        return [default] * count
    try:
        values: list[float | None] = [float(item) for item in text.split(",")]
    except ValueError:
        raise JobConfigError(f"--{flag} {text!r} is not a comma-separated list of numbers") from None
    if len(values) == 1 and default is None:
        return [None] * count
    if len(values) != count:
        raise JobConfigError(
            f"--{flag} has {len(values)} values for {count} adapters",
            hint=f"give one {noun} per adapter, in the same order" + (", or one for all" if default is None else ""),
        )
    return values


def _job_from_args(args: argparse.Namespace) -> MergeJob:
    weights = _per_adapter(args, "weights", "weight", 1.0)
    densities = _per_adapter(args, "density", "density", None)
    adapters = [
        {"path": path, "weight": weight} | ({"density": density} if density is not None else {})
        for path, weight, density in zip(args.adapters, weights, densities, strict=True)
    ]
    combining = {
        key: getattr(args, key)
        for key in ("combine", "seed", "gamma", "sign_election", "normalize")
        if getattr(args, key) is not None
    }
    if args.density and "," not in args.density:
        combining["density"] = args.density
    data: dict[str, Any] = {
        "base": args.base,
        "adapters": adapters,
        **combining,
        "output": getattr(args, "output", None),
        "dtype": args.dtype,
        "device": getattr(args, "device", "auto"),
        "strict": getattr(args, "strict", False),
        **_push_fields(args),
        **_cluster_fields(args),
    }
    if args.max_shard_size is not None:
        data["max_shard_size"] = args.max_shard_size
    if args.conv1d_modules is not None:
        names = [name.strip() for name in args.conv1d_modules.split(",") if name.strip()]
        data["conv1d_modules"] = [] if names == ["none"] else names
    return build_job("command line", data)


def _cmd_merge(args: argparse.Namespace) -> int:
    return _merge(_job_from_args(args), args)


def _cmd_run(args: argparse.Namespace) -> int:
    job_file = load_job_file(args.job)
    overrides = _cluster_fields(args)  # the command line's executor overrides the file's
    if overrides:
        jobs = tuple(build_named("command line", {**job.model_dump(), **overrides}) for job in job_file.jobs)
        job_file = dataclasses.replace(job_file, jobs=jobs)
    if not job_file.batch:
        if args.only:
            raise JobConfigError("--only picks jobs of a batch file (one with jobs:)", file=args.job)
        if args.dry_run:
            _print_plan(build_plan(job_file.jobs[0]))
            return 0
        return _merge(job_file.jobs[0], args)
    from .batch import run_jobs, select

    results = run_jobs(
        select(job_file, args.only),
        dry_run=args.dry_run,
        quiet=args.quiet,
        restart=args.restart,
        verify_resume=args.verify_resume,
    )
    _print_summary(results)
    return 1 if any(result.status == "failed" for result in results) else 0


def _print_summary(results: list[JobResult]) -> None:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    told = ", ".join(f"{count} {status}" for status, count in counts.items())
    print(f"shardmerge: {len(results)} job{'s' if len(results) != 1 else ''}: {told}")
    rows = [("JOB", "STATUS", "TIME", "OUTPUT", "ERROR")]
    for result in results:
        where = result.output + (f" -> {result.url}" if result.url else "")
        if result.plan is not None:
            plan = result.plan
            merged = sum(shard.merged for shard in plan.shards)
            where += f" ({len(plan.shards)} shards, {merged} tensors merged, {_size(plan.total_bytes)})"
        rows.append((result.name, result.status, f"{result.seconds:.1f} s", where, result.error or ""))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])


def _merge(job: MergeJob, args: argparse.Namespace) -> int:
    from .run.executor import execute  # imports torch: only when a merge really runs

    plan = build_plan(job)
    report = execute(
        plan,
        quiet=args.quiet,
        restart=args.restart,
        verify_resume=args.verify_resume,
        push=PushTarget.of(job),
        executor=job.executor,
        ray_address=job.ray_address,
        ray_start_timeout=job.ray_start_timeout,
    )
    if report.shards_skipped:
        print(f"shardmerge: resumed: {report.shards_skipped} of {report.shards} shards were already finished")
    count = len(plan.adapters)
    print(f"shardmerge: merged {count} adapter{'s' if count != 1 else ''} into {plan.base}")
    for adapter in plan.adapters:
        print(f"  adapter {adapter.path}  {_describe(adapter)}  changes {adapter.tensors} tensors")
    for note in plan.notes:
        print(f"  note    {note}")
    merged = sum(shard.merged for shard in plan.shards)
    if merged and report.unchanged == merged:
        print(
            f"shardmerge: warning: the adapters changed none of the {merged} tensors they target: the output "
            "equals the base (an untrained adapter?); --strict makes this an error",
            file=sys.stderr,
        )
    else:
        copies = report.unchanged_copies
        if copies:
            print(
                f"  note    {_count(len(copies), 'tensor')} saved whole in the adapter{'s' if count != 1 else ''} "
                f"{'holds' if len(copies) == 1 else 'hold'} the base's own values ({', '.join(copies[:3])}): "
                "written as they are (PEFT saves an embedding layer whole beside LoRA on it or on its tied head)"
            )
        if report.unchanged > len(copies):
            zero = report.unchanged - len(copies)
            print(f"  note    {_count(zero, 'merged tensor')} came out equal to the base (an update of zero)")
    if report.requantized or report.requantized_non_finite:
        print(f"  requant {_requantized(report)}")
    survived = _survived(report)
    if survived is not None and survived < 0.5:
        fp8 = "" if "FP8 (" in str(plan.quantization) else ", an FP8 base most of it"
        print(
            f"shardmerge: warning: requantized to {plan.quantization}, the merged weights keep {survived:.0%} of "
            f"the adapters' update: a 16-bit output (--dtype bfloat16) keeps all of it{fp8}",
            file=sys.stderr,
        )
    if report.non_finite_kept:
        print(
            f"  note    NaN or Inf kept from the base in {len(report.non_finite_kept)} tensors: "
            f"{', '.join(report.non_finite_kept[:5])}"
        )
    print(
        f"  output  {report.output}: {report.shards} shard{'s' if report.shards != 1 else ''}, "
        f"{report.tensors_merged} tensors merged, {report.tensors_copied} copied, "
        f"{_size(report.bytes_written)} {_written_as(plan)}, in {report.seconds:.1f} s on {report.device}"
    )
    if report.device_bytes:
        print(
            f"  memory  {_size(report.device_bytes)} of GPU memory at most, "
            f"{_size(report.locked_bytes)} of host memory locked for copies"
        )
    if report.url:
        print(f"  hub     {report.url} (commit {report.commit})")
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def _written_as(plan: Plan) -> str:
    if plan.dtype != "base":
        return plan.dtype
    return "in the base's format" if plan.quantization else "in the base's dtypes"


def _requantized(report: MergeReport) -> str:
    apart = report.requantized_non_finite
    if apart:
        apart_line = (
            f"{apart} requantized weight{'s' if apart != 1 else ''} holding NaN or Inf from the base, "
            "left out of the figures"
        )
        if not report.requantized:
            return apart_line
    line = f"{report.requantized} merged weights requantized"
    if apart:
        line = f"{apart_line}; {line}"
    if report.update_kept is None or report.update_error is None:
        return line + " (their updates are zero)"
    line += (
        f": the change written is {report.update_kept:.1%} of the update's norm, with an error of "
        f"{report.update_error:.1%} of it (|Q(W+dW)-W| and |Q(W+dW)-(W+dW)| over |dW|)"
    )
    if report.least_kept is not None:
        line += f"; least kept: {report.least_kept[0]} ({report.least_kept[1]:.1%})"
    survived = _survived(report)
    if survived is not None:
        line += f"; {survived:.1%} of the update survived (the change written, projected onto it)"
    return line


def _survived(report: MergeReport) -> float | None:
    """The part of the update that survived requantization: <Q(W+dW)-W, dW> / |dW|^2, from the
    figures' norms (kept K and error E over |dW|: (K^2 + 1 - E^2) / 2)."""
    if report.update_kept is None or report.update_error is None:
        return None
    return (report.update_kept**2 + 1 - report.update_error**2) / 2


def _cmd_push(args: argparse.Namespace) -> int:
    from .output.publish import publish

    target = PushTarget.of(build_push("command line", _push_fields(args)))
    assert target is not None
    commit, url = publish(args.output, target, quiet=args.quiet)
    print(f"shardmerge: published {args.output} to {url} (commit {commit})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.output, recompute=args.recompute, against_base=args.against_base)
    print(
        f"shardmerge: {args.output} verified: {report.shards} shards, {report.tensors} tensors, "
        f"{report.merged_checked} merged tensors finite, {report.recomputed} recomputed"
    )
    for path, tensors in report.changes:
        print(f"  adapter {path}  changes {tensors} base tensors")
    if report.against_base:
        print(f"  base    {report.against_base} tensors compared: merged ones differ, the others are the base's")
    if report.unchanged:
        print(f"  note    {report.unchanged} merged tensors are equal to the base (an update of zero)")
    if report.non_finite_kept:
        print(f"  note    {report.non_finite_kept} tensors hold NaN or Inf kept from the base")
    if report.running:
        print(f"  note    read while another run held the folder's lock ({report.running})")
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
    if plan.quantization:
        print(f"quant   base in {plan.quantization}")
    if plan.combine is not None:
        print(f"combine {_combination(plan.combine)}")
    for shard in plan.shards:
        copied = len(shard.tensors) - shard.merged
        print(f"shard   {shard.name}: {shard.merged} merged, {copied} copied, {_size(shard.size)}")
        for tensor in shard.tensors:
            for op in tensor.ops:
                print(f"  {tensor.name}  <- [{op.adapter}] {op.kind} {op.layout} {op.module} (rule {op.rule})")
            if tensor.combined:
                sources = " ".join(f"[{index}]" for index in sorted({op.adapter for op in tensor.ops}))
                print(f"  {tensor.name}  combined from {sources} in {_passes(tensor.passes)}")
            if tensor.quant is not None or tensor.scale_of is not None:
                print(f"  {tensor.name}  {_formats(tensor)}")
    merged = sum(shard.merged for shard in plan.shards)
    tensors = sum(len(shard.tensors) for shard in plan.shards)
    print(
        f"total   {len(plan.shards)} shards, {merged} tensors merged, {tensors - merged} copied, "
        f"{_size(plan.total_bytes)} to write"
    )
    for note in plan.notes:
        print(f"note    {note}")
    gpu = plan.gpu_memory
    print(f"memory  about {_size(plan.peak_memory_bytes)} of working memory on the CPU, plus the interpreter and torch")
    print(
        f"        on a GPU: about {_size(gpu.host_bytes)} of host RAM ({_size(gpu.locked_bytes)} of it locked) "
        f"and {_size(gpu.device_bytes)} of GPU memory"
    )


def _combination(combine: Combine) -> str:
    parts = []
    if combine.pruning is not None:
        parts.append("density " + " ".join(f"{density:g}" for density in combine.densities))
    if combine.pruning == "random":
        parts.append(f"seed {combine.seed}")
    if combine.pruning == "outliers":
        parts.append(f"gamma {combine.gamma:g}")
    if combine.election is not None:
        parts.append(f"sign election {combine.election}")
    parts.append("normalized" if combine.normalize else "not normalized")
    return f"{combine.method}: {', '.join(parts)}"


def _passes(count: int) -> str:
    """A combined tensor's passes, the one that may be added where a threshold falls among
    equal magnitudes included."""
    if count == 1:
        return "1 pass"
    return f"{count} passes" + (" (4 where a threshold falls among equal magnitudes)" if count == 3 else "")


def _formats(tensor: TensorPlan) -> str:
    """The format a quantized weight (or a rescaled scale) is read in and written in."""
    if tensor.scale_of is not None:
        return f"{tensor.src_dtype} scales -> recomputed for the requantized {tensor.scale_of}"
    quant = tensor.quant
    assert quant is not None
    companions = tuple((companion.name, companion.dtype) for companion in quant.companions)
    stored, read = quant.format.codec.label(quant.format, tensor.src_dtype, companions)
    if quant.format.packed:
        read += f" ({'x'.join(map(str, quant.values))}{', the transpose of the model' if quant.transposed else ''})"
    if tensor.requantized and not tensor.ops:
        return f"{read} -> dequantized, requantized to {stored} with the scale it shares with a merged weight"
    if tensor.requantized:
        return f"{read} -> dequantized, merged in float32, requantized to {stored} with new scales"
    return f"{read} -> dequantized in float32, written in {tensor.dtype}"


def _describe(adapter: AdapterSummary) -> str:
    parts = [adapter.peft_type, f"weight {adapter.weight:g}"]
    if adapter.r is not None and adapter.alpha is not None:
        parts.append(f"r={adapter.r} alpha={adapter.alpha:g}")
    parts += [flag for flag, on in (("rslora", adapter.use_rslora), ("dora", adapter.use_dora)) if on]
    parts.append(f"({adapter.modules} modules, {adapter.full_tensors} full tensors)")
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
