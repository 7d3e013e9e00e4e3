"""A roofline model of the chunk loop on a GPU: modelled time and memory overhead for (N, D, V, dtype, budget).

Never measured on a GPU (this project has none): it is arithmetic on the peak rates below, used to pick the
default CUDA chunk budget and printed by `hf-fusedce bench real-heads` as a model estimate.

Per chunk of r rows (s = bytes per element of the GEMM dtype, a = of the dW accumulator):
  GEMM 1  z = h W^T        2rDV FLOPs,  reads rD s + VD s, writes rV s
  row kernel               3 passes over z (read, read, write): 3 rV s bytes
  GEMM 2  dh = g W         2rDV FLOPs,  reads rV s + VD s, writes rD s
  GEMM 3  dW += g^T h      2rDV FLOPs,  reads rV s + rD s, reads (beta=1, not the first chunk) and writes VD a
each GEMM costing max(FLOPs / peak, bytes / HBM bandwidth); plus the blockwise fp32 -> s downcast of dW (VD (4+s)
bytes) when the accumulator is fp32. The floor is 6 N D V FLOPs at the peak rate.
Overhead (bytes above what stock also holds: inputs and their gradients): the chunk, the row vectors, and the fp32
accumulator's extra V D (4 - s) bytes when it is used (the bf16 result is written into its first half).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..ce.autograd import dw_accumulator_dtype
from .chunking import rows_per_chunk

_MiB = 1 << 20


@dataclass(frozen=True)
class Gpu:
    name: str
    flops: float  # dense bf16/fp16 matrix FLOP/s reachable by large GEMMs (what the model uses)
    hbm: float  # bytes/s
    peak_bf16: float | None = None  # the vendor's published dense peaks (FLOP/s), for reference (docs/gpu.md)
    peak_fp32: float | None = None


H100 = Gpu("H100 SXM", 700e12, 3.35e12, peak_bf16=989.4e12, peak_fp32=67e12)
A100 = Gpu("A100 SXM", 280e12, 2.0e12, peak_bf16=312e12, peak_fp32=19.5e12)
# AMD Instinct (published peaks: AMD's MI300X and MI250X data sheets). The reachable rate is assumed at 0.7 x the
# dense peak, the fraction the H100 figure takes, until a `hf-fusedce selftest` run on the GPU measures it. An
# MI250X is two GCDs that torch sees as two devices: one device has half the card's peak and bandwidth.
MI300X = Gpu("MI300X", 0.7 * 1307.4e12, 5.3e12, peak_bf16=1307.4e12, peak_fp32=163.4e12)
MI250X = Gpu("MI250X (one GCD)", 0.7 * 191.5e12, 1.6384e12, peak_bf16=191.5e12, peak_fp32=47.9e12)
GPUS = {"H100": H100, "A100": A100, "MI300X": MI300X, "MI250X": MI250X}


def gpu_for(device_name: str) -> Gpu | None:
    """The modelled GPU a device name (torch.cuda.get_device_name) refers to, None if none is modelled."""
    name = device_name.upper().replace(" ", "")
    return next((gpu for key, gpu in GPUS.items() if key in name), None)
ROW_VECTOR_BYTES = 40  # per token: loss, weight, target id, probability, active-row index, dh row slice bookkeeping
TIME_TARGET = 1.10  # x floor: the default budget's modelled time, leaving room under the 1.15 goal


@dataclass(frozen=True)
class PlanTime:
    """A chunk plan's modelled time against its floor; the CUDA and CPU estimates add their memory field."""

    budget_bytes: int
    chunks: int
    rows: int
    dw_dtype: str
    seconds: float
    floor_seconds: float

    @property
    def x_floor(self) -> float:
        return self.seconds / self.floor_seconds


@dataclass(frozen=True)
class Estimate(PlanTime):
    overhead_bytes: int


def estimate(n: int, d: int, v: int, dtype: torch.dtype, budget_bytes: int, gpu: Gpu = H100,
             dw_accumulation: str = "auto") -> Estimate:
    s = torch.finfo(dtype).bits // 8
    rows = rows_per_chunk(n, v, s, budget_bytes)  # the triton row kernel works in place: s bytes per logit
    chunks = math.ceil(n / rows)
    acc = dw_accumulator_dtype(dtype, chunks, dw_accumulation)
    a = torch.finfo(acc).bits // 8

    def gemm(flops, nbytes):
        return max(flops / gpu.flops, nbytes / gpu.hbm)

    def chunk(r, first):
        return (gemm(2 * r * d * v, (r * d + v * d + r * v) * s) + 3 * r * v * s / gpu.hbm
                + gemm(2 * r * d * v, (r * v + v * d + r * d) * s)
                + gemm(2 * r * d * v, (r * v + r * d) * s + v * d * a * (1 if first else 2)))

    last = n - (chunks - 1) * rows
    seconds = chunk(rows if chunks > 1 else last, True) + max(0, chunks - 2) * chunk(rows, False)
    seconds += chunk(last, False) if chunks > 1 else 0.0
    if a != s:
        seconds += v * d * (a + s) / gpu.hbm
    overhead = rows * v * s + n * ROW_VECTOR_BYTES + (v * d * (a - s) if a != s else 0)
    return Estimate(budget_bytes, chunks, rows, str(acc).removeprefix("torch."), seconds,
                    6 * n * d * v / gpu.flops, overhead)


CANDIDATE_BUDGETS = tuple(m * _MiB for m in (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096))


@functools.lru_cache(maxsize=512)
def choose_budget(n: int, d: int, v: int, dtype: torch.dtype, gpu: Gpu = H100, dw_accumulation: str = "auto",
                  target: float = TIME_TARGET) -> int:
    """The candidate budget with the least modelled overhead whose modelled time is within `target` x floor
    (the fastest candidate if none is)."""
    ests = [estimate(n, d, v, dtype, b, gpu, dw_accumulation) for b in CANDIDATE_BUDGETS]
    ok = [e for e in ests if e.x_floor <= target]
    best = min(ok, key=lambda e: (e.overhead_bytes, e.budget_bytes)) if ok else min(ests, key=lambda e: e.seconds)
    return best.budget_bytes


def budget_table(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16, dw_accumulation: str = "auto",
                 budgets=CANDIDATE_BUDGETS) -> str:
    """Markdown: budget -> chunks, dW accumulator, modelled H100 / A100 time (x floor), overhead."""
    lines = [f"N={n} D={d} V={v} {str(dtype).removeprefix('torch.')}, dw_accumulation={dw_accumulation!r} "
             f"(model estimate; floor H100 {6 * n * d * v / H100.flops * 1e3:.1f} ms, "
             f"A100 {6 * n * d * v / A100.flops * 1e3:.1f} ms)", "",
             "| budget MiB | chunks x rows | dW acc | H100 ms | x floor | A100 ms | x floor | overhead MiB |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    chosen = choose_budget(n, d, v, dtype, H100, dw_accumulation)
    for b in budgets:
        h, a = estimate(n, d, v, dtype, b, H100, dw_accumulation), estimate(n, d, v, dtype, b, A100, dw_accumulation)
        mark = " (default)" if b == chosen else ""
        lines.append(f"| {b // _MiB}{mark} | {h.chunks} x {h.rows} | {h.dw_dtype} | {h.seconds * 1e3:.1f} | "
                     f"{h.x_floor:.3f} | {a.seconds * 1e3:.1f} | {a.x_floor:.3f} | {h.overhead_bytes / _MiB:.0f} |")
    return "\n".join(lines) + "\n"


SHAPES = {"CCE paper (Gemma 2)": (8192, 2304, 256000), "Llama-3 8B": (8192, 4096, 128256),
          "Llama-3 8B, 64k tokens": (65536, 4096, 128256)}

if __name__ == "__main__":
    for name, (n_, d_, v_) in SHAPES.items():
        for policy in ("auto", "native"):
            print(f"### {name}\n\n{budget_table(n_, d_, v_, dw_accumulation=policy)}")
