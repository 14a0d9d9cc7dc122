"""A real Ray cluster on 127.0.0.1: a head node that runs no tasks and two worker nodes of
one CPU each, every process bound to loopback, each worker node with its own Hub cache.

Ray finds a machine's address by the route to the outside and binds there; with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` it takes the loopback address instead. It is read when
Ray is imported, so it is set here first, and passed on to the drivers the tests start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

LOOPBACK = "127.0.0.1"
# Node loss noticed in about a second, not the default half a minute.
SYSTEM_CONFIG = {"health_check_period_ms": 200, "health_check_failure_threshold": 5, "health_check_timeout_ms": 500}


def _head(root: Path, **extra: object) -> Cluster:
    """A cluster of a head node that runs no task, its files in ``root``."""
    args = {"num_cpus": 0, "node_ip_address": LOOPBACK, "temp_dir": str(root / "ray"), "include_dashboard": False}
    return Cluster(initialize_head=True, head_node_args={**args, **extra})


def _put(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """``os.environ`` with ``values`` for the block (None: without the key), as it was after."""
    before = {key: os.environ.get(key) for key in values}
    _put(values)
    try:
        yield
    finally:
        _put(before)


@contextmanager
def _root() -> Iterator[Path]:
    """A folder for a cluster's files, removed after. Ray's socket paths must stay under 108
    bytes: a short folder, not pytest's tmp_path. Ray notes the cluster's address in
    RAY_TMPDIR/ray (by default /tmp/ray, which a fresh machine does not have): here instead."""
    root = Path(tempfile.mkdtemp(prefix="smray-"))
    try:
        with _environment(RAY_TMPDIR=str(root)):
            yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class LocalCluster:
    """The cluster and the worker nodes the tests may add or remove."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster = _head(root, _system_config=SYSTEM_CONFIG)
        self.count = 0
        for _ in range(2):
            self.add_worker()

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_worker(self, gpu: bool = False) -> object:
        """A node of one CPU; with ``gpu``, also one GPU that its processes emulate
        (SHARDMERGE_EMULATE_CUDA): Ray schedules on it as on a GPU."""
        self.count += 1
        env = {"HF_HOME": str(self.root / f"hf-node{self.count}")} | ({"SHARDMERGE_EMULATE_CUDA": "1"} if gpu else {})
        return self.cluster.add_node(
            num_cpus=1, num_gpus=int(gpu), node_ip_address=LOOPBACK, env_vars=env, resources={f"node{self.count}": 1}
        )

    def clear_caches(self) -> None:
        for cache in self.root.glob("hf-*"):
            shutil.rmtree(cache)

    def workers(self) -> list[object]:
        return list(self.cluster.worker_nodes)


# What a node's processes are started with so that they reach 127.0.0.1 and nothing else: their
# gRPC connections go through a proxy at a port where nothing listens.
_ONLY_LOOPBACK_ONE = {
    "RAY_grpc_enable_http_proxy": "1",
    "grpc_proxy": f"http://{LOOPBACK}:9",
    "no_grpc_proxy": f"{LOOPBACK},localhost",
}
DRIVER_ADDRESS = "127.0.0.2"


@contextmanager
def cluster_that_cannot_reach_its_driver() -> Iterator[str]:
    """A cluster whose worker node cannot reach the driver: a head node that runs no tasks, a
    worker node of one CPU that reaches 127.0.0.1 only, and a node without CPUs at
    DRIVER_ADDRESS for a driver to join (``ray.init(..., _node_ip_address=DRIVER_ADDRESS)``).
    The driver connects and submits; a task whose arguments only it holds never starts.
    Yields the cluster's address."""
    with _root() as root:
        cluster = _head(root)
        try:
            with _environment(**_ONLY_LOOPBACK_ONE):  # for the worker node's processes only
                cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
            cluster.add_node(num_cpus=0, node_ip_address=DRIVER_ADDRESS)
            yield str(cluster.address)
        finally:
            cluster.shutdown()


@contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """A cluster for the block; every process it started is stopped after."""
    with _root() as root:
        made = LocalCluster(root)
        try:
            yield made
        finally:
            if ray.is_initialized():
                ray.shutdown()
            made.cluster.shutdown()
