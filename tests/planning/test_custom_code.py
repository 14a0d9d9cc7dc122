"""A base with custom modelling code (``auto_map``): its Python files are read, never run, and
decide which modules are nn.Linear; what they do not settle is refused as before."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft import LoraConfig

import shardmerge
from conftest import Base, assert_matches_saved, peft_reference, save_adapter, saved_reference
from shardmerge.planning.custom_code import read_custom_code

MODELLING = Path(__file__).parent / "custom" / "modeling_tiny.py"
AUTO_MAP = {"AutoConfig": "modeling_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("modeling_tiny", MODELLING)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny() -> ModuleType:
    return _module()


def _base(tiny: ModuleType, folder: Path) -> Base:
    torch.manual_seed(0)
    tiny.TinyForCausalLM(tiny.TinyConfig()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
    shutil.copy(MODELLING, folder)
    return Base(folder, torch.float32)


def test_custom_code_decides_its_square_linear_weights(tiny: ModuleType, tmp_path: Path) -> None:
    base = _base(tiny, tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["wqkv", "wo", "w1", "w2"])
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, config=lora, model_class=tiny.TinyForCausalLM)
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)], dtype="float32")
    assert any("modeling_tiny.py" in note for note in plan.notes), plan.notes
    shardmerge.merge(base=str(base.path), adapters=[str(adapter)], output=str(tmp_path / "out"), dtype="float32")
    reference = peft_reference(base, [(adapter, 1.0)], model_class=tiny.TinyForCausalLM)
    assert_matches_saved(tmp_path / "out", saved_reference(reference, tmp_path / "reference"), torch.float32)
    ours = tiny.TinyForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12) % 90
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_module_the_files_do_not_settle_is_refused(tiny: ModuleType, tmp_path: Path) -> None:
    base = _base(tiny, tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["wo", "gate"])
    adapter = save_adapter(base, tmp_path / "adapter", seed=1, config=lora, model_class=tiny.TinyForCausalLM)
    with pytest.raises(shardmerge.PlanError) as refused:
        shardmerge.plan(base=str(base.path), adapters=[str(adapter)])
    problems = [str(problem) for problem in refused.value.problems]
    assert len(problems) == 2 and all("square weight 'blocks." in problem for problem in problems)
    assert all(".gate.weight' [32, 32]" in problem and "modeling_tiny.py" in problem for problem in problems)
    plan = shardmerge.plan(base=str(base.path), adapters=[str(adapter)], conv1d_modules=[])
    assert {t.name for t in plan.shards[0].tensors if t.ops} >= {"blocks.0.gate.weight", "blocks.1.wo.weight"}


HEADER = "from torch import nn\nfrom transformers.pytorch_utils import Conv1D\n"


@pytest.mark.parametrize(
    ("source", "modules"),
    [
        ("self.c_attn = Conv1D(96, 32)\nself.q = nn.Linear(3, 3)", {"c_attn": True, "q": False}),
        ("self.c_attn = Conv1D(9, 3) if x else nn.Linear(3, 9)", {"c_attn": None}),
        ("self.proj = nn.Linear(3, 3)\nself.proj = Conv1D(3, 3)", {"proj": None}),
        ("from mylib import Linear\nself.proj = Linear(3, 3)", {"proj": None}),
        ("self.proj = torch.nn.Linear(3, 3)\nself.norm = torch.ones(3)", {"proj": False, "norm": None}),
        (
            "class Flipped(nn.Linear):\n    def forward(self, x):\n        return x @ self.weight\n"
            "class Plain(nn.Linear):\n    pass\n"
            "self.a = Flipped(3, 3)\nself.b = Plain(3, 3)",
            {"a": None, "b": False},
        ),
        (
            "from transformers.pytorch_utils import Conv1D as Linear\nclass P(Linear):\n    pass\n"
            "self.a = P(3, 3)\nself.b = Linear(3, 3)",
            {"a": None, "b": True},
        ),
        ("import torch.nn as nn\nself.a = nn.Linear(3, 3)", {"a": False}),
        ("from . import layers as nn\nself.a = nn.Linear(3, 3)", {"a": None}),
    ],
    ids=[
        "conv1d",
        "conditional",
        "both",
        "foreign-linear",
        "torch-nn",
        "subclasses",
        "aliased-base",
        "import-as",
        "local-nn",
    ],
)
def test_the_files_decide_only_what_they_build_one_way(source: str, modules: dict, tmp_path: Path) -> None:
    (tmp_path / "modeling_x.py").write_text(HEADER + source)
    code = read_custom_code(tmp_path, {"auto_map": {"AutoModel": "modeling_x.Model"}})
    assert {name: code.modules.get(name) for name in modules} == modules
    assert code.files == ("modeling_x.py",)


@pytest.mark.parametrize(
    ("auto_map", "files", "why"),
    [
        ({"AutoModel": "org/repo--modeling_x.Model"}, {}, "modelling code of another repo"),
        (
            {"AutoConfig": "configuration_x.Config", "AutoModel": "org/repo--modeling_x.Model"},
            {"configuration_x.py": "from torch import nn\nself.wo = nn.Linear(3, 3)"},
            "modelling code of another repo",
        ),
        ({}, {}, "names no modelling file in the base folder"),
        ({"AutoModel": "modeling_x.Model"}, {}, "modeling_x.py is not a readable Python file"),
        ({"AutoModel": "modeling_x.Model"}, {"modeling_x.py": "def broken(:"}, "modeling_x.py is not a readable"),
        ({"AutoModel": "../outside.Model"}, {}, "../outside.py is not a readable Python file"),
    ],
)
def test_unreadable_code_decides_nothing(auto_map: dict, files: dict, why: str, tmp_path: Path) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code = read_custom_code(tmp_path, {"auto_map": auto_map})
    assert code.modules == {} and why in code.unread


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("self.add_module('proj', Conv1D(3, 3))\nself.proj2 = nn.Linear(3, 3)", "add_module (module names computed"),
        ("setattr(self, 'proj', Conv1D(3, 3))", "setattr (module names computed"),
        ("self.blocks = nn.ModuleDict({'proj': Conv1D(3, 3)})", "ModuleDict (module names computed"),
        ("from mylib import Block\nself.block = Block()\nself.proj = nn.Linear(3, 3)", "mylib.Block, whose code"),
        (
            "from transformers.models.gpt2.modeling_gpt2 import GPT2Block\nself.h = GPT2Block(c)\n"
            "self.c_proj = nn.Linear(3, 3)",
            "GPT2Block (transformers' GPT-2 family",
        ),
        ("import transformers\nself.h = transformers.GPT2Block(c)", "transformers.GPT2Block (transformers' GPT-2"),
    ],
    ids=["add-module", "setattr", "module-dict", "foreign-class", "gpt2-block", "gpt2-top-level"],
)
def test_files_that_build_modules_out_of_sight_decide_nothing(source: str, why: str, tmp_path: Path) -> None:
    (tmp_path / "modeling_x.py").write_text(HEADER + source)
    code = read_custom_code(tmp_path, {"auto_map": {"AutoModel": "modeling_x.Model"}})
    assert code.modules == {} and why in code.unread, code.unread


def test_the_files_a_modelling_file_imports_are_read_and_bounded(tmp_path: Path) -> None:
    (tmp_path / "modeling_x.py").write_bytes(b"\xef\xbb\xbf" + (HEADER + "from .layers import Wide\n").encode())
    (tmp_path / "layers.py").write_text(HEADER + "self.wide = Conv1D(3, 3)")
    code = read_custom_code(tmp_path, {"auto_map": {"AutoModel": "modeling_x.Model"}})
    assert code.modules == {"wide": True} and code.files == ("layers.py", "modeling_x.py")
    for number in range(17):
        (tmp_path / f"part{number}.py").write_text(f"from .part{number + 1} import x\n")
    (tmp_path / "modeling_x.py").write_text(HEADER + "from .part0 import x\n")
    code = read_custom_code(tmp_path, {"auto_map": {"AutoModel": "modeling_x.Model"}})
    assert code.modules == {} and "more than 16 files" in code.unread
    (tmp_path / "modeling_x.py").write_text("#" * (4 << 20) + "\n")
    code = read_custom_code(tmp_path, {"auto_map": {"AutoModel": "modeling_x.Model"}})
    assert code.modules == {} and "not a readable Python file" in code.unread


def test_a_link_out_of_the_base_folder_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "secret.py").write_text(HEADER + "self.wo = nn.Linear(3, 3)")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "modeling_x.py").symlink_to(tmp_path / "secret.py")
    code = read_custom_code(tmp_path / "base", {"auto_map": {"AutoModel": "modeling_x.Model"}})
    assert code.modules == {} and "not a readable Python file" in code.unread
