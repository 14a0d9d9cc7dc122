"""Merging on a Ray cluster of three nodes on 127.0.0.1: the output is byte for byte the local
merge's, whatever dies on the way."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from huggingface_hub import HfApi, snapshot_download

from conftest import Base, edit_tensor, llama_config, read_output, save_adapter, save_base
from fp8_checkpoints import fine_grained, quantize_checkpoint
from hub_server import Fault, HubServer
from ray_cluster import DRIVER_ADDRESS, LocalCluster, cluster_that_cannot_reach_its_driver, local_cluster
from shardmerge import merge
from shardmerge.errors import ClusterError

# One cluster for the module: its tests run in one worker of a parallel run (pytest-xdist).
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray-cluster")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKEN = "hf_loopbackTestToken0123456789"
REPO = "shardmerge-tests/cluster-merged"
BASE_REPO = "shardmerge-tests/cluster-base"
FP8_REPO = "shardmerge-tests/cluster-fp8"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Base, Path, Path]:
    """A base in 6 shards, an adapter on every linear layer, and their local merge."""
    root = tmp_path_factory.mktemp("cluster-inputs")
    base = save_base(llama_config(layers=4, hidden=64), root / "base", torch.bfloat16, shard_kb=48)
    adapter = save_adapter(base, root / "adapter", seed=3, r=4, target_modules=TARGETS)
    reference = root / "reference"
    merge(base=str(base.path), adapters=[str(adapter)], output=str(reference))
    assert len(list(reference.glob("*.safetensors"))) >= 4
    return base, adapter, reference


@pytest.fixture(scope="module")
def nodes() -> Iterator[LocalCluster]:
    with local_cluster() as made:
        yield made


@pytest.fixture
def hub(nodes: LocalCluster, inputs: tuple[Base, Path, Path]) -> Iterator[HubServer]:
    """The loopback Hub, holding the base as BASE_REPO; the nodes' Hub caches emptied (they
    would find the base's files by their hashes, and download nothing)."""
    nodes.clear_caches()
    with HubServer(TOKEN) as server:
        api = HfApi(endpoint=server.endpoint, token=TOKEN)
        api.create_repo(BASE_REPO)
        api.upload_folder(repo_id=BASE_REPO, folder_path=inputs[0].path)
        server.state.uploads.clear()
        server.state.commits_made = 0
        yield server


def _command(args: list[object]) -> list[str]:
    return [sys.executable, "-m", "shardmerge.cli", *(str(arg) for arg in args)]


def _env(nodes: LocalCluster, hub: HubServer | None = None) -> dict[str, str]:
    """The driver's environment: loopback for Ray, the loopback Hub, a cache of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "RAY_"))}
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HOME": str(nodes.root / "hf-driver")}
    if hub is not None:
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    return env


def _run(args: list[object], nodes: LocalCluster | None = None) -> subprocess.CompletedProcess[str]:
    env = None if nodes is None else _env(nodes)
    return subprocess.run(_command(args), capture_output=True, text=True, timeout=300, env=env)


def _start(args: list[object], nodes: LocalCluster, hub: HubServer, cwd: Path | None = None) -> subprocess.Popen[str]:
    """A driver: ``shardmerge ARGS --executor ray`` on the test cluster, in a child process."""
    command = _command([*args, "--executor", "ray", "--ray-address", nodes.address])
    pipe = subprocess.PIPE
    return subprocess.Popen(command, env=_env(nodes, hub), stdout=pipe, stderr=pipe, text=True, cwd=cwd)


def _failure(driver: subprocess.Popen[str]) -> str:
    if driver.poll() is None:
        return "the driver is still running"
    return f"exit {driver.returncode}: {driver.stderr.read() if driver.stderr else ''}"


def _task_held(hub: HubServer) -> psutil.Process:
    """The Ray worker whose request the server holds (a "hang" fault), by its connection."""
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        busy = command and command[0].startswith("ray::_run_unit")  # Ray names a busy worker after its task
        if busy and any(connection.laddr.port == hub.state.hung_port for connection in process.net_connections()):
            return process
    raise AssertionError("no task holds the request")


def _raylet_pid(node: object) -> int:
    return int(node.all_processes["raylet"][0].process.pid)  # type: ignore[attr-defined]


def _ancestors(process: psutil.Process) -> set[int]:
    return {parent.pid for parent in process.parents()}


def _journal(out: Path) -> dict[str, object]:
    try:
        return dict(json.loads((out / ".shardmerge" / "journal.json").read_text())["shards"])
    except (OSError, ValueError):
        return {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(hub: HubServer, tmp: Path) -> Path:
    return Path(snapshot_download(REPO, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp / "download"))


def _files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".gitattributes"}


def _model(folder: Path) -> dict[str, bytes]:
    """Every file but the card, which names the base by where it was read (a folder, a repo id)."""
    return {name: data for name, data in files(folder).items() if name != "README.md"}


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a merge's output but its journal."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_a_cluster_merge_is_the_local_merge(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    base, adapter, reference = inputs
    out = tmp_path / "out"
    report = merge(
        base=str(base.path), adapters=[str(adapter)], output=str(out), executor="ray", ray_address=nodes.address
    )
    assert report.device == "cpu on a Ray cluster", "merged by the cluster's tasks, not by this process"
    assert files(out) == files(reference)
    assert report.shards_skipped == 0 and report.bytes_written > 0


@pytest.mark.cuda_emulated
def test_auto_asks_for_the_clusters_gpus_and_cuda_on_a_cluster_without_any_fails_in_one_line(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    """Ray hides the GPUs from a task that asks for none: ``--device auto`` asks each task for
    one where the cluster has GPUs (here a node whose GPU its processes emulate), and merges
    the local merge's bytes there. On a cluster without a GPU, ``--device cuda`` fails after
    --ray-start-timeout, in one line that says why."""
    base, adapter, reference = inputs
    out = tmp_path / "out"
    node = nodes.add_worker(gpu=True)
    try:
        report = merge(
            base=str(base.path), adapters=[str(adapter)], output=str(out), executor="ray", ray_address=nodes.address
        )
    finally:
        nodes.cluster.remove_node(node)
    assert report.device == "cuda on a Ray cluster"
    assert files(out) == files(reference)
    journal = json.loads((out / ".shardmerge" / "journal.json").read_text())
    assert {record["device"] for record in journal["shards"].values()} == {"cuda:0"}
    started = time.monotonic()
    with pytest.raises(ClusterError) as failed:
        merge(
            base=str(base.path),
            adapters=[str(adapter)],
            output=str(tmp_path / "cuda"),
            device="cuda",
            executor="ray",
            ray_address=nodes.address,
            ray_start_timeout=3,
        )
    line = failed.value.one_line()
    assert "no task started within 3 s" in line and "each task asks for 1 CPU, 1 GPU, " in line
    assert "likely cause: the cluster has no GPU, and --device cuda asks one for each task" in line
    assert "--device auto or cpu" in line
    assert time.monotonic() - started < 60


def test_a_batch_on_one_base_is_each_jobs_local_merge(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    """Two customers' adapters, both saved as adapter_model.safetensors: each job gets its own.
    The second combines both by DARE-TIES: every task draws the masks the local merge draws."""
    base, adapter, reference = inputs
    other = save_adapter(base, tmp_path / "other", seed=4, r=2, target_modules=["q_proj", "down_proj"])
    half = tmp_path / "half-local"
    both = [{"path": str(adapter)}, {"path": str(other), "weight": 0.5}]
    combine = {"combine": "dare_ties", "density": 0.5, "seed": 9}
    merge(base=str(base.path), adapters=both, output=str(half), **combine)
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        yaml.safe_dump(
            {
                "defaults": {"base": str(base.path), "output": str(tmp_path / "{name}"), "executor": "ray"},
                "jobs": [
                    {"name": "full", "adapters": [str(adapter)]},
                    {"name": "half", "adapters": both, **combine},
                ],
            }
        )
    )
    done = _run(["run", batch, "--quiet", "--ray-address", nodes.address], nodes)
    assert done.returncode == 0, done.stderr
    assert "2 done" in done.stdout
    assert files(tmp_path / "full") == files(reference)
    assert files(tmp_path / "half") == files(half)


def test_a_worker_killed_mid_shard_is_retried_and_publishes_each_shard_once(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], hub: HubServer, tmp_path: Path
) -> None:
    """The task uploading shard 2 is killed once the server holds it: the task runs again,
    writes the shard under a new temp name, finds the upload done, and the dead attempt's
    temp file is gone at the end."""
    base, adapter, reference = inputs
    shards = sorted(reference.glob("*.safetensors"))
    hub.state.faults.append(Fault("PUT", f"/lfs-upload/{REPO}/{_sha256(shards[1])}", "hang"))
    out = tmp_path / "out"
    driver = _start(["merge", base.path, adapter, "-o", out, "--quiet", "--push-to-hub", REPO], nodes, hub)
    assert hub.state.hung.wait(120), _failure(driver)
    task = _task_held(hub)
    assert list(out.glob(f"{shards[1].name}.*.tmp")), "the task was writing shard 2"
    task.kill()
    hub.state.release.set()
    assert driver.wait(120) == 0, _failure(driver)
    assert files(out) == files(reference)
    assert not list(out.glob("*.tmp"))
    assert hub.state.commits_made == 1
    assert set(hub.state.uploads.values()) == {1} and len(hub.state.uploads) == len(shards)
    assert _files_of(_download(hub, tmp_path)) == files(out)


def test_publishing_from_the_cluster_uploads_each_shard_once_from_the_nodes(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], hub: HubServer, tmp_path: Path
) -> None:
    """With paths relative to the driver's folder, which the nodes' workers do not share."""
    base, adapter, reference = inputs
    out = tmp_path / "out"
    relative = [os.path.relpath(path, tmp_path) for path in (base.path, adapter)]
    command = ["merge", *relative, "-o", "out", "--quiet", "--push-to-hub", REPO, "--delete-after-upload"]
    driver = _start(command, nodes, hub, cwd=tmp_path)
    assert driver.wait(120) == 0, _failure(driver)
    shards = sorted(reference.glob("*.safetensors"))
    assert not list(out.glob("*.safetensors")), "each node deleted its shard once uploaded"
    assert hub.state.commits_made == 1
    assert set(hub.state.uploads.values()) == {1} and len(hub.state.uploads) == len(shards)
    downloaded = _files_of(_download(hub, tmp_path))
    assert {name: data for name, data in downloaded.items() if name.endswith(".safetensors")} == {
        shard.name: shard.read_bytes() for shard in shards
    }
    assert downloaded["model.safetensors.index.json"] == (reference / "model.safetensors.index.json").read_bytes()
    verified = _run(["verify", out], nodes)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_node_removed_mid_run_leaves_the_merge_to_the_others(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], hub: HubServer, tmp_path: Path
) -> None:
    """A Hub base: the node fetching shard 3 is removed while the server holds its download."""
    _, adapter, reference = inputs
    shards = sorted(reference.glob("*.safetensors"))
    hub.state.faults.append(Fault("GET", shards[2].name, "hang", whole=True))
    nodes.add_worker()  # the cluster keeps two worker nodes once one is removed
    out = tmp_path / "out"
    driver = _start(["merge", BASE_REPO, adapter, "-o", out, "--quiet"], nodes, hub)
    assert hub.state.hung.wait(120), _failure(driver)
    task = _task_held(hub)
    node = next(node for node in nodes.workers() if _raylet_pid(node) in _ancestors(task))
    nodes.cluster.remove_node(node)
    hub.state.release.set()
    assert driver.wait(120) == 0, _failure(driver)
    assert _model(out) == _model(reference)
    assert not list(out.glob("*.tmp"))
    gets = [status for _, method, path, status in hub.state.log if method == "GET" and path.endswith(shards[2].name)]
    assert gets.count(-1) == 1 and gets.count(200) == 1, "the lost task's download was made again, on another node"
    assert node not in nodes.workers()


def test_a_driver_killed_mid_run_resumes_with_the_missing_shards_only(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], hub: HubServer, tmp_path: Path
) -> None:
    _, adapter, reference = inputs
    shards = sorted(reference.glob("*.safetensors"))
    last = shards[-1].name
    hub.state.faults.append(Fault("GET", last, "hang", whole=True))
    out = tmp_path / "out"
    command = ["merge", BASE_REPO, adapter, "-o", out, "--quiet"]
    driver = _start(command, nodes, hub)
    assert hub.state.hung.wait(120), _failure(driver)
    deadline = time.monotonic() + 60
    while len(_journal(out)) < len(shards) - 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    finished = _journal(out)
    assert sorted(finished) == [shard.name for shard in shards[:-1]]
    driver.kill()
    driver.wait()
    hub.state.release.set()
    before = {name: (out / name).stat().st_ino for name in finished}
    again = _start(command, nodes, hub)
    assert again.wait(120) == 0, _failure(again)
    stdout = again.stdout.read() if again.stdout else ""
    assert f"resumed: {len(shards) - 1} of {len(shards)} shards were already finished" in stdout
    assert {name: (out / name).stat().st_ino for name in finished} == before, "finished shards were not redone"
    assert _model(out) == _model(reference)


def test_a_task_that_fails_for_good_names_the_shard_and_the_node(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    """A value out of float16's range is found by the task merging its shard."""
    base, adapter, _ = inputs
    copy = tmp_path / "base"
    shutil.copytree(base.path, copy)
    name = "model.layers.1.self_attn.q_proj.weight"
    value = read_output(copy)[name].clone()
    value[0, 0] = 1e5
    edit_tensor(copy, name, value)
    out = tmp_path / "out"
    flags = ["--dtype", "float16", "--quiet", "--executor", "ray", "--ray-address", nodes.address]
    done = _run(["merge", copy, adapter, "-o", out, *flags], nodes)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    shard = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"][name]
    assert f"shard {shard} failed on node " in line and "(127.0.0.1)" in line
    assert f"{name}: 1 values would be NaN or Inf in the output" in line
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("*.tmp"))
    assert not (out / shard).exists()


def test_a_cluster_that_does_not_answer_is_one_line(inputs: tuple[Base, Path, Path], tmp_path: Path) -> None:
    base, adapter, _ = inputs
    with socket.socket() as probe:  # a port on 127.0.0.1 that nothing listens at
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    done = _run(["merge", base.path, adapter, "-o", out, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"])
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert f"nothing answers at the Ray cluster address 127.0.0.1:{port}" in line and "ray start --head" in line
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.tmp"))


def test_a_cluster_whose_nodes_cannot_reach_the_driver_fails_in_one_line(
    inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    """The nodes on one address, the driver on another that they cannot reach: no task ever
    starts. After --ray-start-timeout the merge says so, with what it saw, and exits."""
    base, adapter, _ = inputs
    out = tmp_path / "out"
    with cluster_that_cannot_reach_its_driver() as address:
        driver = (
            "import logging, sys, ray\n"
            f"ray.init(address={address!r}, _node_ip_address={DRIVER_ADDRESS!r}, log_to_driver=False, "
            "logging_level=logging.WARNING)\n"
            "from shardmerge.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
        args = ["merge", base.path, adapter, "-o", out, "--executor", "ray", "--ray-start-timeout", "10"]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", driver, *map(str, args)],
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("shardmerge: ")]
    assert "no task started within 10 s; nodes seen: 3," in line and "1 CPU" in line
    assert "each task asks for 1 CPU, " in line and "GiB memory" in line
    assert f"the nodes likely cannot reach this machine (the driver, {DRIVER_ADDRESS})" in line
    assert seconds < 60
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.tmp"))


def test_the_cluster_options_are_checked(inputs: tuple[Base, Path, Path], tmp_path: Path) -> None:
    base, adapter, _ = inputs
    done = _run(["merge", base.path, adapter, "-o", tmp_path / "out", "--ray-address", "127.0.0.1:6379"])
    assert done.returncode == 2
    assert "ray_address only applies with executor: ray" in done.stderr
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"base": str(base.path), "adapters": [str(adapter)], "output": "out", "executor": "rey"})
    )
    done = _run(["run", job])
    assert done.returncode == 2 and "executor" in done.stderr
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_the_error_says_how_to_install_it(
    inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    base, adapter, _ = inputs
    missing = tmp_path / "no-ray" / "ray"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "PYTHONPATH": str(missing.parent)}
    command = _command(["merge", base.path, adapter, "-o", tmp_path / "out", "--executor", "ray"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1
    assert "--executor ray needs Ray, which is not installed" in done.stderr
    assert "pip install 'shardmerge[ray]'" in done.stderr


def test_an_fp8_hub_base_whose_scale_is_in_another_shard(nodes: LocalCluster, hub: HubServer, tmp_path: Path) -> None:
    """Each node downloads, through its own cache, the shard it merges and the other shard
    holding one of its weights' scales."""
    source = save_base(llama_config(hidden=64), tmp_path / "bf16", torch.bfloat16, seed=8)
    base = quantize_checkpoint(source.path, tmp_path / "fp8", fine_grained())
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=9, r=4, target_modules=["q_proj", "down_proj"])
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(FP8_REPO)
    api.upload_folder(repo_id=FP8_REPO, folder_path=base.path)
    local = tmp_path / "local"
    merge(base=str(base.path), adapters=[str(adapter)], output=str(local))
    out = tmp_path / "out"
    driver = _start(["merge", FP8_REPO, adapter, "-o", out, "--quiet"], nodes, hub)
    assert driver.wait(120) == 0, _failure(driver)
    assert _model(out) == _model(local)


def test_a_base_shard_the_hub_refuses_fails_after_the_retries_naming_shard_and_node(
    nodes: LocalCluster, inputs: tuple[Base, Path, Path], hub: HubServer, tmp_path: Path
) -> None:
    _, adapter, reference = inputs
    shards = sorted(reference.glob("*.safetensors"))
    hub.state.faults.append(Fault("GET", shards[1].name, 403, times=100, whole=True))
    out = tmp_path / "out"
    driver = _start(["merge", BASE_REPO, adapter, "-o", out, "--quiet"], nodes, hub)
    assert driver.wait(120) == 1
    (line,) = (driver.stderr.read() if driver.stderr else "").strip().splitlines()
    assert f"shard {shards[1].name} failed on node " in line and "(127.0.0.1) (4 tries)" in line
    assert "the Hub answered HTTP 403" in line
    fetched = [path for _, method, path, status in hub.state.log if method == "GET" and status == 403]
    assert len(fetched) == 4, "a task that failed to download its base shard ran again, three times"
    assert not (out / shards[1].name).exists() and not list(out.glob("*.tmp"))
    assert sorted(_journal(out)) == sorted(shard.name for shard in shards if shard != shards[1])
