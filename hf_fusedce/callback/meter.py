"""Measuring training between two logs: wall time, input tokens, the memory peak of the interval (CUDA allocator;
on CPU the process's peak RSS), optionally each step's live-tensor peak; and the running totals the summary
reports. Reads only: nothing here changes what the model computes."""
from __future__ import annotations

import time

import torch

from .. import memory
from .config import MiB
from .ranks import all_reduce

MAX_INTERVALS_KEPT = 2000


class IntervalMeter:
    """One per training run (`start` begins it again)."""

    def __init__(self, device=None):
        self.device = torch.device("cpu") if device is None else device
        self.mem_key = "fusedce/rss_mib"
        self.t0 = None
        self.tokens = 0  # python int or device tensor, summed lazily (one sync per log)
        self.carry_peak = 0  # interval peak read before the probe reset the counters
        self.step_tracker = None
        self.step_tensor_peak = 0
        self.intervals: list[dict] = []
        self.n_intervals = 0
        self.maxima: dict[str, float] = {}
        self.total_tokens = 0.0
        self.seconds = 0.0

    def start_interval(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.mem_key = "fusedce/peak_alloc_mib"
        else:
            self.mem_key = "fusedce/rss_peak_mib" if memory.reset_rss_peak() else "fusedce/rss_mib"
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.carry_peak = 0
        self.step_tensor_peak = 0

    def memory_now(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.mem_key == "fusedce/rss_peak_mib":
            return int(memory.rss_peak_bytes() or 0)
        return memory.rss_bytes()

    def count_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None):
        if mask is not None and mask.shape == ids.shape:
            self.tokens = self.tokens + mask.detach().sum()  # stays on device until the next log
        else:
            self.tokens = self.tokens + ids.numel()

    def start_step_tracker(self):
        if self.device.type != "cuda" and self.step_tracker is None:
            self.step_tracker = memory.LiveTensorTracker()
            self.step_tracker.__enter__()

    def stop_step_tracker(self):
        if self.step_tracker is not None:
            self.step_tracker.__exit__(None, None, None)
            self.step_tensor_peak = max(self.step_tensor_peak, self.step_tracker.peak_bytes)
            self.step_tracker = None

    def around(self, measurement):
        """Run `measurement()` (which resets the memory counters) inside the interval without losing the
        interval's peak so far, its time or its tokens. Returns what it returns."""
        carry = self.memory_now()
        out = measurement()
        t0, tokens, step_peak = self.t0, self.tokens, self.step_tensor_peak
        self.start_interval()
        self.t0, self.tokens, self.step_tensor_peak = t0, tokens, step_peak
        self.carry_peak = carry
        return out

    def close_interval(self, step: int, loss, track_step_tensors: bool, head_metrics: dict) -> dict:
        """The interval's `fusedce/*` metrics (reduced over ranks), recorded; a new interval starts."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tokens = self.tokens
        tokens = tokens.double() if isinstance(tokens, torch.Tensor) else torch.tensor(float(tokens))
        mem = max(self.memory_now(), self.carry_peak)
        tok_sum, mem, step_peak = all_reduce([tokens.to(self.device)], [mem, self.step_tensor_peak], self.device)
        out = {"fusedce/tokens_per_sec": tok_sum / elapsed, self.mem_key: mem / MiB}
        if track_step_tensors and self.device.type != "cuda":
            out["fusedce/step_peak_tensor_mib"] = step_peak / MiB
        out.update(head_metrics)
        record = {"step": step, "loss": loss, "seconds": elapsed, "tokens": tok_sum,
                  **{k: v for k, v in out.items() if not k.startswith("fusedce/head_")}}
        self.intervals.append(record)
        del self.intervals[:-MAX_INTERVALS_KEPT]
        self.n_intervals += 1
        for k, v in record.items():
            if k.startswith("fusedce/") and k != "fusedce/tokens_per_sec":
                self.maxima[k] = max(self.maxima.get(k, v), v)
        self.total_tokens += tok_sum
        self.seconds += elapsed
        self.start_interval()
        return out

    def training_totals(self) -> dict:
        return {
            "tokens": self.total_tokens,
            "logged_seconds": self.seconds,
            "tokens_per_sec": self.total_tokens / self.seconds if self.seconds else None,
            self.mem_key.split("/")[1] + "_max": self.maxima.get(self.mem_key),
            "step_peak_tensor_mib_max": self.maxima.get("fusedce/step_peak_tensor_mib"),
        }
