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


class LocalCluster:
    """The cluster and the worker nodes the tests may add or remove."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": LOOPBACK,
                "temp_dir": str(root / "ray"),
                "include_dashboard": False,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        self.count = 0
        for _ in range(2):
            self.add_worker()

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_worker(self) -> object:
        self.count += 1
        home = self.root / f"hf-node{self.count}"
        return self.cluster.add_node(
            num_cpus=1, node_ip_address=LOOPBACK, env_vars={"HF_HOME": str(home)}, resources={f"node{self.count}": 1}
        )

    def clear_caches(self) -> None:
        for cache in self.root.glob("hf-*"):
            shutil.rmtree(cache)

    def workers(self) -> list[object]:
        return list(self.cluster.worker_nodes)


@contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """A cluster for the block; every process it started is stopped after."""
    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="smray-"))
    # Ray notes the cluster's address in RAY_TMPDIR/ray (default /tmp/ray, which a fresh
    # machine does not have): the cluster's own folder instead.
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(root)
    made = LocalCluster(root)
    try:
        yield made
    finally:
        if ray.is_initialized():
            ray.shutdown()
        made.cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        if before is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = before
