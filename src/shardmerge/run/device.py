"""Where a merge computes, and how its bytes get there and back.

``Host``: the CPU. A block is read into a host buffer and merged where it lies.

``Staged``: a CUDA device, reached as a GPU must be reached, through a ``Runtime``: torch's
CUDA (``CudaRuntime``) or, so that CI runs this very choreography on the CPU, an emulated
device (``emulated.py``). What it does:

- Every allocation and every call happens on device N (``cuda:N``): the device is made
  current in each thread that touches it, so that nothing creates a context on device 0.
- Host buffers that take part in copies are locked (pinned) exactly: page-aligned memory
  this module maps itself and registers with the driver, not torch's pinned allocator,
  which rounds each request up to a power of two. Only buffers of at most
  PINNED_BUFFER_BYTES are locked; a larger one (a whole embedding that DoRA needs at once)
  stays pageable, and the driver copies it through its own small staging buffer. Locked
  memory is so bounded whatever the tensors' sizes.
- Blocks are read ahead by a thread into two locked buffers and uploaded on a copy stream,
  while the compute stream merges the block before and downloads the one before that; a
  block's download carries an event that the sink's gatherer waits for, and the host never
  waits for the whole device. The blocks and the order of the arithmetic are those of the
  CPU path: the bytes do not depend on the overlap.
- Float32 products run in full float32 (``exact_float32``): TF32 on for the rest of a
  process (one ``torch.set_float32_matmul_precision("high")`` in a notebook) is off while
  a merge runs, and on again after it.
- Out of memory and a device that cannot be used are one line naming the device, the memory
  needed and the way out.
"""

from __future__ import annotations

import mmap
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any, Protocol

import torch

from ..errors import DeviceError
from ..formats.units import human_size as size
from ..tuning import PINNED_BUFFER_BYTES
from .buffers import HOST, Buffer, Memory

Fill = Callable[[torch.Tensor], None]  # fills a flat uint8 tensor with a block's bytes
_WAY_OUT = "use another device with --device cuda:N, or merge on the CPU with --device cpu"


@contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions in full float32 precision until the block ends, then
    the caller's settings again (read and written through torch's per-backend settings, so
    that a setting made through either of torch's two interfaces is kept; before torch 2.9,
    which has no per-backend settings, through the older interface)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        with _exact_float32_before_2_9():
            yield
        return
    backends = [
        getattr(backend, kind)
        for backend, kind in (
            (torch.backends.cuda, "matmul"),
            (torch.backends.mkldnn, "matmul"),
            (torch.backends.cudnn, "conv"),
            (torch.backends.mkldnn, "conv"),
        )
        if hasattr(backend, kind)
    ]
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(backends, saved, strict=True):
            backend.fp32_precision = precision


@contextmanager
def _exact_float32_before_2_9() -> Iterator[None]:
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


class Runtime(Protocol):
    """The CUDA calls a merge makes. Streams and events are the runtime's own objects."""

    def count(self) -> int: ...
    def torch_device(self, index: int) -> torch.device: ...
    def select(self, index: int) -> None: ...
    def selected(self, index: int) -> Any: ...
    def open(self, index: int) -> None: ...
    def allocate(self, nbytes: int, index: int) -> torch.Tensor: ...
    def free(self, tensor: torch.Tensor) -> None: ...
    def register(self, memory: torch.Tensor) -> None: ...
    def unregister(self, memory: torch.Tensor) -> None: ...
    def stream(self, index: int) -> Any: ...
    def use(self, stream: Any) -> Any: ...
    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, upload: bool) -> None: ...
    def record(self, stream: Any) -> Any: ...
    def wait(self, stream: Any, event: Any) -> None: ...
    def synchronize(self, event: Any) -> None: ...
    def finish(self, index: int) -> None: ...
    def memory(self, index: int) -> tuple[int, int]: ...
    def peak(self, index: int) -> int: ...


class CudaRuntime:
    """torch's CUDA."""

    def count(self) -> int:
        return torch.cuda.device_count()

    def torch_device(self, index: int) -> torch.device:
        return torch.device("cuda", index)

    def select(self, index: int) -> None:
        """Make ``index`` this thread's device (a thread of the merge's own)."""
        torch.cuda.set_device(index)

    def selected(self, index: int) -> Any:
        """``index`` this thread's device for a block; torch's context manager puts the
        caller's back without making a context on it."""
        return torch.cuda.device(index)

    def open(self, index: int) -> None:
        torch.cuda.set_device(index)
        torch.zeros(1, device=self.torch_device(index))  # the context, created now
        torch.cuda.reset_peak_memory_stats(index)

    def allocate(self, nbytes: int, index: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device(index))

    def free(self, tensor: torch.Tensor) -> None:
        del tensor  # torch's caching allocator reuses it once no tensor holds it

    def register(self, memory: torch.Tensor) -> None:
        code = torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), memory.numel(), 0)
        if int(code) != 0:
            raise DeviceError(f"could not lock {size(memory.numel())} of host memory (CUDA error {int(code)})")

    def unregister(self, memory: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(memory.data_ptr())

    def stream(self, index: int) -> Any:
        return torch.cuda.Stream(device=index)

    def use(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, upload: bool) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event(blocking=True)  # a thread that waits for it sleeps
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def finish(self, index: int) -> None:
        torch.cuda.synchronize(index)

    def memory(self, index: int) -> tuple[int, int]:
        return torch.cuda.mem_get_info(index)

    def peak(self, index: int) -> int:
        return torch.cuda.max_memory_allocated(index)


class Device:
    """The host: blocks are merged where they are read."""

    name = "cpu"
    staged = False

    def __init__(self) -> None:
        self.torch = torch.device("cpu")
        self.memory: Memory = HOST  # where values are computed
        self.pinned: Memory = HOST  # host buffers that take part in copies

    def __str__(self) -> str:
        return self.name

    @contextmanager
    def activate(self) -> Iterator[None]:
        """This thread merges on the device until the block ends."""
        with exact_float32():
            yield

    def reads(self, buffer: Buffer) -> Reads:
        """Blocks read for one merger, into ``buffer`` (host memory)."""
        return Reads(buffer)

    def upload(self, host: torch.Tensor, into: Buffer) -> torch.Tensor:
        """``host``'s bytes on the device (in ``into``), the host's free to reuse on return."""
        return host

    def download(self, host: torch.Tensor, value: torch.Tensor, buffer: Buffer) -> None:
        """``host`` (in ``buffer``) gets ``value``; ``buffer.ready`` says when it has."""
        host.copy_(value)

    def out_of_memory(self, exc: BaseException, tensor: str | None = None, nbytes: int | None = None) -> DeviceError:
        """One line for ``exc``, an out-of-memory error met merging ``tensor``."""
        return DeviceError(f"out of memory on the CPU ({exc})", tensor=tensor, hint="free memory or use a GPU")

    def failed(self, exc: BaseException, tensor: str) -> DeviceError:
        """One line for ``exc``, a device's failure met merging ``tensor``."""
        return DeviceError(f"{self.name} failed: {_first_line(exc)}", tensor=tensor, hint=_WAY_OUT)

    def locked_peak(self) -> int:
        return 0

    def device_peak(self) -> int:
        return 0


class Reads:
    """Blocks of a tensor read one after another into one host buffer."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer

    def reserve(self, sizes: list[int]) -> None:
        """Room for blocks of each of ``sizes`` bytes."""
        self.buffer.reserve(sizes)

    def blocks(self, reads: list[tuple[int, Fill]]) -> Iterator[torch.Tensor]:
        """Each block's bytes (on the device), in order, for ``reads``: (bytes, fill)."""
        for nbytes, fill in reads:
            raw = self.buffer.take(nbytes)
            fill(raw)
            yield raw


class Staged(Device):
    """A CUDA device (or an emulated one) reached through locked host buffers, a copy
    stream, a compute stream and events."""

    staged = True

    def __init__(self, runtime: Runtime, index: int) -> None:
        self.runtime = runtime
        self.index = index
        self.name = f"cuda:{index}"
        self.torch = runtime.torch_device(index)
        self.memory = _DeviceMemory(self)
        self.pinned = _LockedMemory(self)
        try:
            with runtime.selected(index):
                runtime.open(index)
        except RuntimeError as exc:  # busy (exclusive mode), lost, or full
            raise DeviceError(f"{self.name} cannot be used: {_first_line(exc)}", hint=_WAY_OUT) from None
        self.compute = runtime.stream(index)
        self.copies = runtime.stream(index)

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Until the block ends: device N current in this thread, its compute stream current,
        full float32. At the end, everything queued finished and the locked memory given back
        to the driver (a sticky CUDA error met then does not hide the one that ended the merge)."""
        assert isinstance(self.pinned, _LockedMemory)
        with self.runtime.selected(self.index), exact_float32(), self.runtime.use(self.compute):
            try:
                yield
            except BaseException:
                with suppress(RuntimeError):
                    self.runtime.finish(self.index)
                raise
            else:
                self.runtime.finish(self.index)
            finally:
                self.pinned.close()

    def reads(self, buffer: Buffer) -> Reads:
        return _ReadAhead(self)

    def upload(self, host: torch.Tensor, into: Buffer) -> torch.Tensor:
        on_device = into.take(host.numel() * host.element_size()).view(host.dtype).view(host.shape)
        self.runtime.copy(on_device, host, self.compute, upload=True)
        self.runtime.synchronize(self.runtime.record(self.compute))
        return on_device

    def download(self, host: torch.Tensor, value: torch.Tensor, buffer: Buffer) -> None:
        self.runtime.copy(host, value, self.compute, upload=False)
        buffer.ready = partial(self._arrived, self.runtime.record(self.compute))

    def _arrived(self, event: Any) -> None:
        """Wait for ``event`` from whichever thread (the sink's gatherer): with device N
        current there, so that the wait makes no context on device 0."""
        self.runtime.select(self.index)
        self.runtime.synchronize(event)

    def out_of_memory(self, exc: BaseException, tensor: str | None = None, nbytes: int | None = None) -> DeviceError:
        free, total = self.runtime.memory(self.index)
        needed = f"{size(nbytes)} more needed" if nbytes else _tried(str(exc))
        return DeviceError(
            f"out of memory on {self.name}: {needed}, {size(free)} free of {size(total)}", tensor=tensor, hint=_WAY_OUT
        )

    def locked_peak(self) -> int:
        assert isinstance(self.pinned, _LockedMemory)
        return self.pinned.peak

    def device_peak(self) -> int:
        return self.runtime.peak(self.index)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tried(message: str) -> str:
    """What torch's out-of-memory message says the allocation needed."""
    words = message.split()
    if "allocate" in words:
        at = words.index("allocate")
        return f"{' '.join(words[at + 1 : at + 3]).rstrip('.')} more needed"
    return "more memory needed"


class _DeviceMemory:
    largest = sys.maxsize

    def __init__(self, device: Staged) -> None:
        self.device = device

    def empty(self, nbytes: int) -> torch.Tensor:
        try:
            return self.device.runtime.allocate(nbytes, self.device.index)
        except torch.cuda.OutOfMemoryError as exc:
            raise self.device.out_of_memory(exc, nbytes=nbytes) from None

    def free(self, tensor: torch.Tensor) -> None:
        self.device.runtime.free(tensor)


class _LockedMemory:
    """Host memory locked for copies, exactly (page-aligned mappings registered with the
    driver), up to PINNED_BUFFER_BYTES a buffer (a buffer's larger requests spill to
    pageable memory)."""

    def __init__(self, device: Staged) -> None:
        self.device = device
        self.mappings: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}
        self.locked = 0
        self.peak = 0
        self.lock = threading.Lock()

    @property
    def largest(self) -> int:
        return PINNED_BUFFER_BYTES

    def empty(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return HOST.empty(0)
        length = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        mapping = mmap.mmap(-1, length)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        with self.lock:
            self.device.runtime.register(whole)
            self.mappings[whole.data_ptr()] = (mapping, whole)
            self.locked += length
            self.peak = max(self.peak, self.locked)
        return whole[:nbytes]

    def free(self, tensor: torch.Tensor) -> None:
        with self.lock:
            entry = self.mappings.pop(tensor.data_ptr(), None)
            if entry is not None:
                self.device.runtime.unregister(entry[1])
                self.locked -= len(entry[0])

    def close(self) -> None:
        """Unlock every buffer (before its memory is unmapped, whenever that is)."""
        with self.lock:
            for _, whole in self.mappings.values():
                self.device.runtime.unregister(whole)
            self.mappings.clear()
            self.locked = 0


class _ReadAhead(Reads):
    """Blocks read by a thread one ahead, into two locked host buffers, and uploaded on the
    copy stream into two device buffers; one of each where a block is too large to lock."""

    def __init__(self, device: Staged) -> None:
        self.device = device
        self.hosts = [Buffer(device.pinned) for _ in range(2)]
        self.inbox = [Buffer(device.memory) for _ in range(2)]

    def reserve(self, sizes: list[int]) -> None:
        for index in range(2):
            ahead = [size for size in sizes if index < _depth(size)]
            self.hosts[index].reserve(ahead)
            self.inbox[index].reserve(ahead)

    def blocks(self, reads: list[tuple[int, Fill]]) -> Iterator[torch.Tensor]:
        runtime, compute = self.device.runtime, self.device.compute
        depth = _depth(max((nbytes for nbytes, _ in reads), default=0))
        ahead: queue.Queue[tuple[torch.Tensor, Any] | BaseException] = queue.Queue()
        freed: queue.Queue[Any] = queue.Queue()  # the compute stream is done with a block
        stop = threading.Event()
        # The device buffers may still be read by the last tensor's kernels: the first
        # uploads wait for them.
        begun = runtime.record(compute)
        thread = threading.Thread(
            target=self._read, args=(reads, depth, begun, ahead, freed, stop), name="shardmerge-reader", daemon=True
        )
        thread.start()
        try:
            for _ in reads:
                item = ahead.get()
                if isinstance(item, BaseException):
                    raise item
                block, uploaded = item
                runtime.wait(compute, uploaded)
                yield block
                freed.put(runtime.record(compute))
        finally:
            stop.set()
            freed.put(None)
            thread.join()

    def _read(
        self,
        reads: list[tuple[int, Fill]],
        depth: int,
        begun: Any,
        ahead: queue.Queue[tuple[torch.Tensor, Any] | BaseException],
        freed: queue.Queue[Any],
        stop: threading.Event,
    ) -> None:
        runtime, copies = self.device.runtime, self.device.copies
        uploads: list[Any] = []
        try:
            runtime.select(self.device.index)  # this thread's current device: N, never 0
            runtime.wait(copies, begun)
            for number, (nbytes, fill) in enumerate(reads):
                slot = number % depth
                if number >= depth:
                    runtime.synchronize(uploads[number - depth])  # its host buffer is read
                    consumed = freed.get()  # its device buffer is merged
                    if consumed is None or stop.is_set():
                        return
                    runtime.wait(copies, consumed)
                host = self.hosts[slot].take(nbytes)
                fill(host)
                block = self.inbox[slot].take(nbytes)
                runtime.copy(block, host, copies, upload=True)
                uploads.append(runtime.record(copies))
                ahead.put((block, uploads[-1]))
        except BaseException as exc:  # handed to the merging thread
            ahead.put(exc)


def _depth(nbytes: int) -> int:
    """Blocks in flight: two where a block fits a locked buffer, else one."""
    return 2 if nbytes <= PINNED_BUFFER_BYTES else 1


def resolve_device(name: str) -> Device:
    """The device ``name`` (auto, cpu, cuda, cuda:N) names, ready to merge on; a
    DeviceError in one line where it cannot be used."""
    from .emulated import emulated_runtime

    runtime: Runtime | None = emulated_runtime()
    if runtime is None and torch.cuda.is_available():
        runtime = CudaRuntime()
    if name == "cpu" or (name == "auto" and runtime is None):
        return Device()
    if runtime is None:
        raise DeviceError(f"device {name!r} requested but CUDA is not available", hint="use --device cpu or auto")
    index = int(name.partition(":")[2] or 0)
    if index >= runtime.count():
        raise DeviceError(
            f"device {name!r} requested but only {runtime.count()} CUDA device(s) exist",
            hint="use --device cuda:0 or auto",
        )
    return Staged(runtime, index)
