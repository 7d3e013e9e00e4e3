"""The CPU chunk plan's decisions (ops/planning/cpu_plan.py): rows per chunk, the memory bound, who wins. No timings."""
from __future__ import annotations

import pytest
import torch

from hf_fusedce.ops.ce import api
from hf_fusedce.ops.planning import cpu_plan as cp
from hf_fusedce.ops import fused_linear_cross_entropy
from hf_fusedce.ops.planning.chunking import ENV_BUDGET_MB

MiB = 1 << 20
F32, BF16 = torch.float32, torch.bfloat16
# (D, V) of the real-heads matrix
HEADS = {"llama3.2-1b": (2048, 128256), "qwen2.5-0.5b": (896, 151936), "qwen2.5-7b": (3584, 152064),
         "gemma2-2b": (2304, 256000)}


def test_qwen_head_at_1k_tokens_gets_hundreds_of_rows_not_52():
    """The fixed 32 MiB left 55 rows a chunk at Qwen2.5-0.5B's head; a fifth of the logits left 128 (8 rewrites of
    the 545 MB dW: 1.36x the floor on an AMD EPYC). The bound's floor is the weight's own size: 512-row chunks, dW
    rewritten once."""
    e = cp.choose(1024, 896, 151936, F32)
    assert e.rows >= 512 and e.chunks <= 2, e
    assert e.chunk_bytes <= 151936 * 896 * 4  # no more than the weight (and its gradient) the head holds anyway
    old = cp.estimate(1024, 896, 151936, F32, 32 * MiB)
    assert old.rows < 64 and e.seconds < 0.8 * old.seconds  # the model sees the old default's loss too


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_at_4k_tokens_the_plan_is_near_the_modelled_floor(head, dtype):
    """Hundreds of rows per chunk, within the memory cap, and within TIME_TARGET of the modelled floor or the
    fastest the cap allows."""
    d, v = HEADS[head]
    e = cp.choose(4096, d, v, dtype)
    allowed = [cp.estimate(4096, d, v, dtype, b) for b in cp.candidates(4096, v, dtype, d)]
    assert e.rows >= 512 and e.chunk_bytes <= cp.memory_cap(4096, v, dtype, d), e
    assert e.x_floor <= cp.TIME_TARGET or e.seconds == min(a.seconds for a in allowed), e  # within target, or best
    assert e.x_floor < cp.estimate(4096, d, v, dtype, 32 * MiB).x_floor


@pytest.mark.parametrize("n", [512, 1024, 4096, 16384, 65536, 1 << 20])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_memory_bound(n, dtype):
    """A chunk never exceeds MAX_BUDGET_BYTES nor the larger of 1/5 of the call's fp32 logits and the head's weight:
    no tokens x vocab tensor once the logits outgrow the weight."""
    for d, v in HEADS.values():
        e = cp.choose(n, d, v, dtype)
        weight = v * d * dtype.itemsize
        assert e.chunk_bytes <= cp.MAX_BUDGET_BYTES and e.chunk_bytes <= max(n * v * 4 // 5, weight), e
        if n * v * 4 > 5 * max(weight, cp.MAX_BUDGET_BYTES):
            assert e.chunks >= 5, e


def test_small_calls_take_chunks_up_to_the_weight():
    """Few tokens: the logits are no bigger than the weight, one or two chunks whatever the fraction says; the
    bound is stated in the weight's bytes (its dtype's), capped at MAX_BUDGET_BYTES."""
    assert cp.memory_cap(1024, 151936, F32, 896) == 151936 * 896 * 4  # 545 MB > 1/5 of 622 MB
    assert cp.memory_cap(1024, 151936, BF16, 896) == 151936 * 896 * 2
    assert cp.memory_cap(512, 256000, F32, 2304) == cp.MAX_BUDGET_BYTES  # a 2.4 GB weight: the absolute cap
    assert cp.memory_cap(4096, 32000, F32, 512) == 4096 * 32000 * 4 // 8  # = the 65.5 MB weight: unchanged
    for d, v in HEADS.values():
        assert cp.choose(512, d, v, F32).chunks == 1
        assert cp.choose(1024, d, v, F32).chunks <= 2


def test_picks_the_fewest_bytes_within_the_target():
    """A flat BLAS rate and free memory traffic: every budget is at the floor, so the smallest wins; slow
    memory makes the dW read-modify-write per chunk costly, so the plan takes bigger chunks."""
    flat = cp.Machine((("float32", (100e9,) * len(cp.CALIBRATION_ROWS)),), 1e18, "test")
    assert cp.choose(4096, 512, 32000, F32, flat).budget_bytes == cp.CANDIDATE_BUDGETS[0]  # 256 rows
    slow_memory = cp.Machine(flat.rates, 1e9, "test")
    assert cp.choose(4096, 512, 32000, F32, slow_memory).budget_bytes > cp.CANDIDATE_BUDGETS[0]


def test_falls_back_to_the_fastest_when_nothing_meets_the_target():
    e = cp.choose(4096, 896, 151936, F32, target=0.5)
    times = [cp.estimate(4096, 896, 151936, F32, b).seconds for b in cp.candidates(4096, 151936, F32, 896)]
    assert e.seconds == pytest.approx(min(times))


def test_small_calls_keep_the_old_budget_and_never_calibrate(monkeypatch):
    def boom(*a):
        raise AssertionError("calibrated for a small call")

    monkeypatch.setattr(cp, "measured_machine", boom)
    assert cp.default_budget(64, 512, 32000, F32) == cp.FIXED_BUDGET_BYTES  # one chunk anyway
    assert cp.default_budget(1024, 512, 32000, F32) in cp.CANDIDATE_BUDGETS + (cp.memory_cap(1024, 32000, F32, 512),)


def test_big_calls_calibrate_once(monkeypatch):
    calls = []

    def fake(dtype, d, rows):
        calls.append((dtype, d, rows))
        return cp.PROFILE

    monkeypatch.setattr(cp, "measured_machine", fake)
    cp._choose_cached.cache_clear()
    assert cp.default_budget(4096, 896, 151936, F32) == cp.choose(4096, 896, 151936, F32).budget_bytes
    assert calls == [(F32, 896, cp.candidate_rows(4096, 151936, F32, 896))]
    assert calls[0][2][:3] == (55, 82, 108) and 896 in calls[0][2]  # the rows the candidate budgets would run


def test_the_calibration_times_each_row_count_once_per_process():
    """A call's candidate rows are timed exactly (rates between grid points are not linear); a later call with
    other rows times only the new ones."""
    before = cp._gemm_rate.cache_info().misses
    first = cp.measured_machine(F32, 24, (384, 1408))
    assert first.points == tuple(sorted(cp.CALIBRATION_ROWS + (384, 1408)))
    assert cp._gemm_rate.cache_info().misses - before == len(first.points)
    again = cp.measured_machine(F32, 24, (384, 640))
    assert cp._gemm_rate.cache_info().misses - before == len(first.points) + 1  # only 640 is new
    assert again.rate(F32, 384) == first.rate(F32, 384) > 0


def test_env_modes(monkeypatch):
    monkeypatch.setenv(cp.ENV_CPU_PLAN, "fixed")
    assert cp.default_budget(4096, 896, 151936, F32) == 32 * MiB
    monkeypatch.setenv(cp.ENV_CPU_PLAN, "profile")
    monkeypatch.setattr(cp, "measured_machine", lambda *a: pytest.fail("profile mode calibrated"))
    assert cp.default_budget(4096, 896, 151936, F32) == cp.choose(4096, 896, 151936, F32).budget_bytes
    monkeypatch.setenv(cp.ENV_CPU_PLAN, "fast")
    with pytest.raises(ValueError, match="HF_FUSEDCE_CPU_PLAN"):
        cp.default_budget(4096, 896, 151936, F32)


def _plan_budget(monkeypatch, n, budget=None):
    monkeypatch.setenv(cp.ENV_CPU_PLAN, "profile")
    hidden, weight = torch.empty(n, 896), torch.empty(151936, 896)
    return api._plan(api.LossSpec(-100, "mean", 0.0, 0.0, None, 1.0), "torch", hidden, weight, budget).budget_bytes


def test_explicit_budget_and_env_win(monkeypatch):
    assert _plan_budget(monkeypatch, 4096) == cp.choose(4096, 896, 151936, F32).budget_bytes
    assert _plan_budget(monkeypatch, 4096, 3 * MiB) == 3 * MiB
    monkeypatch.setenv(ENV_BUDGET_MB, "7")
    assert _plan_budget(monkeypatch, 4096) == 7 * MiB


def test_calibration_measures_this_machine():
    m = cp.measured_machine(F32, 64)
    assert m.source == "measured" and m.bandwidth > 0 and all(r > 0 for _, rates in m.rates for r in rates)


def test_planned_default_gives_the_numbers_of_a_small_budget(monkeypatch):
    """Numerics do not depend on the plan: the default (chunks of hundreds of rows here) equals a run of
    64-row chunks up to fp32 summation order."""
    monkeypatch.setenv(cp.ENV_CPU_PLAN, "profile")
    g = torch.Generator().manual_seed(0)
    n, d, v = 2048, 32, 40000
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g).mul_(0.3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    assert cp.default_budget(n, d, v, F32) > 32 * MiB  # the plan, not the old default, is exercised
    out = []
    for budget in (None, 64 * v * 4):
        h.grad = w.grad = None
        fused_linear_cross_entropy(h, w, y, backend="torch", chunk_budget_bytes=budget).backward()
        loss = fused_linear_cross_entropy(h, w, y, backend="torch", chunk_budget_bytes=budget)
        out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)



def test_memory_cap_is_a_fraction_of_the_logits_or_the_weight():
    """4096 fp32 tokens. Llama-3.2-1B's head: its 1 GB weight is above a fifth of the logits (420 MB), so the
    bound is the weight's size, capped at MAX_BUDGET_BYTES. Qwen2.5-0.5B: the weight (545 MB) above a fifth of the
    logits (498 MB). At D=512, V=32000 the gradients are small beside the logits: an eighth (= the 65.5 MB weight),
    so the whole head, gradients included, stays within 10% of stock. Gemma-2-2B: a fifth would be 839 MB."""
    n = 4096
    assert cp.memory_cap(n, 128256, F32, 2048) == cp.MAX_BUDGET_BYTES
    assert cp.memory_cap(n, 151936, F32, 896) == 151936 * 896 * 4
    assert cp.memory_cap(n, 32000, F32, 512) == n * 32000 * 4 // 8
    assert cp.memory_cap(n, 32000, F32) == n * 32000 * 4 // 8  # no D given: the stricter fraction, no weight
    assert cp.memory_cap(n, 256000, F32, 2304) == cp.MAX_BUDGET_BYTES
    assert cp.memory_cap(1 << 20, 151936, F32, 896) == cp.MAX_BUDGET_BYTES  # large N: bounded whatever N


def test_a_curve_measured_at_the_calls_width_is_read_as_measured():
    """The bf16 BLAS is not monotone in the rows: at Gemma-2-2B's D its GEMMs ran slower at 2048 rows than at
    1024 (the curve below, calibrated on the project's CPU, 2026-12-05; 1408-row chunks ran 1.06x the floor's
    GEMM time, 1024-row ones 0.97x). Read as measured, the plan takes 1024-row chunks; read on its rising
    envelope (as the stored profile is) it would take the largest chunk the memory cap allows."""
    rates = (("bfloat16", (725e9, 1080e9, 1640e9, 1886e9, 1935e9, 1715e9)),
             ("float32", (287e9, 325e9, 337e9, 360e9, 347e9, 351e9)))
    measured = cp.Machine(rates, 39.5e9, "measured")
    assert cp.choose(4096, 2304, 256000, BF16, measured).rows == 1024
    enveloped = cp.Machine(rates, 39.5e9, "profile", envelope=True)
    largest = max(cp.estimate(4096, 2304, 256000, BF16, b).rows for b in cp.candidates(4096, 256000, BF16, 2304))
    assert cp.choose(4096, 2304, 256000, BF16, enveloped).rows == largest == 1408
    assert measured.floor_rate(BF16, 4096) == enveloped.floor_rate(BF16, 4096) == 1935e9  # the best measured
