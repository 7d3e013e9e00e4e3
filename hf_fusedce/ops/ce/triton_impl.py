"""The `triton` backend's row kernel: loss and in-place dL/dlogits for one chunk of logits rows.

The three GEMMs of each chunk run in cuBLAS (see autograd.py); this kernel is the only other pass over the
chunk: one program per row reads it twice (online max/sum, then gradient) and overwrites it with the gradient
in the chunk's own dtype, so a chunk needs no buffer beyond itself. Math identical to torch_impl.ce_rows.
Row offsets are int64: N*V beyond 2^31 is safe. On CPU tensors it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spec import LossSpec, RowInputs


def working_bytes_per_logit(spec: LossSpec, chunk_dtype: torch.dtype) -> int:
    return torch.finfo(chunk_dtype).bits // 8  # the kernel works in registers, in place


@triton.jit
def _tanh(y):
    """tanh in float32 to ~1 ulp: odd series near 0 (where 1 - exp(-2|y|) would cancel), exp form elsewhere.
    Written out because libdevice.tanh does not run under the interpreter that CI tests with."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = y * y
    small = a * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.0625, small, big)
    return tl.where(y < 0, -t, t)


@triton.jit
def _transform(raw, logit_scale, softcap):
    """x = softcap * tanh(scale * raw / softcap) if softcap > 0 else scale * raw; also returns tanh for the chain
    rule. The cap is a runtime branch, uniform per program: one compiled kernel serves both."""
    y = raw * logit_scale
    t = y
    if softcap > 0.0:  # one return statement: early returns under `if` are fragile in Triton's code generator
        t = _tanh(y / softcap)
        y = softcap * t
    return y, t


@triton.jit(do_not_specialize=["stride_scale"], do_not_specialize_on_alignment=["IDS", "PROBS", "WEIGHT", "SCALE"])
def _ce_rows_kernel(
    Z, stride_z, IDS, PROBS, WEIGHT, SCALE, stride_scale, LOSS,
    V, K, logit_scale, softcap, eps, z_loss,
    COMPUTE_GRAD: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row. The row's K target ids are scalars, matched against a block's columns by a 1-D
    compare each (no (BLOCK_V, K) match, no shared memory); Triton specializes K == 1, the one-hot case. Row
    inputs and the scale's stride are not specialized on alignment or value, so chunk slices starting at any
    row, and both reductions, reuse one compiled kernel; Z is always a fresh, aligned GEMM output."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    ids_row = IDS + row * K
    tau_row = PROBS + row * K
    w = tl.load(WEIGHT + row)

    # Pass 1: online max and sum of exponentials, rescaled once per block (one exp per logit). PREFETCH: the next
    # block is loaded before this one is reduced, two blocks of loads in flight per warp. Only for rows aligned to
    # 16 elements (vectorized loads): unaligned rows load element by element, and holding two blocks of those
    # spilled registers on sm_90 (see ops/cuda/aot.py).
    m = tl.full((), float("-inf"), tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    x_sum = tl.zeros((), tl.float32)
    if PREFETCH:
        raw = tl.load(z_row + tl.arange(0, BLOCK_V), mask=tl.arange(0, BLOCK_V) < V, other=0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        if PREFETCH:
            nxt = tl.load(z_row + BLOCK_V + cols, mask=cols + BLOCK_V < V, other=0.0)
        else:
            raw = tl.load(z_row + cols, mask=mask, other=0.0)
        x, _ = _transform(raw.to(tl.float32), logit_scale, softcap)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid (-inf) - (-inf)
        sum_exp = sum_exp * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
        x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)  # one add per logit: cheaper than a smoothing variant
        if PREFETCH:
            raw = nxt
    m = tl.where(m == float("-inf"), 0.0, m)
    log_sum = tl.log(sum_exp)
    lse = m + log_sum

    # tau_sum*lse - sum tau x, written as tau_sum*log_sum + sum tau (m - x): no cancellation at large logits
    tau_sum = tl.zeros((), tl.float32)
    gap = tl.zeros((), tl.float32)
    for k in range(0, K):
        tau_k = tl.load(tau_row + k)
        x_k, _ = _transform(tl.load(z_row + tl.load(ids_row + k)).to(tl.float32), logit_scale, softcap)
        tau_sum += tau_k
        gap += tau_k * (m - x_k)
    loss = (1.0 - eps) * (tau_sum * log_sum + gap) + z_loss * lse * lse
    if eps != 0.0:
        loss += eps * (log_sum + m - x_sum / V)
    tl.store(LOSS + row, tl.where(w != 0.0, w * loss, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: g = coef * [((1-eps) T + eps + 2 c lse) p - (1-eps) tau - eps/V], chained through the cap.
        # p = exp(x - m) / sum_exp, not exp(x - lse): lse's rounding would dominate p ~ 1 at large logits.
        coef = w * tl.load(SCALE + row * stride_scale).to(tl.float32)
        c_row = coef * ((1.0 - eps) * tau_sum + eps + 2.0 * z_loss * lse) / sum_exp
        a = coef * (1.0 - eps)
        uniform = coef * eps / V
        if PREFETCH:
            raw = tl.load(z_row + tl.arange(0, BLOCK_V), mask=tl.arange(0, BLOCK_V) < V, other=0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            if PREFETCH:
                nxt = tl.load(z_row + BLOCK_V + cols, mask=cols + BLOCK_V < V, other=0.0)
            else:
                raw = tl.load(z_row + cols, mask=mask, other=0.0)
            x, t = _transform(raw.to(tl.float32), logit_scale, softcap)
            g = c_row * tl.exp(x - m) - uniform
            for k in range(0, K):  # scalar id and tau per target, reloaded per block from L1
                g = tl.where(cols == tl.load(ids_row + k), g - a * tl.load(tau_row + k), g)
            if softcap > 0.0:
                g *= 1.0 - t * t
            g = tl.where(w != 0.0, g * logit_scale, 0.0)  # ignored rows stay exactly zero (even if NaN)
            tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=mask)
            if PREFETCH:
                raw = nxt


def _block_v(vocab: int) -> int:
    return min(4096, triton.next_power_of_2(max(vocab, 16)))


def ce_rows(z: torch.Tensor, rows: RowInputs, spec: LossSpec, compute_grad: bool) -> torch.Tensor:
    """Same contract as torch_impl.ce_rows: loss_rows float32; z overwritten by the gradient."""
    n, vocab = z.shape
    assert z.stride(1) == 1, "logits chunk must be row-major (GEMM output)"
    acc = torch.promote_types(z.dtype, torch.float32)
    loss = torch.empty(n, dtype=acc, device=z.device)
    if n == 0:
        return loss
    ids = rows.ids.contiguous()
    probs = rows.probs.contiguous()
    weight = rows.weight.contiguous().float()
    scale = rows.scale.float() if rows.scale.dtype != torch.float32 else rows.scale
    n_k = ids.shape[1]
    _ce_rows_kernel[(n,)](
        z, z.stride(0), ids, probs, weight, scale, scale.stride(0), loss,
        vocab, n_k, spec.logit_scale, spec.softcap if spec.softcap is not None else 0.0,
        spec.label_smoothing, spec.z_loss,
        COMPUTE_GRAD=compute_grad, PREFETCH=vocab % 16 == 0, BLOCK_V=_block_v(vocab),
        num_warps=8,
    )
    return loss
