"""Malformed inputs that would merge wrong or crash: numbers that are not finite or of the
wrong type, safetensors headers the format forbids, and JSON nested beyond reason. Each is
refused in one line naming the file, with a non-zero exit and nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
from peft import PeftModel

from conftest import Base, load_fp32, save_adapter
from shardmerge.cli import main

INDEX = "model.safetensors.index.json"
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def base(models: Callable[[str], Base], tmp_path: Path) -> Path:
    return Path(shutil.copytree(models("llama-bf16").path, tmp_path / "base"))


@pytest.fixture
def adapter(models: Callable[[str], Base], tmp_path: Path) -> Path:
    base = models("llama-bf16")
    return save_adapter(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def refused(args: list[object], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; it must fail with one error (and the problems under it), no traceback."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert code != 0, captured.out
    assert "Traceback" not in captured.err
    assert "NaN" not in captured.out
    return captured.err


def edit_config(adapter: Path, text: Callable[[str], str]) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(text(path.read_text()))


def set_key(key: str, value: str) -> Callable[[str], str]:
    """Set ``key`` to ``value`` written as raw JSON text (which may be what JSON forbids)."""

    def change(text: str) -> str:
        config = json.loads(text)
        config[key] = "@@"
        return json.dumps(config).replace('"@@"', value)

    return change


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lora_alpha", "NaN", "unreadable adapter config (NaN is not a number JSON allows)"),
        ("lora_alpha", "Infinity", "unreadable adapter config (Infinity is not a number JSON allows)"),
        ("lora_alpha", '"8"', "lora_alpha must be a finite positive number, found '8'"),
        ("lora_alpha", "1e999", "unreadable adapter config (1e999 is out of the range of a number)"),
        ("r", "true", "r must be a positive integer, found True"),
        ("r", "4.5", "r must be a positive integer, found 4.5"),
        ("rank_pattern", '{"q_proj": 2.5}', "rank_pattern['q_proj'] must be a positive integer, found 2.5"),
        ("rank_pattern", '{"(": 4}', "rank_pattern key '(' is not a regular expression (missing ), unterminated"),
        ("alpha_pattern", '{"q_proj": "16"}', "alpha_pattern['q_proj'] must be a finite positive number, found '16'"),
        ("alpha_pattern", '{"q_proj": NaN}', "unreadable adapter config (NaN is not a number JSON allows)"),
        ("alpha_pattern", '{"q_proj": -1e-3}', "alpha_pattern['q_proj'] must be a finite positive number"),
        ("target_modules", '"q_proj["', "target_modules 'q_proj[' is not a regular expression"),
        ("target_modules", "[1, 2]", "target_modules must be a list of names, found [1, 2]"),
        ("trainable_token_indices", '[1, "2"]', "trainable_token_indices must be lists of token indices"),
    ],
)
def test_numbers_and_patterns_of_the_adapter_config_are_validated(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, expected: str
) -> None:
    edit_config(adapter, set_key(key, value))
    for command in (["plan", "--json"], ["merge", "-o", tmp_path / "out"]):
        err = refused([command[0], base, adapter, *command[1:]], capsys)
        assert f"{adapter / 'adapter_config.json'}: {expected}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_a_weight_that_is_not_a_finite_number_is_refused(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], weight: str
) -> None:
    err = refused(["merge", base, adapter, "-o", tmp_path / "out", f"--weights={weight}"], capsys)
    assert "adapters.0.weight: Input should be a finite number" in err
    job = tmp_path / "job.yaml"
    job.write_text(f"base: {base}\nadapters: [{{path: {adapter}, weight: .{weight.lstrip('-')}}}]\noutput: out\n")
    assert "adapters.0.weight: Input should be a finite number" in refused(["run", job], capsys)
    job.write_text(f"base: {base}\nadapters: [{{path: {adapter}, weight: true}}]\noutput: out\n")
    assert "adapters.0.weight: Value error, must be a number, not true or false" in refused(["run", job], capsys)
    job.write_text(f"base: {base}\nadapters: [{{path: {adapter}, weight: 1e-1}}]\noutput: {tmp_path / 'tenth'}\n")
    assert main(["run", str(job), "--quiet"]) == 0  # YAML reads 1e-1 as text
    assert not (tmp_path / "out").exists()


def test_plan_json_is_strict_json(base: Path, adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(base), str(adapter), "--json", "--weights", "0.5"]) == 0

    def forbidden(name: str) -> None:
        raise AssertionError(f"plan --json printed {name}")

    plan = json.loads(capsys.readouterr().out, parse_constant=forbidden)
    assert plan["adapters"][0]["weight"] == 0.5
    # A NaN in the base's config would be printed with the output config (its dtype changes).
    config = base / "config.json"
    config.write_text(config.read_text().replace("{", '{"logit_scale": NaN, ', 1))
    err = refused(["plan", base, adapter, "--json", "--dtype", "float32"], capsys)
    assert f"{config}: unreadable config (NaN is not a number JSON allows)" in err


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path: Path, header: dict, body: bytes, raw: str | None = None) -> None:
    text = (raw if raw is not None else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _two_tensors(header: dict) -> tuple[str, str]:
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    return names[0], names[1]


def overlap(header: dict, body: bytes) -> tuple[dict, bytes]:
    """The second tensor reads the first one's bytes (same size): the file shrinks by it."""
    first, second = _two_tensors(header)
    begin, end = header[second]["data_offsets"]
    size = end - begin
    header[second]["shape"] = header[first]["shape"]
    header[second]["dtype"] = header[first]["dtype"]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [offset - size for offset in entry["data_offsets"]]
    return header, body[:begin] + body[end:]


def hole(header: dict, body: bytes) -> tuple[dict, bytes]:
    """A tensor's bytes unclaimed: the first tensor dropped from the header."""
    first, _ = _two_tensors(header)
    del header[first]
    return header, body


def trailing(header: dict, body: bytes) -> tuple[dict, bytes]:
    return header, body + b"\0" * 64


def boolean_shape(header: dict, body: bytes) -> tuple[dict, bytes]:
    first, _ = _two_tensors(header)
    header[first]["shape"] = [True, *header[first]["shape"][1:]] if header[first]["shape"][0] == 1 else [True, 1]
    return header, body


def metadata_not_strings(header: dict, body: bytes) -> tuple[dict, bytes]:
    header["__metadata__"] = {"format": "pt", "step": 1000}
    return header, body


def name_twice(header: dict, body: bytes) -> tuple[dict, bytes]:
    return header, body


HEADERS = {
    "overlap": (overlap, "overlaps the tensor before it"),
    "hole": (hole, "leaves a gap before it"),
    "trailing": (trailing, "64 bytes after the last tensor's data, which no tensor holds"),
    "boolean-shape": (boolean_shape, "invalid shape [true"),
    "metadata": (metadata_not_strings, "__metadata__ is not a map of strings to strings"),
    "name-twice": (name_twice, "appears twice in one object"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
@pytest.mark.parametrize("where", ["base", "adapter"])
def test_headers_the_format_forbids_are_refused_as_safetensors_refuses_them(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, where: str
) -> None:
    path = sorted(base.glob("model-*.safetensors"))[0] if where == "base" else adapter / "adapter_model.safetensors"
    header, body = _header(path)
    change, expected = HEADERS[case]
    header, body = change(header, body)
    raw = None
    if case == "name-twice":
        first, _ = _two_tensors(header)
        entry = json.dumps(header[first])
        raw = json.dumps(header).replace("{", f'{{"{first}": {entry}, ', 1)
    _write(path, header, body, raw)
    if case != "name-twice":  # the format's own loader: last wins for a name given twice
        with pytest.raises(safetensors.SafetensorError):
            safetensors.safe_open(str(path), "pt")
    err = refused(["merge", base, adapter, "-o", tmp_path / "out"], capsys)
    assert f"{path}" in err and expected.replace("true", "True") in err.replace("true", "True")
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_utf8_is_refused_when_planning(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python's parser reads UTF-16 JSON; the config's rewrite would then fail after every shard."""
    config = base / "config.json"
    config.write_text(config.read_text(), encoding="utf-16")
    err = refused(["merge", base, adapter, "-o", tmp_path / "out"], capsys)
    assert f"{config}: unreadable config ('utf-8' codec can't decode" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file", ["config.json", INDEX, "adapter_config.json", "header", "journal"])
def test_json_nested_beyond_reason_is_one_line(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str
) -> None:
    out = tmp_path / "out"
    args = ["merge", base, adapter, "-o", out, "--quiet"]
    if file == "journal":
        assert main([str(arg) for arg in args]) == 0
        path = out / ".shardmerge" / "journal.json"
        path.write_text(DEEP)
        capsys.readouterr()
    elif file == "header":
        path = sorted(base.glob("model-*.safetensors"))[0]
        _, body = _header(path)
        _write(path, {}, body, DEEP)
    else:
        path = (adapter if file == "adapter_config.json" else base) / file
        path.write_text(DEEP)
    err = refused(args, capsys)
    assert f"{path}: " in err and "nested deeper than 64 levels" in err
    if file == "journal":
        assert "--restart" in err
        assert main([str(arg) for arg in [*args, "--restart"]]) == 0


def test_an_adapter_whose_target_modules_match_nothing_is_refused_as_peft_refuses_it(
    models: Callable[[str], Base], base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_config(adapter, lambda text: json.dumps({**json.loads(text), "target_modules": "^$"}))
    with pytest.raises(ValueError, match=r"Target modules \^\$ not found in the base model"):
        PeftModel.from_pretrained(load_fp32(models("llama-bf16").path), adapter)
    err = refused(["merge", base, adapter, "-o", tmp_path / "out"], capsys)
    assert f"{adapter / 'adapter_config.json'}: target_modules '^$' does not target 4 of the modules" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_missing_the_weights_of_a_module_it_targets_is_refused(
    models: Callable[[str], Base], base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PEFT loads such an adapter with a warning and leaves those modules as initialised
    (untrained, or random with init_lora_weights: false): the file is incomplete."""
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "v_proj" not in k}, weights, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="Found missing adapter keys"):
        PeftModel.from_pretrained(load_fp32(models("llama-bf16").path), adapter)
    err = refused(["merge", base, adapter, "-o", tmp_path / "out"], capsys)
    assert "target_modules names 'v_proj', which 2 modules of the base answer to" in err
    assert "the weights hold no tensor for any of them" in err
    assert not (tmp_path / "out").exists()
