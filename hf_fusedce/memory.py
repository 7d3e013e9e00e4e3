"""Measuring memory honestly: CUDA allocator statistics on GPU, a peak-live-tensor tracker elsewhere.

`measure_peak(device)` is a context manager yielding a `PeakReading`; after the block, `.peak_bytes` is the
highest amount of memory allocated inside the block above what was allocated when it started.
On CPU the tracker is a TorchDispatchMode that adds up the storages of tensors created inside the block
while they are alive: deterministic (independent of the allocator and of RSS noise), it counts exactly what
torch allocated for tensors, including autograd's saved tensors and the backward pass. It also remembers the
largest single allocation (`largest_numel`, `largest_shape`), so a test can prove a tensor was never built.

Also here: the process-level readings a training log uses (Linux /proc: peak RSS and its reset, current RSS,
available RAM), and `stock_head_peak_bytes`, the exact tensor bytes of transformers' materialized loss head.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
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
        self.largest_numel = 0
        self.largest_shape: tuple[int, ...] = ()
        self._seen: dict[int, int] = {}  # storage key -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Outputs sharing storage with an input (views, out=, in-place) allocate nothing new.
        inputs = {t.untyped_storage().data_ptr() for t in _storage_tensors((args, kwargs))}
        for t in _storage_tensors(out):
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
        if t.numel() > self.largest_numel:
            self.largest_numel, self.largest_shape = t.numel(), tuple(t.shape)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int):
        self.live_bytes -= self._seen.pop(key, 0)


def _storage_tensors(tree) -> list[torch.Tensor]:
    """The tensors in `tree` that own storage: a wrapper subclass (DTensor under tensor parallelism) has none of
    its own and contributes its inner (local) tensors instead."""
    found = []
    for t in tree_flatten(tree)[0]:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            found += _storage_tensors([getattr(t, n) for n in names])
        else:
            found.append(t)
    return found


@contextlib.contextmanager
def measure_peak(device: torch.device | str | None = None, compiled: bool = False):
    """`compiled`: the block runs torch.compile'd code. Under a TorchDispatchMode dynamo runs the code eagerly, so
    the tracker would measure the eager code, not the compiled one: on CPU the reading is then the peak RSS above
    the start (Linux VmHWM, reset first; method "rss_peak"). Coarser than the tracker: allocator noise is included,
    and memory malloc reuses from its heap without new pages (blocks under glibc's mmap threshold, at most 32 MiB)
    is not seen, so it suits the N x V tensors of a loss head, not small ones."""
    device = torch.device(device if device is not None else "cpu")
    if compiled and device.type != "cuda" and reset_rss_peak():
        reading = PeakReading(str(device), "rss_peak")
        start = rss_bytes()
        try:
            yield reading
        finally:
            reading.peak_bytes = max(0, (rss_peak_bytes() or start) - start)
        return
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


def stock_head_peak_bytes(tokens: int, vocab: int, hidden: int, compute_bytes: int = 4, autocast: bool = False,
                          weight_requires_grad: bool = True) -> int:
    """Peak bytes of tensors the stock loss head allocates, forward + backward, as transformers runs it:
    `logits = lm_head(h)` in the compute dtype (`compute_bytes` per element), `ForCausalLMLoss` upcasts them
    to float32, `F.cross_entropy` sums, the sum is divided by the token count. `autocast`: float32 weights
    run in a narrower dtype, which adds the casts of h and W and casts the gradients back.
    Exact for the live-tensor tracker (tests/trainer check it against measurements); the CUDA allocator adds
    its block rounding and the cuBLAS workspace on top.

    The largest of the phases: forward (casts, logits, their float32 copy, log-softmax output), backward
    through the softmax (saved log-softmax, its incoming gradient, the logits gradient: 12 bytes per logit),
    then through the linear layer (dh, dW, and under autocast their float32 casts)."""
    n, v, d, c = int(tokens), int(vocab), int(hidden), int(compute_bytes)
    nv, nd, vd = n * v, n * d, v * d
    wg = weight_requires_grad
    saved = (c * vd + (c * nd if wg else 0)) if autocast else 0  # the casts linear keeps for backward
    upcast = 4 * nv if c < 4 else 0  # the float32 copy of the logits (none when they are float32 already)
    phases = [(c * vd + c * nd if autocast else 0) + c * nv + upcast + 4 * nv,  # forward
              saved + 12 * nv,  # backward through log-softmax
              saved + c * nv + (4 * nv if c < 4 else 0),  # the logits gradient cast back to the compute dtype
              saved + c * nv + c * nd + (c * vd if wg else 0)]  # linear backward
    if autocast:  # gradients cast back to float32: dh first, then dW
        phases.append(c * nd + (c * vd if wg else 0) + 4 * nd)
        if wg:
            phases.append(4 * nd + c * vd + 4 * vd)
    return max(phases) + 8  # + the summed loss and the mean, float32 scalars


def _proc_kib_field(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    return _proc_kib_field("/proc/meminfo", "MemAvailable")


def reset_rss_peak() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_peak_bytes() is not None
    except OSError:
        return False


def rss_peak_bytes() -> int | None:
    """VmHWM from /proc/self/status (Linux), else None."""
    return _proc_kib_field("/proc/self/status", "VmHWM")


def rss_bytes() -> int:
    """Current RSS (Linux /proc/self/statm); elsewhere psutil when installed, else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:
            return 0
