"""Measuring memory honestly: CUDA allocator statistics on GPU, a peak-live-tensor tracker elsewhere.

`measure_peak(device)` is a context manager yielding a `PeakReading`; after the block, `.peak_bytes` is the
highest amount of memory allocated inside the block above what was allocated when it started.
On CPU the tracker is a TorchDispatchMode that adds up the storages of tensors created inside the block
while they are alive: deterministic (independent of the allocator and of RSS noise), it counts exactly what
torch allocated for tensors, including autograd's saved tensors and the backward pass.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class PeakReading:
    device: str
    method: str
    peak_bytes: int = 0

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class LiveTensorTracker(TorchDispatchMode):
    """Counts bytes of tensor storages created while active, as long as they live; records the peak."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: dict[int, int] = {}  # storage key -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Outputs sharing storage with an input (views, out=, in-place) allocate nothing new.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                if t.untyped_storage().data_ptr() not in inputs:
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self._seen[key] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int):
        self.live_bytes -= self._seen.pop(key, 0)


@contextlib.contextmanager
def measure_peak(device: torch.device | str | None = None):
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        reading = PeakReading(str(device), "cuda_allocator")
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield reading
        finally:
            torch.cuda.synchronize(device)
            reading.peak_bytes = max(0, torch.cuda.max_memory_allocated(device) - base)
        return
    reading = PeakReading(str(device), "live_tensor_tracker")
    tracker = LiveTensorTracker()
    try:
        with tracker:
            yield reading
    finally:
        reading.peak_bytes = tracker.peak_bytes
