"""The CPU chunk budget for one call's (N, D, V, dtype): a cost model of the chunk loop on this machine.

A fixed budget is wrong at large vocabularies: 32 MiB holds ~52 rows of V=151936 fp32 logits, the GEMMs run at
~50 rows (a third of the BLAS's rate) and GEMM 3 reads and writes the whole V x D dW accumulator once per chunk
(measured: 1.65x the 3-GEMM floor at Qwen2.5-0.5B's head, D=896, V=151936). Per chunk of r rows (s = bytes of the chunk dtype,
a = of the dW accumulator) the model charges
  GEMMs 1-3     6 r D V FLOPs at the BLAS rate measured at r rows (GEMM 3 at the fp32 rate when a bf16/fp16
                chunk feeds an fp32 accumulator: the CPU has no mixed GEMM, the operands are upcast)
  weight reads  WEIGHT_PASSES x V D s bytes (GEMMs 1 and 2 stream and pack W; fitted, see WEIGHT_PASSES)
  dW            V D a bytes written by the first chunk, 2 V D a (read-modify-write) by every other one
  upcasts       (r V + r D)(s + 4) bytes when the accumulator is fp32 and the chunk is not, plus the final
                downcast V D (4 + s)
at the measured memory bandwidth. The floor is 6 N D V at the best rate measured. The row passes over the logits
cost the same at every chunk size and are left out.

The plan is the smallest candidate budget whose modelled time is within TIME_TARGET x floor (the fastest if
none is), never above MAX_BUDGET_BYTES nor a fifth of the call's fp32 logits (an eighth where the head's
gradients are small beside its logits; never below the old 32 MiB default): the head's extra memory stays a chunk of at most 768 MiB plus per-row vectors, whatever N. So few tokens
(N=1024 at V=151936 fp32: 128 rows) stay short of the floor: memory first; an explicit budget buys the speed.

The machine is measured once per process and (dtype, D, rows): the grid and the rows this call's candidates
would run (~0.5-2.3 s for a head's first big call), and only for calls at least CALIBRATE_RATIO times the
grid's work; smaller calls, calls under torch.compile and HF_FUSEDCE_CPU_PLAN=profile use
PROFILE, the numbers measured on the project's 2-core CPU (2026-12-05). HF_FUSEDCE_CPU_PLAN=fixed restores the
constant 32 MiB budget. An explicit chunk_budget_bytes or HF_FUSEDCE_CHUNK_BUDGET_MB still wins over all this.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import time
from dataclasses import dataclass

import torch

from ..ce.autograd import dw_accumulator_dtype
from .chunking import rows_per_chunk
from .cost_model import PlanTime

_MiB = 1 << 20
ENV_CPU_PLAN = "HF_FUSEDCE_CPU_PLAN"  # measure (default) | profile | fixed
PLAN_MODES = ("measure", "profile", "fixed")
FIXED_BUDGET_BYTES = 32 * _MiB  # the old constant default, and the floor of the candidates
MAX_BUDGET_BYTES = 768 * _MiB  # the default memory bound of the head's chunk on CPU (as on CUDA)
LOGITS_FRACTION = 5  # ... and at most 1/5 of the call's fp32 logits (fp32 chunks <= N/5 rows, bf16 <= 2N/5),
LOGITS_FRACTION_SMALL_GRADS = 8  # 1/8 where the head's gradients are small beside the logits (see memory_cap)
CANDIDATE_BUDGETS = tuple(m * _MiB for m in (32, 48, 64, 96, 128, 192, 256, 384, 512, 768))
# GEMMs 1 and 2 of every chunk read (and the BLAS packs) the whole V x D weight: charged as WEIGHT_PASSES
# streaming passes over it. Fitted on the project's CPU (fp32, 2026-12-05): each extra chunk cost the time of 7-12
# passes at the measured bandwidth (D=896 V=151936: 4096 rows 10.29 s, 8 x 512 11.09 s; D=2048 V=128256: 19.21 s,
# 8 x 512 21.67 s, 6 x 768 20.22 s); a calibration slice in cache cannot see it.
WEIGHT_PASSES = 6
TIME_TARGET = 1.02  # x the modelled floor. The model is rough (at N=4096 on the project's CPU it put the fp32 plans
# at 1.10-1.12x where they ran at 1.01-1.05x, the bf16 ones at 1.08-1.11x where they ran at 0.95-0.98x), so a
# tight target: the plan takes the largest chunk the memory cap allows unless a smaller one is modelled at the floor
CALIBRATION_ROWS = (64, 128, 256, 512, 1024, 2048)
CALIBRATION_VOCAB = 1024  # W slice the calibration GEMMs run against
CALIBRATE_RATIO = 15  # calibrate only for calls >= 15x the calibration's FLOPs (< ~7% of one call, once a process)
CALIBRATION_REPEATS = 3  # best of three per point: the curve is read as measured, a noisy dip would count


@dataclass(frozen=True)
class Machine:
    """BLAS FLOP/s at CALIBRATION_ROWS rows per dtype name (three GEMMs of a chunk), and memory bytes/s.
    `envelope`: read the curve on its rising envelope (the stored PROFILE: measured at another D, its dips say
    nothing about this call's); a curve measured at the call's own D is read as measured (see rate)."""

    rates: tuple[tuple[str, tuple[float, ...]], ...]
    bandwidth: float
    source: str
    envelope: bool = False
    points: tuple[int, ...] = CALIBRATION_ROWS  # the row counts the rates were measured at, ascending

    def rate(self, dtype: torch.dtype, rows: int) -> float:
        """FLOP/s at `rows` rows. The BLAS is not monotone in the rows: its bf16 GEMM 3 (dW += g^T h, K = rows)
        ran 1.15-1.3x faster at K=512 and 1024 than at 768, 1408 or 2048 (project CPU, D=896-3584, 2026-12-05),
        so a curve measured at the call's D is read as it is; the stored profile on its rising envelope (a dip
        there once picked 256-row chunks at Gemma-2-2B fp32: 1.15x the floor)."""
        return _on_curve(self.points, self._curve(dtype, self.envelope), rows)

    def floor_rate(self, dtype: torch.dtype, rows: int) -> float:
        """The unchunked GEMMs' rate: the best measured up to the call's own row count (the envelope), as the
        benchmark's floor is the best the BLAS does."""
        return max(_on_curve(self.points, self._curve(dtype, True), rows), 1.0)

    def _curve(self, dtype: torch.dtype, envelope: bool) -> list[float]:
        table = dict(self.rates)
        curve = table.get(_name(dtype)) or table["float32"]
        return list(itertools.accumulate(curve, max)) if envelope else list(curve)


def _on_curve(points: tuple[int, ...], curve: list[float], rows: int) -> float:
    """Linear in log2(rows) between measured points; proportional to rows below the first; flat past the last."""
    if rows <= points[0]:
        return curve[0] * rows / points[0]
    for (r0, g0), (r1, g1) in zip(zip(points, curve), zip(points[1:], curve[1:])):
        if rows <= r1:
            return g0 + math.log2(rows / r0) / math.log2(r1 / r0) * (g1 - g0)
    return curve[-1]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Measured on the project's CPU (2-core Xeon with AMX, torch 2.13 CPU, 2026-12-05, quiet: load < 1), three GEMMs of
# r rows against a D=896 weight slice (measured_machine), best of 4 calibrations (single ones scatter by ~20%).
PROFILE = Machine(rates=(("float32", (251e9, 292e9, 291e9, 311e9, 315e9, 323e9)),
                         ("bfloat16", (714e9, 944e9, 1349e9, 1707e9, 1212e9, 1658e9))),
                  bandwidth=39.5e9, source="profile (project CPU, 2026-12-05)", envelope=True)


@dataclass(frozen=True)
class CpuEstimate(PlanTime):
    chunk_bytes: int


def estimate(n: int, d: int, v: int, dtype: torch.dtype, budget_bytes: int, machine: Machine = PROFILE,
             dw_accumulation: str = "auto") -> CpuEstimate:
    s = torch.finfo(dtype).bits // 8  # the torch row kernel works in place: s bytes per logit
    rows = rows_per_chunk(n, v, s, budget_bytes)
    chunks = max(1, math.ceil(n / rows))
    acc = dw_accumulator_dtype(dtype, chunks, dw_accumulation)
    a = torch.finfo(acc).bits // 8
    dw_gemm_dtype = torch.float32 if a != s else dtype
    bw = machine.bandwidth

    def chunk(r: int, first: bool) -> float:
        t = 4 * r * d * v / machine.rate(dtype, r) + 2 * r * d * v / machine.rate(dw_gemm_dtype, r)
        moved = WEIGHT_PASSES * v * d * s + v * d * a * (1 if first else 2)
        if a != s:
            moved += (r * v + r * d) * (s + 4)
        return t + moved / bw

    last = n - (chunks - 1) * rows
    seconds = chunk(last if chunks == 1 else rows, True) + max(0, chunks - 2) * chunk(rows, False)
    seconds += chunk(last, False) if chunks > 1 else 0.0
    if a != s:
        seconds += v * d * (a + s) / bw
    floor = 6 * n * d * v / machine.floor_rate(dtype, n)
    return CpuEstimate(budget_bytes, chunks, rows, _name(acc), seconds, floor, min(rows, n) * v * s)


def memory_cap(n: int, v: int, dtype: torch.dtype, d: int | None = None) -> int:
    """Largest budget the plan may pick: MAX_BUDGET_BYTES, and a fraction of the call's logits in fp32 (N V 4 bytes),
    but not below the old fixed default. Stock holds more than two such tensors above its inputs and gradients
    (measured 2.5x at Llama-3.2-1B fp32, 2.9x at Qwen2.5-0.5B bf16, N=4096), so:
    - a fifth keeps the chunk under 10% of stock's memory above inputs and gradients (the bar at real heads); it is needed
      where the weight is large: at D=2048, V=128256 fp32 the three GEMMs of 768-row chunks ran at 1.05x the
      unchunked floor, of 512-row chunks 1.13x (each chunk re-reads and re-packs the 1 GB weight);
    - an eighth where the head's gradients are small beside the logits ((V + N) D <= N V / 4 in their bytes), so
      the whole head, gradients included, stays within 10% of stock (the bar at N=4096, D=512, V=32000)."""
    logits = n * v * 4
    small_grads = d is not None and (v + n) * d * (torch.finfo(dtype).bits // 8) * 4 <= logits
    fraction = LOGITS_FRACTION_SMALL_GRADS if small_grads or d is None else LOGITS_FRACTION
    return max(FIXED_BUDGET_BYTES, min(MAX_BUDGET_BYTES, logits // fraction))


def candidates(n: int, v: int, dtype: torch.dtype, d: int | None = None) -> list[int]:
    """CANDIDATE_BUDGETS below the memory cap, and the cap itself."""
    cap = memory_cap(n, v, dtype, d)
    return sorted({b for b in CANDIDATE_BUDGETS if b < cap} | {cap})
def choose(n: int, d: int, v: int, dtype: torch.dtype, machine: Machine = PROFILE, dw_accumulation: str = "auto",
           target: float = TIME_TARGET) -> CpuEstimate:
    """The smallest candidate budget under memory_cap whose modelled time is within target x floor, else the
    fastest candidate."""
    ests = [estimate(n, d, v, dtype, b, machine, dw_accumulation) for b in candidates(n, v, dtype, d)]
    ok = [e for e in ests if e.x_floor <= target]
    return min(ok, key=lambda e: e.budget_bytes) if ok else min(ests, key=lambda e: (e.seconds, e.budget_bytes))


def plan_mode() -> str:
    mode = os.environ.get(ENV_CPU_PLAN, "measure").strip().lower() or "measure"
    if mode not in PLAN_MODES:
        raise ValueError(f"{ENV_CPU_PLAN}={mode!r}: use one of {', '.join(PLAN_MODES)} "
                         "(measure: calibrate on this machine; profile: the stored CPU profile; fixed: 32 MiB)")
    return mode


def default_budget(n: int, d: int, v: int, dtype: torch.dtype, dw_accumulation: str = "auto") -> int:
    """The CPU default chunk budget for this call (see the module docstring)."""
    if plan_mode() == "fixed" or n * v * (torch.finfo(dtype).bits // 8) <= FIXED_BUDGET_BYTES:
        return FIXED_BUDGET_BYTES  # one chunk either way: nothing to plan
    return _choose_cached(n, d, v, dtype, machine_for(n, d, v, dtype), dw_accumulation)


def machine_for(n: int, d: int, v: int, dtype: torch.dtype) -> Machine:
    """The machine the plan reads for this call: this CPU, measured at the grid and this call's candidate rows
    (each point once per process) for big enough calls in mode "measure"; else the stored PROFILE."""
    if plan_mode() == "measure" and not torch.compiler.is_compiling() and 6 * n * d * v >= CALIBRATE_RATIO * \
            calibration_flops(d, dtype):
        return measured_machine(dtype, d, candidate_rows(n, v, dtype, d))
    return PROFILE


def candidate_rows(n: int, v: int, dtype: torch.dtype, d: int | None = None) -> tuple[int, ...]:
    """The rows per chunk the candidate budgets give this call: the plan's measured machine times these exactly
    (rates between grid points are not linear: see Machine.rate)."""
    s = torch.finfo(dtype).bits // 8
    return tuple(sorted({rows_per_chunk(n, v, s, b) for b in candidates(n, v, dtype, d)}))


@functools.lru_cache(maxsize=256)
def _choose_cached(n, d, v, dtype, machine, dw_accumulation) -> int:
    return choose(n, d, v, dtype, machine, dw_accumulation).budget_bytes


def _calibrated_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    return (dtype,) if dtype in (torch.float32, torch.float64) else (dtype, torch.float32)


def calibration_flops(d: int, dtype: torch.dtype) -> int:
    return CALIBRATION_REPEATS * 6 * sum(CALIBRATION_ROWS) * d * CALIBRATION_VOCAB * len(_calibrated_dtypes(dtype))


def measured_machine(dtype: torch.dtype, d: int, rows: tuple[int, ...] = ()) -> Machine:
    """This CPU at CALIBRATION_ROWS and `rows` (the call's candidates): the three GEMMs of a chunk for the chunk
    dtype (and fp32, the rate of GEMM 3 with an fp32 accumulator), and a streaming add for the bandwidth. Each
    (dtype, D, rows) point is measured once per process: calls with new candidate rows time only those."""
    points = tuple(sorted(set(CALIBRATION_ROWS) | set(rows)))
    rates = tuple((_name(dt), tuple(_gemm_rate(dt, d, r) for r in points)) for dt in _calibrated_dtypes(dtype))
    return Machine(rates, _bandwidth(), "measured", points=points)


@functools.lru_cache(maxsize=1024)
def _gemm_rate(dtype: torch.dtype, d: int, rows: int) -> float:
    """FLOP/s of the three GEMMs of an r-row chunk against a CALIBRATION_VOCAB-row weight slice, best of
    CALIBRATION_REPEATS (after one warm-up per dtype and D: threads, BLAS init)."""
    gen = torch.Generator().manual_seed(rows)
    w = _calibration_weight(dtype, d)
    h = torch.randn(rows, d, generator=gen).to(dtype)
    best = math.inf
    for _ in range(CALIBRATION_REPEATS):
        t0 = time.perf_counter()
        z = h @ w.t()
        _ = z @ w, z.t() @ h
        best = min(best, time.perf_counter() - t0)
    return 6 * rows * d * CALIBRATION_VOCAB / best


@functools.lru_cache(maxsize=32)
def _calibration_weight(dtype: torch.dtype, d: int) -> torch.Tensor:
    w = torch.randn(CALIBRATION_VOCAB, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    _ = torch.randn(CALIBRATION_ROWS[0], d).to(dtype) @ w.t()  # warm-up
    return w


@functools.lru_cache(maxsize=1)
def _bandwidth(nbytes: int = 128 * _MiB) -> float:
    x, y = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    best = math.inf
    for i in range(3):
        t0 = time.perf_counter()
        x.add_(y)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 3 * nbytes / best  # read x, read y, write x
