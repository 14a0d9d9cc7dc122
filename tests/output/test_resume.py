"""Resume after kills, full disks and corruption; refusals when the job changed; verify."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardmerge
from conftest import Base, llama_config, save_adapter, save_base
from shardmerge.formats.fileio import file_hashes
from shardmerge.formats.safetensors import read_header
from shardmerge.output import journal as journals

SHARDMERGE = str(Path(sys.executable).with_name("shardmerge"))

Job = namedtuple("Job", "base adapter clean seconds")


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file a merge produces, but its journal."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """A model in about 30 shards, large enough that a merge takes a while to kill."""
    root = tmp_path_factory.mktemp("resume")
    config = llama_config(layers=6, hidden=256)
    config.vocab_size = 2048
    base = save_base(config, root / "base", torch.bfloat16, seed=31, shard_kb=512)
    adapter = save_adapter(base, root / "adapter", seed=32, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    clean = root / "clean"
    report = shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(clean))
    assert report.shards >= 20
    return Job(base, adapter, clean, report.seconds)


def command(job: Job, output: Path) -> list[str]:
    return [SHARDMERGE, "merge", str(job.base.path), str(job.adapter), "-o", str(output), "--quiet"]


def wait_for(path: Path, process: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, "the merge ended before it started writing"
        assert time.monotonic() < deadline, "the merge did not start"
        time.sleep(0.002)


def interrupted_state(output: Path) -> tuple[set[str], set[str], list[Path]]:
    journal = journals.load(output)
    recorded = set(journal.shards) if journal else set()
    finals = {p.name for p in output.glob("*.safetensors")}
    return recorded, finals, list(output.glob("*.tmp"))


def kill_and_resume(job: Job, output: Path, rng: random.Random) -> None:
    process = subprocess.Popen(command(job, output), stderr=subprocess.DEVNULL)
    wait_for(output / ".shardmerge" / "journal.json", process)
    time.sleep(rng.uniform(0, job.seconds * 1.2))
    process.send_signal(signal.SIGKILL)
    process.wait()
    recorded, finals, temps = interrupted_state(output)
    assert recorded <= finals, "the journal records only shards that are in place"
    # At most one shard's work is lost: the one being written, or one renamed but not recorded.
    assert len(finals - recorded) + len(temps) <= 1

    report = shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output))

    assert report.shards_skipped == len(recorded)
    assert not list(output.glob("*.tmp"))
    assert outputs(output) == outputs(job.clean)


def test_sigkill_at_random_moments_then_resume_is_byte_identical(job: Job, tmp_path: Path) -> None:
    rng = random.Random(7)
    for trial in range(3):
        kill_and_resume(job, tmp_path / f"out-{trial}", rng)


@pytest.mark.slow
def test_sigkill_twenty_times(job: Job, tmp_path: Path) -> None:
    rng = random.Random(11)
    for trial in range(20):
        kill_and_resume(job, tmp_path / f"out-{trial}", rng)


def test_sigterm_discards_the_tensor_in_hand_and_says_how_to_resume(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    process = subprocess.Popen(command(job, output), stderr=subprocess.PIPE, text=True)
    wait_for(output / ".shardmerge" / "journal.json", process)
    time.sleep(job.seconds / 3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    if process.returncode in (0, -signal.SIGTERM):
        # Finished before the signal came: after main() returned, SIGTERM has its default
        # action again (the handler is installed before the journal the test waited for).
        pytest.skip("the merge finished before the signal arrived")
    assert process.returncode == 130
    assert "interrupted" in err and "run the same command again to resume" in err
    recorded, finals, temps = interrupted_state(output)
    assert recorded == finals and not temps, "the shard in hand was discarded, the journal is consistent"
    report = shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output))
    assert report.shards_skipped == len(recorded)
    assert outputs(output) == outputs(job.clean)


def test_full_disk_mid_run_then_resume(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    sizes = sorted(p.stat().st_size for p in job.clean.glob("*.safetensors"))
    limit = (sizes[0] + sizes[-1]) // 2

    def small_disk() -> None:
        # A file may not grow past `limit`: writes fail with EFBIG, as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(command(job, output), capture_output=True, text=True, preexec_fn=small_disk, check=False)

    assert result.returncode == 1
    err = result.stderr.strip()
    assert "\n" not in err
    assert "out of space (File too large)" in err and "run the same command again" in err
    assert not list(output.glob("*.tmp")), "the partial shard was removed"
    failed = Path(err.removeprefix("shardmerge: error: ").split(":")[0])
    assert failed.parent == output and failed.suffix == ".safetensors"
    assert not failed.exists()
    recorded, finals, _ = interrupted_state(output)
    assert recorded == finals

    report = shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output))
    assert report.shards_skipped == len(recorded)
    assert outputs(output) == outputs(job.clean)


def test_not_enough_free_space_fails_before_writing(job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = sum(p.stat().st_size for p in job.clean.glob("*.safetensors"))
    real = shutil.disk_usage

    def small(path: object) -> object:
        usage = real(path)
        return type(usage)(usage.total, usage.total - total // 2, total // 2)

    monkeypatch.setattr(shutil, "disk_usage", small)
    with pytest.raises(shardmerge.OutputError, match=r"not enough free space: the merge writes 0\.\d\d GiB"):
        shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.safetensors*"))


def _with_side_file(job: Job, folder: Path, size: int) -> Path:
    """A copy of the base with a side file of ``size`` random bytes, larger than any shard."""
    shutil.copytree(job.base.path, folder)
    (folder / "vectors.dat").write_bytes(os.urandom(size))
    return folder


def test_side_files_count_in_the_free_space_check(job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _with_side_file(job, tmp_path / "base", 24 * 2**20)
    shards = sum(p.stat().st_size for p in job.clean.glob("*.safetensors"))
    real = shutil.disk_usage

    def room_for_the_shards(path: object) -> object:
        usage = real(path)
        return type(usage)(usage.total, usage.total - shards - 2**20, shards + 2**20)

    monkeypatch.setattr(shutil, "disk_usage", room_for_the_shards)
    with pytest.raises(shardmerge.OutputError, match=r"not enough free space: the merge writes 0\.0\d GiB"):
        shardmerge.merge(base=str(base), adapters=[str(job.adapter)], output=str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.safetensors*"))
    shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(tmp_path / "fits"))


def test_a_side_file_that_does_not_fit_is_named_and_leaves_no_temp_file(job: Job, tmp_path: Path) -> None:
    largest = max(p.stat().st_size for p in job.clean.glob("*.safetensors"))
    base = _with_side_file(job, tmp_path / "base", 2 * largest)
    output = tmp_path / "out"

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 4096, largest + 4096))

    command = [SHARDMERGE, "merge", str(base), str(job.adapter), "-o", str(output), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=small_disk, check=False)
    assert result.returncode == 1
    err = result.stderr.strip()
    assert "\n" not in err
    assert err.startswith(f"shardmerge: error: {output / 'vectors.dat'}: out of space (File too large)"), err
    assert re.search(r"with up to \d+\.\d MiB still to write", err) and "run the same command again" in err
    assert not list(output.glob("*.tmp")), "the partial side file was removed"
    assert not (output / "vectors.dat").exists() and not (output / "model.safetensors.index.json").exists()
    done = shardmerge.merge(base=str(base), adapters=[str(job.adapter)], output=str(output))
    assert done.shards_skipped == done.shards
    assert (output / "vectors.dat").read_bytes() == (base / "vectors.dat").read_bytes()


def test_truncated_shard_is_redone_and_verify_catches_it(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    assert shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output)).shards_skipped
    victim = sorted(output.glob("*.safetensors"))[5]
    victim.write_bytes(victim.read_bytes()[:-100])

    with pytest.raises(shardmerge.VerifyError) as caught:
        _verify(output)
    (problem,) = caught.value.problems
    assert f"{victim}: " in problem.one_line() and "file is truncated" in problem.one_line()

    report = shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output))
    assert report.shards_skipped == report.shards - 1
    assert report.bytes_written == victim.stat().st_size
    assert outputs(output) == outputs(job.clean)
    _verify(output)


def test_changed_bytes_are_found_by_verify_resume_and_verify(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    victim = sorted(output.glob("*.safetensors"))[3]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF  # same size, same header: only a re-hash sees it
    victim.write_bytes(bytes(data))

    with pytest.raises(shardmerge.VerifyError, match="1 problem"):
        _verify(output)
    quick = shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output))
    assert quick.shards_skipped == quick.shards
    from shardmerge.planning.planner import build_plan
    from shardmerge.run.executor import execute

    plan = build_plan(shardmerge.MergeJob(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output)))
    thorough = execute(plan, quiet=True, verify_resume=True)
    assert thorough.shards_skipped == thorough.shards - 1
    assert outputs(output) == outputs(job.clean)


def test_changed_adapter_or_dtype_is_refused_and_restart_starts_over(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    retrained = tmp_path / "retrained"  # new values, same shapes: the same header
    shutil.copytree(job.adapter, retrained)
    tensors = load_file(retrained / "adapter_model.safetensors")
    save_file(
        {k: v * 1.5 for k, v in tensors.items()}, retrained / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    reconfigured = tmp_path / "reconfigured"
    shutil.copytree(job.adapter, reconfigured)
    config = json.loads((reconfigured / "adapter_config.json").read_text())
    config["lora_alpha"] = 4
    (reconfigured / "adapter_config.json").write_text(json.dumps(config))

    args = {"base": str(job.base.path), "output": str(output)}
    with pytest.raises(shardmerge.OutputError) as caught:
        shardmerge.merge(adapters=[str(retrained)], **args)
    assert caught.value.message.endswith("other inputs: adapter 0 changed: weights")
    assert caught.value.hint and "--restart" in caught.value.hint
    with pytest.raises(shardmerge.OutputError) as caught:
        shardmerge.merge(adapters=[str(reconfigured)], **args)
    assert caught.value.message.endswith("other inputs: adapter 0 changed: config")
    with pytest.raises(shardmerge.OutputError, match="dtype changed from base to float32"):
        shardmerge.merge(adapters=[str(job.adapter)], dtype="float32", **args)
    with pytest.raises(shardmerge.OutputError, match=r"adapter 0 changed: weight 1\.0 -> 0\.5"):
        shardmerge.merge(adapters=[{"path": str(job.adapter), "weight": 0.5}], **args)

    code = subprocess.run([*command(job, output), "--dtype", "float32", "--restart"], check=False).returncode
    assert code == 0
    fresh = tmp_path / "fresh"
    shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(fresh), dtype="float32")
    assert outputs(output) == outputs(fresh)


def _verify(folder: Path, recompute: int = 0) -> object:
    from shardmerge.verify import verify

    return verify(folder, recompute=recompute)


def test_verify_recomputes_sampled_tensors(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    report = _verify(output, recompute=4)
    assert report.recomputed == 4 and report.merged_checked > 0  # type: ignore[attr-defined]

    # Wrong values with a consistent journal, as a buggy merge would leave them.
    journal = journals.load(output)
    assert journal is not None
    name, record = next((name, r) for name, r in sorted(journal.shards.items()) if r.merged)
    path = output / name
    header = read_header(path)
    info = header.tensors[record.merged[0]]
    data = bytearray(path.read_bytes())
    data[info.begin : info.begin + 2] = bytes([data[info.begin] ^ 1, data[info.begin + 1]])
    path.write_bytes(bytes(data))
    xxh3, _ = file_hashes(path, xxh3=True, sha256=False)
    journal.shards[name] = journals.ShardRecord(record.size, xxh3, record.header_sha256, record.merged)
    journal.save()

    _verify(output)  # the journal agrees, so only recomputing can tell
    with pytest.raises(shardmerge.VerifyError) as caught:
        _verify(output, recompute=len(record.merged) * 40)
    assert any(f"{record.merged[0]}: differs from a fresh merge" in p.one_line() for p in caught.value.problems)


def test_verify_finds_nan_in_merged_tensors(models: object, tmp_path: Path) -> None:
    """The merge itself refuses NaN (tests/test_trust.py); here it appears in the file later."""
    base: Base = models("llama-bf16")  # type: ignore[operator]
    adapter = save_adapter(base, tmp_path / "adapter", seed=33, r=4, target_modules=["q_proj"])
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "out"))
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = (
        tmp_path
        / "out"
        / json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"][name]
    )
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(shardmerge.VerifyError) as caught:
        _verify(tmp_path / "out")
    lines = [problem.one_line() for problem in caught.value.problems]
    assert any(f"{name}: merged tensor holds NaN or Inf" in line for line in lines), lines


def test_verify_cli_exit_codes(job: Job, tmp_path: Path) -> None:
    ok = subprocess.run([SHARDMERGE, "verify", str(job.clean)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "verified" in ok.stdout
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    (output / sorted(p.name for p in output.glob("*.safetensors"))[0]).unlink()
    bad = subprocess.run([SHARDMERGE, "verify", str(output)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "verification failed: 1 problem found" in bad.stderr and "shard is missing" in bad.stderr
    assert os.path.exists(job.clean)


# --- one run per output folder ------------------------------------------------------------


def start_and_pause(args: list[str], marker: Path) -> subprocess.Popen[bytes]:
    """A merge stopped (SIGSTOP) once ``marker`` exists, holding its lock until SIGCONT."""
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    wait_for(marker, process)
    process.send_signal(signal.SIGSTOP)
    return process


@pytest.mark.parametrize("second", ["merge", "push", "restart"])
def test_a_second_run_on_a_folder_in_use_fails_fast(job: Job, tmp_path: Path, second: str) -> None:
    from shardmerge.verify import verify

    output = tmp_path / "out"
    marker = output / ".shardmerge" / "journal.json"
    if second == "restart":  # --restart empties the folder, and must keep the lock it holds
        shardmerge.merge(base=str(job.base.path), adapters=[str(job.adapter)], output=str(output), dtype="float16")
        marker = output / "model-00001-of-{:05d}.safetensors.tmp".format(len(list(job.clean.glob("*.safetensors"))))
    first = start_and_pause([*command(job, output), *(["--restart"] if second == "restart" else [])], marker)
    other = command(job, output) if second != "push" else [SHARDMERGE, "push", str(output), "org/model"]
    # Nothing may reach a Hub: the lock is taken before any request.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_unused"}
    started = time.monotonic()
    refused = subprocess.run(other, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - started
    verifying = subprocess.run([SHARDMERGE, "verify", str(output)], capture_output=True, text=True)
    first.send_signal(signal.SIGCONT)

    assert refused.returncode == 1
    assert refused.stderr.startswith(f"shardmerge: error: {output}: another shardmerge run (pid {first.pid} on ")
    assert len(refused.stderr.strip().splitlines()) == 1 and seconds < 15
    assert verifying.returncode == 1 and f"(pid {first.pid} on" in verifying.stderr
    assert first.wait() == 0
    assert outputs(output) == outputs(job.clean)
    assert verify(output).running is None


def test_a_killed_run_leaves_no_lock_behind(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = start_and_pause(command(job, output), output / ".shardmerge" / "journal.json")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (output / ".shardmerge" / "lock").exists()

    resumed = subprocess.run(command(job, output), capture_output=True, text=True)

    assert resumed.returncode == 0, resumed.stderr
    assert outputs(output) == outputs(job.clean)


def _as_format_1(output: Path) -> None:
    """Rewrite the journal in ``output`` as shardmerge 0.1 wrote it: no version, and every
    shard recorded by its sha256 (computed by hashlib here), no xxh3."""
    path = output / ".shardmerge" / "journal.json"
    body = json.loads(path.read_text())
    del body["version"]
    for name, record in body["shards"].items():
        del record["xxh3_128"]
        record["sha256"] = hashlib.sha256((output / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(body, indent=2))


def test_a_format_1_journal_resumes_and_its_sha256_is_checked(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    _as_format_1(output)
    _verify(output)
    victim = sorted(output.glob("*.safetensors"))[3]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(shardmerge.VerifyError) as caught:
        _verify(output)
    assert [p.one_line() for p in caught.value.problems] == [
        f"{victim}: sha256 differ from the journal's (the file changed after the merge: run the merge again "
        "to redo this shard)"
    ]

    resumed = subprocess.run([*command(job, output), "--verify-resume"], capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert outputs(output) == outputs(job.clean)
    journal = journals.load(output)
    assert journal is not None
    assert journal.shards[victim.name].xxh3_128 is not None and journal.shards[victim.name].sha256 is None
    kept = [r for name, r in journal.shards.items() if name != victim.name]
    assert all(r.xxh3_128 is None and r.sha256 is not None for r in kept), "earlier records are kept as they were"
    assert json.loads((output / ".shardmerge" / "journal.json").read_text())["version"] == journals.VERSION
    _verify(output)


@pytest.mark.parametrize("device", ["tpu", "cuda:01", "cuda;rm", 0])
def test_a_journal_naming_no_device_is_unreadable(device: object, job: Job, tmp_path: Path) -> None:
    """verify's tolerance and the resume check go by each shard's device: a journal naming
    anything but cpu, cuda or cuda:N is not shardmerge's."""
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    path = output / ".shardmerge" / "journal.json"
    body = json.loads(path.read_text())
    next(iter(body["shards"].values()))["device"] = device
    path.write_text(json.dumps(body))
    with pytest.raises(shardmerge.OutputError, match=r"unreadable journal \(device .* is not cpu, cuda or cuda:N\)"):
        journals.load(output)


def test_a_journal_of_a_newer_format_is_refused_in_one_line(job: Job, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(job.clean, output)
    path = output / ".shardmerge" / "journal.json"
    body = json.loads(path.read_text())
    body["version"] = journals.VERSION + 1
    body["shards"] = {name: {"future": True} for name in body["shards"]}
    path.write_text(json.dumps(body))

    for run in (command(job, output), [SHARDMERGE, "verify", str(output)]):
        refused = subprocess.run(run, capture_output=True, text=True, check=False)
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines() == [
            f"shardmerge: error: {path}: the journal is format {journals.VERSION + 1}, newer than this "
            f"shardmerge reads ({journals.VERSION}) (use the shardmerge release that wrote it, or a newer one; "
            "or --restart to merge again)"
        ]
    restarted = subprocess.run([*command(job, output), "--restart"], capture_output=True, text=True, check=False)
    assert restarted.returncode == 0, restarted.stderr
    assert outputs(output) == outputs(job.clean)
