"""`--profile`: a torch.profiler trace of one implementation at one shape, to study without a GPU.

Writes profile-<impl>-<shape>-N<n>-<dtype>.json.gz (chrome trace: open in https://ui.perfetto.dev or
chrome://tracing) and a .txt table of the ops sorted by device time (CPU time on CPU).
"""
from __future__ import annotations

import gzip
import os
import shutil

import torch

from .runner import log, make_inputs
from .shapes import DtypeMode, Shape


def profile_impl(impl, fn, shape: Shape, n: int, mode: DtypeMode, device, out_dir: str, steps: int = 3,
                 warmup: int = 2, seed: int = 0) -> list[str]:
    from torch.profiler import ProfilerActivity, profile, record_function

    h, w, y = make_inputs(shape, n, mode, device, seed)

    def step():
        h.grad = w.grad = None
        with mode.autocast(device):
            loss = fn(h, w, y)
        loss.backward()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for i in range(steps):
            with record_function(f"{impl.name} fwd+bwd #{i}"):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    stem = f"profile-{impl.name}-{shape.name}-N{n}-{mode.name.replace('+', '_')}"
    trace = os.path.join(out_dir, stem + ".json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    averages = prof.key_averages()
    sort = "cpu_time_total"
    text = None
    if device.type == "cuda":
        for sort in ("device_time_total", "cuda_time_total"):  # the name changed across torch versions
            try:
                text = averages.table(sort_by=sort, row_limit=40)
                break
            except (AttributeError, KeyError, ValueError):
                continue
    if text is None:
        sort = "cpu_time_total"
        text = averages.table(sort_by=sort, row_limit=40)
    table = os.path.join(out_dir, stem + ".txt")
    with open(table, "w") as f:
        f.write(f"{impl.name} at {shape.name} N={n} D={shape.d} V={shape.v} {mode.name}, {steps} steps "
                f"after {warmup} warm-up, sorted by {sort}\n\n")
        f.write(text)
    log(f"[profile] wrote {trace}.gz and {table}")
    return [trace + ".gz", table]
