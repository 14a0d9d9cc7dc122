"""An emulated CUDA runtime: the GPU path's choreography run on the CPU, for CI.

``SHARDMERGE_EMULATE_CUDA=devices=2,memory=512MiB,busy=1`` (every key optional; ``1``
alone means one device) makes ``--device auto``, ``cuda`` and ``cuda:N`` merge on emulated
devices: the very code of ``device.Staged`` runs, with the CPU doing the arithmetic. What a
real device would do asynchronously is done late, so that a missing wait shows as wrong
bytes: a copy to the device on a stream other than the current one happens only once
something waits for it; a copy to the host is taken at once (later kernels may overwrite
its source) but lands in host memory only when its event is waited for. It also keeps the
figures a test checks, from the device's opening on: the devices each thread touched,
device memory (bounded by ``memory``, past which allocations raise torch's
OutOfMemoryError), the host memory locked, and the waits;
``busy`` lists devices that refuse a context, as a GPU in exclusive mode held by another
process does.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DeviceError

VARIABLE = "SHARDMERGE_EMULATE_CUDA"
_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


@dataclass
class _Stream:
    index: int
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    issued: int = 0  # copies handed to this stream so far
    done: int = 0  # copies carried out so far


class EmulatedRuntime:
    """Emulated CUDA devices (see the module's docstring)."""

    def __init__(self, devices: int, memory: int | None, busy: frozenset[int]) -> None:
        self.devices = devices
        self.limit = memory
        self.busy = busy
        self.lock = threading.Lock()
        self.local = threading.local()
        self.touched: set[int] = set()  # devices a context was made on
        self.registered: set[int] = set()  # host memory locked now, by address
        self.allocated: dict[int, int] = {}  # live bytes by tensor address
        self.peak_bytes = 0
        self.event_waits = 0
        self.device_waits = 0  # waits for everything on a device

    def count(self) -> int:
        return self.devices

    def torch_device(self, index: int) -> torch.device:
        return torch.device("cpu")

    def current(self) -> int:
        return getattr(self.local, "device", 0)

    def select(self, index: int) -> None:
        self.local.device = index

    def selected(self, index: int) -> Any:
        return _bound(self.local, "device", index)

    def open(self, index: int) -> None:
        if index in self.busy:
            raise torch.AcceleratorError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
        # The figures start again, as a new process's would.
        self.touched, self.event_waits, self.device_waits = {index}, 0, 0
        self.allocated.clear()
        self.peak_bytes = 0

    def allocate(self, nbytes: int, index: int) -> torch.Tensor:
        self.touched.add(index)
        with self.lock:
            live = sum(self.allocated.values())
            if self.limit is not None and live + nbytes > self.limit:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes / (1 << 20):.2f} MiB. GPU {index} has a total "
                    f"capacity of {self.limit / (1 << 20):.2f} MiB of which {(self.limit - live) / (1 << 20):.2f} "
                    "MiB is free."
                )
            tensor = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                self.allocated[tensor.data_ptr()] = nbytes
                self.peak_bytes = max(self.peak_bytes, live + nbytes)
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        with self.lock:
            self.allocated.pop(tensor.data_ptr(), None)

    def register(self, memory: torch.Tensor) -> None:
        self.touched.add(self.current())  # the driver locks memory in the current context
        self.registered.add(memory.data_ptr())

    def unregister(self, memory: torch.Tensor) -> None:
        self.touched.add(self.current())
        self.registered.remove(memory.data_ptr())

    def stream(self, index: int) -> _Stream:
        return _Stream(index)

    def use(self, stream: _Stream) -> Any:
        return _bound(self.local, "stream", stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: _Stream, upload: bool) -> None:
        self.touched.add(self.current())
        if upload and stream is getattr(self.local, "stream", None):
            dst.copy_(src)  # the current stream's later kernels see it: as if in order
            return
        with self.lock:
            stream.pending.append((dst, src if upload else src.clone()))
            stream.issued += 1

    def record(self, stream: _Stream) -> tuple[_Stream, int]:
        return (stream, stream.issued)

    def wait(self, stream: _Stream, event: tuple[_Stream, int]) -> None:
        self.touched.add(self.current())
        self.event_waits += 1
        self._until(*event)

    def synchronize(self, event: tuple[_Stream, int]) -> None:
        self.touched.add(self.current())  # a wait binds the thread's current device's context
        self.event_waits += 1
        self._until(*event)

    def finish(self, index: int) -> None:
        self.device_waits += 1

    def memory(self, index: int) -> tuple[int, int]:
        live = sum(self.allocated.values())
        total = self.limit if self.limit is not None else 1 << 40
        return total - live, total

    def peak(self, index: int) -> int:
        return self.peak_bytes

    def _until(self, stream: _Stream, number: int) -> None:
        """Carry out ``stream``'s copies up to the ``number``-th."""
        with self.lock:
            while stream.done < number:
                dst, src = stream.pending.pop(0)
                dst.copy_(src)
                stream.done += 1


@contextmanager
def _bound(local: threading.local, name: str, value: object) -> Iterator[None]:
    """``local.name`` is ``value`` for the block, then as it was (or unset)."""
    before = getattr(local, name, _UNSET)
    setattr(local, name, value)
    try:
        yield
    finally:
        if before is _UNSET:
            delattr(local, name)
        else:
            setattr(local, name, before)


_UNSET = object()
_RUNTIME: tuple[str, EmulatedRuntime] | None = None


def emulated_runtime() -> EmulatedRuntime | None:
    """The emulated runtime ``SHARDMERGE_EMULATE_CUDA`` asks for (one per setting and
    process), or None."""
    global _RUNTIME
    spec = os.environ.get(VARIABLE, "").strip()
    if not spec:
        return None
    if _RUNTIME is None or _RUNTIME[0] != spec:
        _RUNTIME = (spec, EmulatedRuntime(**_parse(spec)))
    return _RUNTIME[1]


def _parse(spec: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"devices": 1, "memory": None, "busy": frozenset()}
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        if not value and key.isdigit():
            key, value = "devices", key
        amount = re.fullmatch(r"(\d+)(KiB|MiB|GiB|)", value)
        if key == "busy" and re.fullmatch(r"\d+(:\d+)*", value):
            settings["busy"] = frozenset(int(number) for number in value.split(":"))
        elif key in ("devices", "memory") and amount:
            settings[key] = int(amount[1]) * _UNITS[amount[2]]
        else:
            raise DeviceError(
                f"{VARIABLE}={spec!r}: cannot read {part.strip()!r}",
                hint="write e.g. devices=2,memory=512MiB,busy=0 (busy: device numbers joined by ':')",
            )
    return settings
