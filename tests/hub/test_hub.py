"""Publishing to a Hub-protocol server on 127.0.0.1 with the real huggingface_hub client.

The merge runs as the ``shardmerge`` command in a child process, with ``HF_ENDPOINT`` pointing
at the server, a temporary ``HF_HOME`` and xet disabled (the LFS path). What the server
received is then downloaded with ``snapshot_download`` and compared with a local merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, snapshot_download

from conftest import Base, llama_config, save_adapter, save_base
from fp8_checkpoints import fine_grained, quantize_checkpoint
from hub_server import Fault, HubServer
from packed_checkpoints import int_checkpoint, int_config, nvfp4_checkpoint
from shardmerge.output import journal as journals

TOKEN = "hf_loopbackTestToken0123456789"
REPO = "shardmerge-tests/llama-merged"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Base, Path, Path]:
    """A base of about 13 shards of 3 MB, an adapter on every linear layer, and their local merge."""
    root = tmp_path_factory.mktemp("hub-inputs")
    config = llama_config(layers=8, hidden=512)
    base = save_base(config, root / "base", torch.bfloat16, shard_kb=3072)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = save_adapter(base, root / "adapter", seed=5, r=8, target_modules=targets)
    reference = root / "reference"
    subprocess.run(_command("merge", base.path, adapter, "-o", reference, "--quiet"), check=True)
    assert len(list(reference.glob("*.safetensors"))) >= 10
    return base, adapter, reference


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(TOKEN) as server:
        yield server


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "shardmerge.cli", *(str(arg) for arg in args)]


def _env(hub: HubServer, home: Path, token: str = TOKEN) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}


def _merge(hub: HubServer, inputs: tuple[Base, Path, Path], out: Path, *flags: str) -> list[str]:
    base, adapter, _ = inputs
    return _command("merge", base.path, adapter, "-o", out, "--quiet", "--push-to-hub", REPO, *flags)


def _run(command: list[str], hub: HubServer, home: Path, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=_env(hub, home, token), capture_output=True, text=True, timeout=300)


def _download(hub: HubServer, tmp: Path, revision: str = "main") -> Path:
    return Path(
        snapshot_download(REPO, revision=revision, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp / "download")
    )


def _files(folder: Path) -> dict[str, bytes]:
    skip = {".gitattributes"}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pushed_model_downloads_byte_identical_in_one_commit(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, _, reference = inputs
    out = tmp_path / "out"
    done = _run(_merge(hub, inputs, out), hub, tmp_path / "home")
    assert done.returncode == 0, done.stderr
    downloaded = _files(_download(hub, tmp_path))
    assert downloaded == _files(out)
    shards = sorted(reference.glob("*.safetensors"))
    pushed = {name: data for name, data in downloaded.items() if name.endswith(".safetensors")}
    assert pushed == {p.name: p.read_bytes() for p in shards}
    assert hub.state.commits_made == 1
    assert set(hub.state.uploads.values()) == {1} and len(hub.state.uploads) == len(shards)
    # The commit's id is the one the command printed.
    head = hub.state.head(REPO, "main")
    assert head is not None and head.oid in done.stdout
    # Upload overlaps merging: the first shard reached the server before the last was written.
    first = next(t for t, method, path, status in hub.state.log if method == "PUT" and status == 200)
    first_oid = next(path for _, method, path, _ in hub.state.log if method == "PUT").rsplit("/", 1)[1]
    assert first_oid == _sha256(out / shards[0].name)
    assert first < (out / shards[-1].name).stat().st_mtime
    # The card: Hub metadata and how the model was made.
    card = downloaded["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "shardmerge" in front["tags"]
    assert "| 0 | `adapter` | LORA | 8 | 1 |" in card and "in the base's dtype" in card
    # The token is never printed or written.
    produced = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert TOKEN.encode() not in produced and TOKEN not in done.stdout + done.stderr


def test_a_kill_during_upload_sends_no_shard_twice_and_commits_once(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, _, reference = inputs
    out, home = tmp_path / "out", tmp_path / "home"
    first = sorted(reference.glob("*.safetensors"))[0]
    # Kill 1: the first shard is stored on the server, its verify answer never comes.
    hub.state.faults.append(Fault("POST", f"/lfs-verify/{REPO}/{_sha256(first)}", "hang"))
    _kill_when_hung(hub, _merge(hub, inputs, out), home)
    # Kill 2: the commit is made on the server, its answer never comes.
    hub.state.faults.append(Fault("POST", f"/api/models/{REPO}/commit/", "hang"))
    _kill_when_hung(hub, _merge(hub, inputs, out), home)
    assert hub.state.commits_made == 1
    done = _run(_merge(hub, inputs, out), hub, home)
    assert done.returncode == 0, done.stderr
    shards = list(reference.glob("*.safetensors"))
    assert len(hub.state.uploads) == len(shards) and set(hub.state.uploads.values()) == {1}
    assert hub.state.commits_made == 1
    head = hub.state.head(REPO, "main")
    assert head is not None and head.oid in done.stdout
    assert _files(_download(hub, tmp_path)) == _files(out)


def _kill_when_hung(hub: HubServer, command: list[str], home: Path) -> None:
    child = subprocess.Popen(command, env=_env(hub, home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.state.hung.wait(120), "the fault was never reached"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
    hub.state.release.set()
    time.sleep(0.1)
    hub.state.hung.clear()
    hub.state.release.clear()


def test_delete_after_upload_keeps_at_most_two_shards_on_disk(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, _, reference = inputs
    out = tmp_path / "out"
    # A slow Hub: unbounded, the merge would run ahead and hold every shard.
    hub.state.faults.append(Fault("PUT", "/lfs-upload/", "delay", times=100, seconds=0.3))
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                used = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
            except (FileNotFoundError, OSError):
                used = 0
            peak[0] = max(peak[0], used)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        done = _run(_merge(hub, inputs, out, "--delete-after-upload"), hub, tmp_path / "home")
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr
    largest = max(p.stat().st_size for p in reference.glob("*.safetensors"))
    assert largest < peak[0] <= 2 * largest + 64 * 1024
    assert not list(out.glob("*.safetensors"))
    downloaded = _files(_download(hub, tmp_path))
    assert {name: data for name, data in downloaded.items() if name.endswith(".safetensors")} == {
        p.name: p.read_bytes() for p in reference.glob("*.safetensors")
    }
    assert hub.state.commits_made == 1
    checked = subprocess.run(_command("verify", out), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # Run again: nothing is merged, sent or committed again.
    again = _run(_merge(hub, inputs, out, "--delete-after-upload"), hub, tmp_path / "home")
    assert again.returncode == 0, again.stderr
    assert set(hub.state.uploads.values()) == {1} and hub.state.commits_made == 1


def test_injected_errors_and_dropped_connections_are_retried(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    hub.state.faults += [
        Fault("POST", "/preupload/", "drop"),
        Fault("POST", ".git/info/lfs/objects/batch", 500),
        Fault("PUT", "/lfs-upload/", 503),
        Fault("PUT", "/lfs-upload/", "drop"),
        Fault("POST", "/commit/", 500),
        Fault("POST", "/commit/", "drop"),
        Fault("POST", "/paths-info/", 429),
    ]
    out = tmp_path / "out"
    done = _run(_merge(hub, inputs, out), hub, tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert all(fault.times == 0 for fault in hub.state.faults)
    assert hub.state.commits_made == 1
    assert _files(_download(hub, tmp_path)) == _files(out)


def test_a_bad_token_is_one_clear_line_before_any_merging(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = _run(_merge(hub, inputs, out), hub, tmp_path / "home", token="hf_wrong")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{REPO}: the Hub refused the token while creating the repo (401 Unauthorized)" in lines[0]
    assert "hf auth login" in lines[0] and "hf_wrong" not in done.stderr
    assert not list(out.glob("*.safetensors")) and not hub.state.repos


@pytest.mark.parametrize(
    ("name", "message"),
    [("not a repo", "is not a Hub repo name"), ("org/na--me", "is not a Hub repo name"), ("a/b/c", "ORG/NAME")],
)
def test_a_wrong_repo_name_is_refused_before_anything_runs(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path, name: str, message: str
) -> None:
    base, adapter, _ = inputs
    command = _command("merge", base.path, adapter, "-o", tmp_path / "out", "--push-to-hub", name)
    done = _run(command, hub, tmp_path / "home")
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists() and not hub.state.log


def test_push_publishes_a_finished_merge_to_a_branch(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, _, reference = inputs
    home = tmp_path / "home"
    push = _command("push", reference, REPO, "--revision", "dev", "--private", "--commit-message", "Merged v1")
    done = _run(push, hub, home)
    assert done.returncode == 0, done.stderr
    assert hub.state.repos[REPO].private
    commit = hub.state.head(REPO, "dev")
    assert commit is not None and commit.message == "Merged v1"
    assert _files(_download(hub, tmp_path, revision="dev")) == _files(reference)
    main = hub.state.head(REPO, "main")
    assert main is not None and set(main.files) == {".gitattributes"}
    uploads = dict(hub.state.uploads)
    again = _run(push, hub, home)
    assert again.returncode == 0, again.stderr
    assert hub.state.uploads == uploads and hub.state.commits_made == 1


def test_an_nvfp4_merge_published_as_it_runs_is_the_local_merge(hub: HubServer, tmp_path: Path) -> None:
    """Kept in NVFP4, its new scales in their weights' shards, as the local merge writes them."""
    source = save_base(llama_config(), tmp_path / "bf16", torch.bfloat16, seed=3)
    base = nvfp4_checkpoint(source.path, tmp_path / "nvfp4")
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=9, r=4, target_modules=["q_proj", "gate_proj"])
    local, out = tmp_path / "local", tmp_path / "out"
    subprocess.run(_command("merge", base.path, adapter, "-o", local, "--quiet"), check=True)
    done = _run(
        _command("merge", base.path, adapter, "-o", out, "--quiet", "--push-to-hub", REPO), hub, tmp_path / "home"
    )
    assert done.returncode == 0, done.stderr
    pushed = {name: data for name, data in _files(_download(hub, tmp_path)).items() if name.endswith(".safetensors")}
    assert pushed == {p.name: p.read_bytes() for p in local.glob("*.safetensors")}
    assert hub.state.commits_made == 1


# The command with hashlib.sha256 counted: how many times each digest was taken.
_COUNTING = """
import atexit, collections, hashlib, json, sys
counts, real, taken = sys.argv.pop(1), hashlib.sha256, collections.Counter()
class Counted:
    def __init__(self, data=b"", **options):
        self.inner = real(data, **options)
    def update(self, data):
        self.inner.update(data)
    def hexdigest(self):
        taken[self.inner.hexdigest()] += 1
        return self.inner.hexdigest()
    def digest(self):
        return bytes.fromhex(self.hexdigest())
hashlib.sha256 = Counted
atexit.register(lambda: open(counts, "w").write(json.dumps(taken)))
from shardmerge.cli import main
sys.exit(main())
"""


def test_sha256_is_computed_only_to_publish_and_once_per_shard(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    base, adapter, _ = inputs
    home, counts = tmp_path / "home", tmp_path / "counts.json"

    def hashed(folder: Path, *args: object) -> set[int]:
        """Runs ``args``; how many times each shard of ``folder`` had its sha256 taken."""
        done = _run([sys.executable, "-c", _COUNTING, str(counts), *(str(arg) for arg in args)], hub, home)
        assert done.returncode == 0, done.stderr
        taken = json.loads(counts.read_text())
        return {taken.get(_sha256(path), 0) for path in folder.glob("*.safetensors")}

    local = tmp_path / "local"
    assert hashed(local, "merge", base.path, adapter, "-o", local, "--quiet") == {0}
    journal = journals.load(local)
    assert journal is not None and all(r.sha256 is None and r.xxh3_128 for r in journal.shards.values())
    assert hashed(local, "push", local, REPO) == {1}  # when uploaded, and kept in the journal
    journal = journals.load(local)
    assert journal is not None and all(r.sha256 == _sha256(local / n) for n, r in journal.shards.items())
    assert _files(_download(hub, tmp_path)) == _files(local)
    assert hashed(local, "push", local, REPO) == {0}

    published = tmp_path / "published"
    merge = ("merge", base.path, adapter, "-o", published, "--quiet", "--push-to-hub", f"{REPO}-2")
    assert hashed(published, *merge) == {1}  # while written: no shard is read back to hash it


def test_an_fp8_merge_publishes_its_requantized_shards_and_unchanged_config(hub: HubServer, tmp_path: Path) -> None:
    source = save_base(llama_config(hidden=64), tmp_path / "bf16", torch.bfloat16, seed=8)
    base = quantize_checkpoint(source.path, tmp_path / "fp8", fine_grained())
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=9, r=4, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    done = _run(
        _command("merge", base.path, adapter, "-o", out, "--quiet", "--push-to-hub", REPO), hub, tmp_path / "home"
    )
    assert done.returncode == 0, done.stderr
    assert "merged weights requantized" in done.stdout
    downloaded = _files(_download(hub, tmp_path))
    assert downloaded == _files(out) and hub.state.commits_made == 1
    assert downloaded["config.json"] == (base.path / "config.json").read_bytes()


def test_a_packed_int_base_from_the_hub_is_refused_until_downloaded(hub: HubServer, tmp_path: Path) -> None:
    """Packed weights' shapes are tensor data (weight_shape), which a Hub base's header reads
    do not bring: one line per shard, the way out named, no guessed shape."""
    source = save_base(llama_config(hidden=64), tmp_path / "bf16", torch.bfloat16, seed=8)
    base = int_checkpoint(source.path, tmp_path / "int4", int_config(4, symmetric=True, group=8))
    adapter = save_adapter(base.dequantized, tmp_path / "adapter", seed=9, r=4, target_modules=["q_proj"])
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("shardmerge-tests/int4")
    api.upload_folder(repo_id="shardmerge-tests/int4", folder_path=base.path)
    done = _run(_command("plan", "shardmerge-tests/int4", adapter), hub, tmp_path / "home")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "the shapes of packed weights" in line]
    assert len(lines) == 2 and "which is not downloaded" in lines[0], done.stderr  # one per shard
    assert "hf download" in done.stderr
    local = subprocess.run(_command("plan", base.path, adapter), capture_output=True, text=True)
    assert local.returncode == 0, local.stderr


def test_yaml_job_keys_publish(hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path) -> None:
    base, adapter, reference = inputs
    job = tmp_path / "job.yaml"
    fields = {"base": str(base.path), "adapters": [str(adapter)], "output": "out", "push_to_hub": REPO}
    job.write_text(yaml.safe_dump({**fields, "private": True, "commit_message": "From YAML"}))
    done = _run(_command("run", job, "--quiet"), hub, tmp_path / "home")
    assert done.returncode == 0, done.stderr
    head = hub.state.head(REPO, "main")
    assert head is not None and head.message == "From YAML" and hub.state.repos[REPO].private
    journal = json.loads((tmp_path / "out" / ".shardmerge" / "journal.json").read_text())
    assert journal["push"]["commit"] == head.oid
    assert _files(_download(hub, tmp_path)) == _files(tmp_path / "out")
    assert _files(tmp_path / "out").keys() == _files(reference).keys()


BASE_REPO = "shardmerge-tests/base"
ADAPTER_REPO = "shardmerge-tests/adapter"


def _publish_inputs(hub: HubServer, inputs: tuple[Base, Path, Path]) -> None:
    base, adapter, _ = inputs
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    for repo, folder in ((BASE_REPO, base.path), (ADAPTER_REPO, adapter)):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    hub.state.log.clear()


def _base_gets(hub: HubServer, status: int) -> dict[str, float]:
    prefix = f"/{BASE_REPO}/resolve/"
    return {
        path.rsplit("/", 1)[1]: when
        for when, method, path, code in hub.state.log
        if method == "GET" and path.startswith(prefix) and path.endswith(".safetensors") and code == status
    }


def test_hub_ids_as_inputs_with_shards_fetched_as_the_merge_reaches_them(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, _, reference = inputs
    _publish_inputs(hub, inputs)
    home, out = tmp_path / "home", tmp_path / "out"
    command = _command("merge", BASE_REPO, f"{ADAPTER_REPO}@main", "-o", out, "--quiet")
    done = _run(command, hub, home)
    assert done.returncode == 0, done.stderr
    assert _shards(out) == _shards(reference)
    # Headers came by range requests, before any shard was downloaded whole.
    names = sorted(p.name for p in reference.glob("*.safetensors"))
    ranges, whole = _base_gets(hub, 206), _base_gets(hub, 200)
    assert set(ranges) == set(whole) == set(names)
    assert max(ranges.values()) < min(whole.values())
    # Each shard was downloaded only once the merge had written the one two places before it.
    for position in range(2, len(names)):
        assert whole[names[position]] > (out / names[position - 2]).stat().st_mtime, names[position]
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model"] == BASE_REPO and f"`{ADAPTER_REPO}`" in (out / "README.md").read_text()
    # Offline, from the cache: the same bytes, and not one request.
    hub.state.log.clear()
    offline = {**_env(hub, home), "HF_HUB_OFFLINE": "1"}
    again = subprocess.run(
        _command("merge", BASE_REPO, ADAPTER_REPO, "-o", tmp_path / "offline", "--quiet"),
        env=offline,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert _shards(tmp_path / "offline") == _shards(reference) and not hub.state.log
    missing = subprocess.run(
        _command("plan", "shardmerge-tests/elsewhere", ADAPTER_REPO), env=offline, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert "shardmerge-tests/elsewhere: not in the cache" in missing.stderr


def test_a_batch_from_the_hub_to_the_hub_holds_a_few_shards_on_disk(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, adapter, reference = inputs
    _publish_inputs(hub, inputs)
    hub.state.faults.append(Fault("PUT", "/lfs-upload/", "delay", times=100, seconds=0.1))
    batch = tmp_path / "batch.yaml"
    defaults = {
        "base": BASE_REPO,
        "output": "runs/{name}",
        "push_to_hub": "shardmerge-tests/{name}",
        "delete_after_upload": True,
    }
    jobs = [
        {"name": "full", "adapters": [ADAPTER_REPO]},
        {"name": "half", "adapters": [{"path": ADAPTER_REPO, "weight": 0.5}]},
    ]
    batch.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}))
    home = tmp_path / "home"
    peak = [0]
    stop = threading.Event()

    def used() -> int:
        files = [p for root in (home, tmp_path / "runs") if root.exists() for p in root.rglob("*")]
        return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], used())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        done = _run(_command("run", batch, "--quiet"), hub, home)
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr + done.stdout
    assert "2 jobs: 2 done" in done.stdout and f"{hub.endpoint}/shardmerge-tests/half" in done.stdout
    largest = max(p.stat().st_size for p in reference.glob("*.safetensors"))
    small = (adapter / "adapter_model.safetensors").stat().st_size + 512 * 1024
    # Two base shards (the one read, the next downloading), two per job (uploading, writing).
    assert peak[0] <= 6 * largest + small, (peak[0], largest)
    assert not [p for p in home.rglob("*.safetensors") if "base" in str(p)]  # fetched by this run, dropped
    pushed = _files(
        Path(snapshot_download("shardmerge-tests/full", endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "d"))
    )
    assert {name: data for name, data in pushed.items() if name.endswith(".safetensors")} == _shards(reference)


def test_a_split_merge_from_the_hub_to_the_hub_fetches_each_base_shard_once(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    """--max-shard-size on a Hub base, published, deleting shards after their upload: several
    output shards are read from each base shard, which is downloaded once and kept until the
    last of them is written; each output shard is uploaded once, in one commit."""
    base, adapter, _ = inputs
    local = tmp_path / "local"
    split = _command("merge", base.path, adapter, "-o", local, "--quiet", "--max-shard-size", "1MB")
    assert subprocess.run(split, capture_output=True, text=True).returncode == 0
    _publish_inputs(hub, inputs)
    out = tmp_path / "out"
    command = _command(
        "merge", BASE_REPO, ADAPTER_REPO, "-o", out, "--quiet", "--max-shard-size", "1MB", "--push-to-hub", REPO,
        "--delete-after-upload",
    )  # fmt: skip
    done = _run(command, hub, tmp_path / "home")
    assert done.returncode == 0, done.stderr
    pushed = {n: d for n, d in _files(_download(hub, tmp_path)).items() if n.endswith(".safetensors")}
    assert pushed == _shards(local) and len(pushed) > 2 * len(list(base.path.glob("*.safetensors")))
    assert all(hub.state.uploads[hashlib.sha256(data).hexdigest()] == 1 for data in pushed.values())
    assert hub.state.commits_made == 3  # the base's and the adapter's, then the merge's one
    whole = [path for _, method, path, code in hub.state.log if method == "GET" and code == 200]
    base_files = [path for path in whole if path.startswith(f"/{BASE_REPO}/resolve/") and path.endswith(".safetensors")]
    assert len(base_files) == len(set(base_files)) == len(list(base.path.glob("*.safetensors")))


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_missing_folder_that_reads_as_a_repo_id_is_one_clear_line(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    _, adapter, _ = inputs
    command = _command("plan", "models/llama", adapter)
    absent = _run(command, hub, tmp_path / "home")
    assert absent.returncode == 1
    assert absent.stderr.strip().splitlines() == [
        "shardmerge: error: models/llama: no local folder by this name, and no Hub repo either "
        "(check the path or the repo id; for a private or gated repo, log in with `hf auth login` or set HF_TOKEN)"
    ]
    unreachable = {**_env(hub, tmp_path / "home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    down = subprocess.run(command, env=unreachable, capture_output=True, text=True)
    assert down.returncode == 1
    assert "models/llama: no local folder by this name, and the Hub cannot be reached" in down.stderr
    assert "Traceback" not in down.stderr


def test_push_refuses_a_folder_that_is_not_a_finished_merge(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    base, adapter, _ = inputs
    (tmp_path / "empty").mkdir()
    foreign = _run(_command("push", tmp_path / "empty", REPO), hub, tmp_path / "home")
    assert foreign.returncode == 1 and "no shardmerge journal in .shardmerge" in foreign.stderr
    flags = _run(_command("merge", base.path, adapter, "-o", tmp_path / "out", "--private"), hub, tmp_path / "home")
    assert flags.returncode == 2 and "private only apply with push_to_hub" in flags.stderr
    assert not hub.state.repos


@pytest.mark.parametrize("fault", [503, "drop"], ids=["503", "reset"])
def test_a_hub_that_keeps_failing_is_one_line_within_a_minute_and_the_merge_resumes(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path, fault: int | str
) -> None:
    """Every upload refused: one layer of retries (huggingface_hub's, 6 tries a request), no
    retry warnings, the merge stops at the failure; then the same command publishes."""
    _, _, reference = inputs
    hub.state.faults.append(Fault("PUT", "/lfs-upload/", fault, times=1_000))
    out = tmp_path / "out"
    started = time.monotonic()
    done = _run(_merge(hub, inputs, out), hub, tmp_path / "home")
    seconds = time.monotonic() - started
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert f"{REPO}: uploading model-00001-of-" in line and "failed 6 times (huggingface_hub's retries)" in line
    assert ("HTTP 503" if fault == 503 else "Server disconnected without sending a response") in line
    assert seconds < 60
    assert sum(1 for _, method, path, _ in hub.state.log if method == "PUT") == 6
    hub.state.faults.clear()
    resumed = _run(_merge(hub, inputs, out), hub, tmp_path / "home")
    assert resumed.returncode == 0, resumed.stderr
    assert hub.state.commits_made == 1
    pushed = _files(_download(hub, tmp_path))
    assert {n: d for n, d in pushed.items() if n.endswith(".safetensors")} == {
        p.name: p.read_bytes() for p in reference.glob("*.safetensors")
    }


def test_the_files_sent_with_the_commit_are_retried_once_by_one_layer(
    hub: HubServer, inputs: tuple[Base, Path, Path], tmp_path: Path
) -> None:
    """The shards are up; the other files' pre-upload keeps failing: huggingface_hub's 6 tries,
    not 6 for each of shardmerge's retries of the commit."""
    failing = Fault("POST", "/preupload/", 503, times=1_000, body_contains=b"config.json")
    hub.state.faults.append(failing)
    out = tmp_path / "out"
    done = _run(_merge(hub, inputs, out), hub, tmp_path / "home")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "uploading the other files failed 6 times (huggingface_hub's retries), last with HTTP 503" in line
    assert 1_000 - failing.times == 6
    hub.state.faults.clear()
    assert _run(_merge(hub, inputs, out), hub, tmp_path / "home").returncode == 0
    assert hub.state.commits_made == 1
