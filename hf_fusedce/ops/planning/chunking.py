"""How many tokens go into one chunk of logits: set by a memory budget, never by a fixed row count."""
from __future__ import annotations

import math
import os
import warnings

import torch

_MiB = 1 << 20
# CPU: the cross-entropy op picks its budget per shape (ops/cpu_plan.py); 32 MiB is the distillation and
# token-stats default and the floor of that pick (at V=151936 fp32 it holds ~52 rows: too few). CUDA: large chunks keep cuBLAS efficient and the number of
# read-modify-write passes over the dW accumulator small; 768 MiB leaves room under a 1 GiB overhead ceiling
# for the chunk plus the per-row vectors (N=8192, V=128256 bf16: 3 chunks of 2731 rows).
DEFAULT_BUDGET_BYTES = {"cpu": 32 * _MiB, "cuda": 768 * _MiB}
ENV_BUDGET_MB = "HF_FUSEDCE_CHUNK_BUDGET_MB"


# Below this a chunk holds a few rows: measured 21x slower at 64 bytes (an easy slip for "64 MB") than the default.
MIN_SANE_BUDGET_BYTES = _MiB


def default_budget_bytes(device: torch.device) -> int:
    env = os.environ.get(ENV_BUDGET_MB)
    if env:
        try:
            mib = float(env)
        except ValueError:
            raise ValueError(f"{ENV_BUDGET_MB}={env!r} is not a number: set it to the chunk budget in MiB "
                             "(e.g. 64), or unset it for the default") from None
        return check_budget(int(mib * _MiB), f"{ENV_BUDGET_MB}={env} (MiB)")
    return DEFAULT_BUDGET_BYTES.get(device.type, DEFAULT_BUDGET_BYTES["cpu"])


def check_budget(budget_bytes: int, name: str = "chunk_budget_bytes", stacklevel: int = 3) -> int:
    """A chunk budget in bytes: > 0, else ValueError; a warning below MIN_SANE_BUDGET_BYTES (valid, but slow)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or budget_bytes <= 0:
        raise ValueError(f"{name} must be a number of bytes > 0, got {budget_bytes!r}")
    if budget_bytes < MIN_SANE_BUDGET_BYTES and not torch.compiler.is_compiling():  # dynamo cannot trace warn
        warnings.warn(f"{name} = {budget_bytes} bytes is below {MIN_SANE_BUDGET_BYTES >> 20} MiB: chunks of a few "
                      "rows make the loss head many times slower (the budget is in bytes: 64 MiB is 64 * 2**20)",
                      UserWarning, stacklevel=stacklevel)
    return int(budget_bytes)


ROW_MULTIPLE = 128  # GEMM tile height: chunks of several hundred rows stay whole tiles


def rows_per_chunk(n_rows: int, vocab: int, bytes_per_logit: int, budget_bytes: int) -> int:
    """Largest row count whose logits working set fits the budget, balanced so chunks are equal, and a
    multiple of ROW_MULTIPLE when the budget holds at least that many rows (tiny test budgets keep tiny chunks)."""
    if n_rows <= 0:
        return 1
    check_budget(budget_bytes)  # every op's chunk loop comes here
    fit = max(1, budget_bytes // max(1, vocab * bytes_per_logit))
    if fit >= ROW_MULTIPLE:
        fit -= fit % ROW_MULTIPLE
    n_chunks = math.ceil(n_rows / fit)
    step = math.ceil(n_rows / n_chunks)
    if n_chunks > 1 and fit >= ROW_MULTIPLE:  # rounding up stays within fit, itself a multiple
        step = math.ceil(step / ROW_MULTIPLE) * ROW_MULTIPLE
    return step
