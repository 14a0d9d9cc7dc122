"""The base's other files: copied byte for byte, and config.json edited in the keys the merge
must change only (no key moved, no line reformatted)."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest
import torch

import shardmerge
from conftest import Base, llama_config, save_adapter, save_base
from shardmerge.formats.jsonedit import rewrite

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0", "added_tokens": [{"content": "<|\\u00e9t\\u00e9|>"}], "model": {}}\n',
    "tokenizer_config.json": json.dumps(
        {"chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}", "model_max_length": 64}, indent=1
    ),
    "special_tokens_map.json": '{"bos_token": "<s>"}',
    "chat_template.jinja": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "preprocessor_config.json": '{\n\t"do_resize": true\n}',
    "modeling_custom.py": "# custom modelling code, shipped beside the weights\nVALUE = 1\n",
    "merges.txt": "#version: 0.2\nh e\n",
}


def _odd_config(base: Base) -> str:
    """The base's config.json as a hand-edited one might look: 4-space indents, keys in their
    own order, an escaped character, a float spelt its own way."""
    config = json.loads((base.path / "config.json").read_text())
    config["name_or_path"] = "caf\u00e9-model"
    text = json.dumps(dict(reversed(list(config.items()))), indent=4)
    text = text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1.0E-6')
    (base.path / "config.json").write_text(text)
    return text


@pytest.fixture
def base(tmp_path: Path) -> Base:
    base = save_base(llama_config(), tmp_path / "base", torch.bfloat16, seed=7)
    for name, text in SIDE_FILES.items():
        (base.path / name).write_text(text, encoding="utf-8")
    (base.path / "tokenizer.model").write_bytes(os.urandom(512))
    return base


def test_side_files_are_copied_byte_for_byte_and_config_changes_only_in_its_dtype(base: Base, tmp_path: Path) -> None:
    original = _odd_config(base)
    adapter = save_adapter(base, tmp_path / "adapter", seed=3, r=4, target_modules=["q_proj"])
    output = tmp_path / "out"
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(output), dtype="float32")
    side = [path for path in base.path.iterdir() if path.is_file() and not path.name.startswith("model")]
    assert len(side) >= len(SIDE_FILES) + 2  # with generation_config.json and config.json
    for path in side:
        if path.name not in ("config.json", "README.md"):
            assert (output / path.name).read_bytes() == path.read_bytes(), path.name
    written = (output / "config.json").read_text()
    changed = [
        line
        for line in difflib.unified_diff(original.splitlines(), written.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed == ['-    "dtype": "bfloat16",', '+    "dtype": "float32",'], changed
    assert json.loads(written) == json.loads(original) | {"dtype": "float32"}


CASES = [
    # (document, change to make, the lines the edit may touch)
    ('{\n  "a": 1,\n  "b": "x",\n  "c": [1,2]\n}\n', lambda d: d.update(b="y"), ['"b"']),
    ('{\n  "a": 1,\n  "b": "x"\n}', lambda d: d.pop("a"), ['"a"']),
    ('{"a": 1, "b": {"c": true, "d": 2.50}}', lambda d: d["b"].update(c=False), None),
    (
        '{\n\t"q": {"k": [1, {"x": "}"}]},\n\t"t": {\n\t\t"tie": true\n\t}\n}',
        lambda d: d["t"].update(tie=False),
        ['"tie"'],
    ),
    ('{\n  "a": 1,\n  "q": {\n    "m": "fp8"\n  },\n  "z": null\n}', lambda d: d.pop("q"), ['"q"', '"m"', "}"]),
    ('{\n  "a": 1\n}', lambda d: d.update(tie_word_embeddings=False), ['"a"', '"tie_word_embeddings"']),
    ('{"\\u00e9": "\\"quoted\\"", "n": 1E+2}', lambda d: d.update(n=3), None),
    ('{\n  "l": [true, 2],\n  "f": 1.0\n}', lambda d: d.update(l=[1, 2], f=1), ['"l"', '"f"']),
]


@pytest.mark.parametrize(("document", "change", "touched"), CASES)
def test_json_edits_change_only_what_they_must(document: str, change, touched: list[str] | None) -> None:
    wanted = json.loads(document)
    change(wanted)
    edited = rewrite(document, wanted)
    assert json.dumps(json.loads(edited), sort_keys=True) == json.dumps(wanted, sort_keys=True)  # true is not 1
    if touched is None:  # one line: what is not changed keeps its spelling
        for kept in ('"\\u00e9"', "2.50", '"\\"quoted\\""'):
            assert (kept in edited) == (kept in document)
        return
    for line in difflib.unified_diff(document.splitlines(), edited.splitlines(), lineterm="", n=0):
        if line[:1] in "+-" and not line.startswith(("+++", "---")):
            assert any(key in line for key in touched), line
