"""Merging on a Ray cluster: the plan, the journal, the lock and the Hub commit stay with this
process (the driver); the shards are written by Ray tasks on the cluster's nodes.

A task is a unit of ``unit.py``: the output shards of one base shard, for every job of the
pass that still needs them, so each base shard is read once per pass wherever it is merged.
Tasks are stateless and spread over the nodes (``SPREAD``, never pinned: a task pinned to a
dead node would wait forever); each asks for one CPU, a GPU when merging on CUDA, and the
memory the plan estimates. Ray runs a task again when its worker or node dies, and when it
raises an I/O error or fails to download its base shard, up to ``MAX_RETRIES`` times. Paths
go to the nodes absolute: their workers do not run in the driver's folder.

As results come back, the driver renames each shard into place (a shared output folder) or
notes it uploaded (a node pre-uploaded it), and records it in the journal, atomically as a
local run does: killed at any moment, the same command resumes and submits only what is
missing. A job that failed on one shard still records the shards other tasks finish for it.
At the end it writes the side files and the index, and makes the one Hub commit.

Adapter files up to ``ADAPTERS_BY_STORE`` in all are sent once through Ray's object store;
larger ones are read on each node at the path the driver sees (a shared filesystem). The
driver's Hub endpoint and token go to the tasks through the job's runtime environment.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ..errors import ClusterError, InputError, ShardmergeError
from ..formats.confined import read_input
from ..output import outdir
from ..planning.model import Plan
from .jobs import Job, MergeReport, claim, close, done, io_error, progress_bar, report, step
from .stop import StopRequest
from .unit import ShardDone, Unit, UnitJob, base_files, cut, merge_unit, relocated

if TYPE_CHECKING:
    from types import ModuleType

ADAPTERS_BY_STORE = 512 * 2**20
MAX_RETRIES = 3
# How long a pass waits for the cluster to start its first task before it fails, by default.
START_TIMEOUT_S = 60.0
# What a task's process needs beyond the plan's estimate: the interpreter, torch, its libraries.
TASK_BASE_MEMORY = 768 * 2**20
_FORWARDED = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
_INSTALL = "install it with: pip install 'shardmerge[ray]'"
# What a task raises that another try may not meet: I/O errors, a base shard's download.
_RETRIED = (OSError, InputError)


def run_on_cluster(
    jobs: list[Job],
    address: str | None,
    start_timeout: float | None = None,
    *,
    quiet: bool,
    restart: bool,
    verify_resume: bool,
) -> list[MergeReport | BaseException]:
    """``executor.run_pass`` on a Ray cluster: the same jobs, the same results. A cluster that
    starts no task within ``start_timeout`` seconds (None: START_TIMEOUT_S) fails the jobs.
    ``--device auto`` asks each task for a GPU where the cluster has GPUs (Ray hides the
    GPUs from a task that asks for none): it connects first, to ask the cluster."""
    device = "cuda" if jobs[0].plan.device.startswith("cuda") else "cpu"
    try:
        ray = _import_ray()
        with ExitStack() as stack:
            if jobs[0].plan.device == "auto":
                _connect(ray, address, stack)
                device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
            for job in jobs:
                stack.callback(job.stack.close)
                stack.callback(_remove_strays, job)
                step(job, lambda job=job: claim(job, device, restart, verify_resume, quiet))
            live = [job for job in jobs if job.error is None]
            work = any(job.todo for job in live)
            if work:
                _connect(ray, address, stack)
            stop = stack.enter_context(StopRequest())  # after Ray's own SIGTERM handler: ours acts first
            if work:
                progress = stack.enter_context(progress_bar(live, quiet))
                _Pass(ray, live, device, progress, stop, start_timeout or START_TIMEOUT_S).run()
            for job in jobs:
                if job.error is None:
                    step(job, lambda job=job: close(job, stop.check))
    except (OSError, ShardmergeError) as exc:
        for job in jobs:
            if job.error is None:
                job.error = io_error(exc, job) if isinstance(exc, OSError) else exc
    return [job.error if job.error is not None else report(job, f"{device} on a Ray cluster") for job in jobs]


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ClusterError("--executor ray needs Ray, which is not installed", hint=_INSTALL) from None
    return ray


def _connect(ray: ModuleType, address: str | None, stack: ExitStack) -> None:
    """Join the cluster at ``address`` (None: Ray's own discovery, e.g. ``RAY_ADDRESS``), unless
    this process is connected already (shardmerge called inside a Ray job)."""
    if ray.is_initialized():
        return
    from huggingface_hub import get_token

    _check_reachable(address)
    env = {name: os.environ[name] for name in _FORWARDED if name in os.environ}
    token = get_token()
    if token is not None:
        env["HF_TOKEN"] = token
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": env} if env else None,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "RAY_ADDRESS or this machine's running cluster"
        raise ClusterError(
            f"cannot connect to the Ray cluster at {where}: {_first_line(exc)}",
            hint="start one with `ray start --head`, or pass --ray-address HOST:PORT",
        ) from exc
    stack.callback(ray.shutdown)


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT that nothing answers at fails at once, not after Ray's minutes of retries."""
    if address is None or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(
            f"nothing answers at the Ray cluster address {address}: {_first_line(exc)}",
            hint="check --ray-address (the head node's HOST:PORT, 6379 by default), or start one with "
            "`ray start --head`",
        ) from None


class _Pass:
    """The units of one pass, submitted at once and recorded as they finish."""

    def __init__(
        self, ray: ModuleType, jobs: list[Job], device: str, progress: tqdm, stop: StopRequest, start_timeout: float
    ) -> None:
        self.ray = ray
        self.jobs = jobs
        self.device = device
        self.progress = progress
        self.stop = stop
        self.start_timeout = start_timeout
        self.pending: dict[Any, tuple[Unit, list[Job]]] = {}
        self.asked: dict[str, float] = {}

    def run(self) -> None:
        files = self._adapter_files()
        remote = self.ray.remote(_run_unit)
        started = _Started()
        try:
            for unit, members in self._units():
                needed = sorted({a.weights_file for job in unit.jobs for a in job.plan.adapters} & files.keys())
                gpu = self.device == "cuda"
                memory = [job.plan.gpu_memory.host_bytes if gpu else job.plan.peak_memory_bytes for job in unit.jobs]
                asked = {"CPU": 1, "GPU": 1 if gpu else 0, "memory": TASK_BASE_MEMORY + sum(memory)}
                if asked["memory"] > self.asked.get("memory", 0):
                    self.asked = asked  # the most a task asks for
                options = {
                    "num_cpus": asked["CPU"],
                    "num_gpus": asked["GPU"],
                    "memory": asked["memory"],
                    "max_retries": MAX_RETRIES,
                    "retry_exceptions": list(_RETRIED),
                    "scheduling_strategy": "SPREAD",
                }
                args = (unit, started.key, tuple(needed), *(files[name] for name in needed))
                self.pending[remote.options(**options).remote(*args)] = (unit, members)
            self._wait(started)
        finally:
            started.forget()

    def _wait(self, started: _Started) -> None:
        nodes, checked, begun = 0, 0.0, time.monotonic()
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            self.stop.check()
            for ref in ready:
                self._finished(ref, *self.pending.pop(ref))
            waited = time.monotonic() - begun
            started.seen = started.seen or bool(ready)
            if not started.poll() and waited > self.start_timeout:
                raise self._not_started()
            if time.monotonic() - checked > 5:
                nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
                checked = time.monotonic()
            busy = f"{len(self.pending)} base shard{'s' if len(self.pending) != 1 else ''} in flight"
            if not started.seen:
                busy = f"waiting {waited:.0f} s of {self.start_timeout:g} for a node to start a task"
            self.progress.set_postfix_str(f"{busy}, {nodes} node{'s' if nodes != 1 else ''}", refresh=False)
            self.progress.refresh()

    def _not_started(self) -> ClusterError:
        """The cluster started no task in time: what it has, what a task asks, the likely cause.
        The tasks are cancelled."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        nodes = [node for node in self.ray.nodes() if node.get("Alive")]
        seen = "; ".join(f"{node.get('NodeManagerAddress', '?')} ({_resources(node['Resources'])})" for node in nodes)
        asked = _resources({key: value for key, value in self.asked.items() if value})
        free, total = self.ray.available_resources(), self.ray.cluster_resources()
        fits = any(all(node["Resources"].get(key, 0) >= value for key, value in self.asked.items()) for node in nodes)
        if self.asked.get("GPU") and not total.get("GPU"):
            cause = "the cluster has no GPU, and --device cuda asks one for each task"
            hint = "merge on the nodes' CPUs with --device auto or cpu, or add nodes with GPUs"
        elif not fits:
            cause = "no node has what one task asks for"
            hint = "add a node that has it (a task is one base shard, and needs the memory `plan` prints)"
        elif free.get("CPU", 0) >= total.get("CPU", 0):
            here = self.ray.util.get_node_ip_address()
            cause = f"the nodes' CPUs are free, so the nodes likely cannot reach this machine (the driver, {here})"
            hint = "run the merge on a node of the cluster, or let the nodes reach this machine's address and ports"
        else:
            cause = "the cluster's CPUs are busy with other work"
            hint = "wait for it, or raise --ray-start-timeout"
        return ClusterError(
            f"no task started within {self.start_timeout:g} s; nodes seen: {len(nodes)}, {seen or 'none'}; "
            f"each task asks for {asked}; likely cause: {cause}",
            hint=hint,
        )

    def _adapter_files(self) -> dict[str, Any]:
        """The adapter files sent through the object store (all of them or none), by path."""
        names = sorted({adapter.weights_file for job in self.jobs for adapter in job.plan.adapters})
        if sum(Path(name).stat().st_size for name in names) > ADAPTERS_BY_STORE:
            return {}
        return {name: self.ray.put(read_input(Path(name), ADAPTERS_BY_STORE)) for name in names}

    def _units(self) -> list[tuple[Unit, list[Job]]]:
        """One unit per base shard that some job still needs, with every job that needs it."""
        units = []
        for source in dict.fromkeys(shard.source for shard in self.jobs[0].plan.shards):
            members, parts = [], []
            for job in self.jobs:
                shards = [s for s in job.plan.shards if s.source == source and s.name in job.todo]
                if shards:
                    members.append(job)
                    parts.append(UnitJob(_absolute(cut(job.plan, shards)), job.push))
            if members:
                units.append((Unit(os.path.abspath(source), tuple(parts), self.device), members))
        return units

    def _finished(self, ref: Any, unit: Unit, members: list[Job]) -> None:
        names = [shard.name for shard in unit.jobs[0].plan.shards]
        try:
            node, results = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            tries = f"{MAX_RETRIES + 1} tries" if _retried(cause) else "its try"
            self._fail(members, names, f"on node {getattr(cause, 'node', '?')} ({tries})", cause)
            return
        except self.ray.exceptions.RayError as exc:
            self._fail(members, names, f"after {MAX_RETRIES + 1} tries", exc)
            return
        for result in results:
            self._accept(members[result.job], result, node)

    def _fail(self, members: list[Job], names: list[str], where: str, cause: BaseException) -> None:
        what = cause.one_line() if isinstance(cause, ShardmergeError) else _first_line(cause)
        shards = names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"
        for job in members:
            if job.error is None:
                job.error = ClusterError(
                    f"shard {shards} failed {where}: {what}",
                    file=job.folder,
                    hint="fix the cause, then run the same command again: finished shards are kept",
                )

    def _accept(self, job: Job, result: ShardDone, node: str) -> None:
        """Record one job's shard as a node wrote it: renamed into place (``kept``), or uploaded.
        A job that failed on another shard still keeps this one, for the next run to skip."""
        final = job.folder / result.shard
        tmp = outdir.tmp_path(final, result.attempt)
        if result.error is not None:
            tmp.unlink(missing_ok=True)
            if job.error is None:
                job.error = ClusterError(f"shard {result.shard} failed on node {node}: {result.error}")
            return
        if result.kept and not tmp.is_file():
            if job.error is None:
                job.error = ClusterError(
                    f"node {node} wrote this shard where the driver cannot see it",
                    file=tmp,
                    hint="give every node and the driver one shared output folder at the same path, or publish "
                    "with --push-to-hub and --delete-after-upload",
                )
            return
        shard = next(shard for shard in job.plan.shards if shard.name == result.shard)
        record = result.record
        journal = job.journal
        assert journal is not None and record is not None

        def accept() -> None:
            if result.kept:
                outdir.commit(tmp, final)
            journal.record(result.shard, record)
            if result.uploaded:
                assert record.sha256 is not None
                journal.mark_uploaded(result.shard, record.sha256, deleted=not result.kept)
            done(job, shard)
            self.progress.update(shard.size)

        failed = job.error
        step(job, accept)
        job.error = failed or job.error


def _absolute(plan: Plan) -> Plan:
    """``plan`` naming every file by its absolute path: the nodes' workers do not run in the
    driver's working folder."""
    files = {path: os.path.abspath(path) for shard in plan.shards for path in base_files(shard)}
    adapters = tuple(replace(a, weights_file=os.path.abspath(a.weights_file)) for a in plan.adapters)
    shards = tuple(relocated(shard, files) for shard in plan.shards)
    return replace(plan, shards=shards, adapters=adapters, output=os.path.abspath(plan.output or ""))


def _run_unit(unit: Unit, started: str, names: tuple[str, ...], *files: bytes) -> tuple[str, list[ShardDone]]:
    """The Ray task: ``unit`` merged on this node, and the node's name for messages (also on
    an error it raises, which reaches the driver pickled with it). It first notes that it
    started, where the driver sees it whether or not it can reach this node (see _Started)."""
    import ray

    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    _Started.note(started, node)
    try:
        return node, merge_unit(unit, dict(zip(names, files, strict=True)))
    except Exception as exc:
        exc.node = node  # type: ignore[attr-defined]
        raise


class _Started:
    """Whether a task of the pass has started: each task writes a key in the cluster's own
    key-value store (the head node's, which the nodes and the driver reach whatever else they
    cannot), and the driver looks for one about once a second. A task whose result came back
    has started too. A cluster where nothing starts (a driver the nodes cannot reach: their
    tasks wait for arguments only the driver holds; or no node that has what a task asks for)
    otherwise waits without a word."""

    NAMESPACE = "shardmerge"

    def __init__(self) -> None:
        self.key = f"started/{uuid.uuid4().hex}/"
        self.seen = False
        self.polled = 0.0
        try:
            from ray.experimental import internal_kv

            self.kv: ModuleType | None = internal_kv
        except ImportError:  # a Ray without it: no start is ever missed (no timeout), none seen
            self.kv = None

    def poll(self) -> bool:
        if self.kv is None:
            return True
        if not self.seen and time.monotonic() - self.polled >= 1:
            self.polled = time.monotonic()
            self.seen = bool(self.kv._internal_kv_list(self.key, namespace=self.NAMESPACE))
        return self.seen

    def forget(self) -> None:
        if self.kv is not None:
            self.kv._internal_kv_del(self.key, del_by_prefix=True, namespace=self.NAMESPACE)

    @classmethod
    def note(cls, key: str, node: str) -> None:
        """In the task: note that it started (never failing it for that)."""
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(f"{key}{uuid.uuid4().hex}", node, namespace=cls.NAMESPACE)
        except Exception:  # a task that cannot note it still merges; the driver sees its result
            return


def _resources(resources: dict[str, float]) -> str:
    """CPU, GPU and memory of a node or a task, in words."""
    parts = [f"{resources[key]:g} {key}" for key in ("CPU", "GPU") if resources.get(key)]
    if resources.get("memory"):
        parts.append(f"{resources['memory'] / 2**30:.1f} GiB memory")
    return ", ".join(parts) or "nothing"


def _retried(exc: BaseException) -> bool:
    return isinstance(exc, _RETRIED)


def _remove_strays(job: Job) -> None:
    """Temp files left by attempts that died or lost (a duplicate of a finished unit), in a
    folder this pass claimed."""
    if job.journal is not None:
        outdir.remove_temps(job.folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
