"""Reusable host and device buffers."""

from __future__ import annotations

import torch

from ..formats.safetensors import numel


class Buffer:
    """A reusable buffer, grown to the largest request and never shrunk. Fresh tensors per
    weight would cost more than the merge: the allocator returns large blocks to the kernel,
    and faulting them in again runs at a fraction of memory speed."""

    def __init__(self, device: torch.device, pinned: bool = False) -> None:
        self.device = device
        self.pinned = pinned
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.buffer.numel():
            self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=self.pinned)
        return self.buffer[:nbytes]

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.take(numel(shape) * dtype.itemsize).view(dtype).reshape(shape)
