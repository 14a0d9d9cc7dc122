"""Byte-level safetensors handling, checked against the safetensors library itself."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardmerge.formats.safetensors import encode_header, read_header


def test_header_matches_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    raw = path.read_bytes()
    for name, tensor in tensors.items():
        info = header.tensors[name]
        assert info.shape == tuple(tensor.shape)
        assert raw[info.begin : info.end] == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_encoded_header_is_readable_by_safetensors(tmp_path: Path) -> None:
    values = torch.randn(4, 3)
    header = encode_header([("w", "F32", (4, 3), 0, 48)], {"format": "pt"})
    assert len(header) % 8 == 0
    path = tmp_path / "ours.safetensors"
    path.write_bytes(header + values.numpy().tobytes())
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert torch.equal(handle.get_tensor("w"), values)
