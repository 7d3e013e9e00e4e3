"""How many tokens go into one chunk of logits: set by a memory budget, never by a fixed row count."""
from __future__ import annotations

import math
import os

import torch

_MiB = 1 << 20
# CPU: small chunks keep the head's extra memory a few percent of materialized logits at no speed cost
# (the GEMMs stay large enough for MKL). CUDA: large chunks keep cuBLAS efficient and the number of
# read-modify-write passes over the dW accumulator small; 768 MiB leaves room under a 1 GiB overhead ceiling
# for the chunk plus the per-row vectors (N=8192, V=128256 bf16: 3 chunks of 2731 rows).
DEFAULT_BUDGET_BYTES = {"cpu": 32 * _MiB, "cuda": 768 * _MiB}
ENV_BUDGET_MB = "HF_FUSEDCE_CHUNK_BUDGET_MB"


def default_budget_bytes(device: torch.device) -> int:
    env = os.environ.get(ENV_BUDGET_MB)
    if env:
        return int(float(env) * _MiB)
    return DEFAULT_BUDGET_BYTES.get(device.type, DEFAULT_BUDGET_BYTES["cpu"])


ROW_MULTIPLE = 128  # GEMM tile height: chunks of several hundred rows stay whole tiles


def rows_per_chunk(n_rows: int, vocab: int, bytes_per_logit: int, budget_bytes: int) -> int:
    """Largest row count whose logits working set fits the budget, balanced so chunks are equal, and a
    multiple of ROW_MULTIPLE when the budget holds at least that many rows (tiny test budgets keep tiny chunks)."""
    if n_rows <= 0:
        return 1
    fit = max(1, budget_bytes // max(1, vocab * bytes_per_logit))
    if fit >= ROW_MULTIPLE:
        fit -= fit % ROW_MULTIPLE
    n_chunks = math.ceil(n_rows / fit)
    step = math.ceil(n_rows / n_chunks)
    if n_chunks > 1 and fit >= ROW_MULTIPLE:  # rounding up stays within fit, itself a multiple
        step = math.ceil(step / ROW_MULTIPLE) * ROW_MULTIPLE
    return step
