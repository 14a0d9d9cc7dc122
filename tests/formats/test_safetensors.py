"""Byte-level safetensors handling, checked against the safetensors library itself."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardmerge.formats.fileio import copy_range
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


def test_copy_range_kernel_path_and_fallback_agree(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(os.urandom(300_000))
    results = []
    # copy_file_range refuses a destination opened with O_APPEND, which forces the fallback.
    for name, flags in (("kernel", 0), ("fallback", os.O_APPEND)):
        target = tmp_path / name
        src = os.open(source, os.O_RDONLY)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            os.write(dst, b"head")
            copy_range(src, dst, 1000, 250_000)
        finally:
            os.close(src)
            os.close(dst)
        results.append(target.read_bytes())
    assert results[0] == results[1] == b"head" + source.read_bytes()[1000:251_000]
