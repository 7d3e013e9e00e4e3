"""The `triton` backend's distillation row kernel (math identical to torch_impl.distill_rows).

The chunk's GEMMs (student logits, teacher logits, dh, dW) run in cuBLAS; this kernel is the only other pass over
the chunk. One program per row, two online logsumexps (student and teacher at temperature T, plus the student at
temperature 1 for hard labels when T != 1):
    KL (beta 0 or 1): pass 1 gives the loss (the weighted gap sum rides along the logsumexps), pass 2 writes the
                      gradient over the student logits, in place, in their own dtype.
    JSD (0 < beta < 1): log m needs both normalizers, and the gradient needs KL(p_s || m): pass 2 the loss, pass 3
                      the gradient.
Row offsets are int64. On CPU tensors it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .spec import DistillSpec, TeacherRows


def working_bytes_per_logit(spec: DistillSpec, chunk_dtype: torch.dtype) -> int:
    """The student chunk and the teacher chunk (same dtype); the kernel itself works in registers."""
    return 2 * (torch.finfo(chunk_dtype).bits // 8)


@triton.jit
def _online(m, total, x):
    """Fold a block into a running (max, sum exp(x - max)); returns the new pair and the rescale factor."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    return m_new, total * rescale + tl.sum(tl.exp(x - m_safe), axis=0), rescale


@triton.jit
def _log_mixture(log_ps, log_pt, log_1mb, log_b):
    a = log_ps + log_1mb
    b = log_pt + log_b
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _distill_rows_kernel(
    Z, stride_z, ZT, stride_zt, IDS, WEIGHT, SCALE, stride_scale, LOSS, ENTROPY,
    V, inv_t, beta, log_1mb, log_b, hard_weight,
    MODE: tl.constexpr, HAS_HARD: tl.constexpr, HARD_SEPARATE: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t_row = ZT + row * stride_zt
    w = tl.load(WEIGHT + row)

    # Pass 1: online logsumexps; for a KL, the p-weighted gap sum of the KL's own side rides along.
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    m_h = tl.full((), float("-inf"), tl.float32)
    sum_s = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    sum_h = tl.zeros((), tl.float32)
    xs = tl.zeros((), tl.float32)
    gap = tl.zeros((), tl.float32)  # MODE 0: sum e^(t - m_t) (t - s); MODE 1: sum e^(s - m_s) (s - t)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        raw = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = raw * inv_t
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        d = t - s  # masked lanes: 0 - 0, and their weights below are 0
        s = tl.where(mask, s, float("-inf"))
        t = tl.where(mask, t, float("-inf"))
        m_s, sum_s, r_s = _online(m_s, sum_s, s)
        m_t, sum_t, r_t = _online(m_t, sum_t, t)
        if MODE == 0:
            gap = gap * r_t + tl.sum(tl.where(mask, tl.exp(t - tl.where(m_t == float("-inf"), 0.0, m_t)), 0.0) * d,
                                     axis=0)
        if MODE == 1:
            gap = gap * r_s - tl.sum(tl.where(mask, tl.exp(s - tl.where(m_s == float("-inf"), 0.0, m_s)), 0.0) * d,
                                     axis=0)
        if HARD_SEPARATE:
            m_h, sum_h, _ = _online(m_h, sum_h, tl.where(mask, raw, float("-inf")))
        if HAS_ENTROPY:  # sum e^(s - m_s) s, for the entropy lse_s - E_p_s[s]
            xs = xs * r_s + tl.sum(tl.where(mask, tl.exp(s - tl.where(m_s == float("-inf"), 0.0, m_s)) * raw * inv_t,
                                            0.0), axis=0)
    m_s = tl.where(m_s == float("-inf"), 0.0, m_s)
    m_t = tl.where(m_t == float("-inf"), 0.0, m_t)
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)
    lse_s = m_s + log_sum_s
    lse_t = m_t + log_sum_t

    if HAS_ENTROPY:
        tl.store(ENTROPY + row, tl.where(w != 0.0, lse_s - xs / sum_s, 0.0))
    kl_s = tl.zeros((), tl.float32)
    if MODE == 0:  # sum p_t (t - s) - (lse_t - lse_s), the normalizer difference taken apart: no cancellation
        loss = gap / sum_t - (m_t - m_s) - (log_sum_t - log_sum_s)
    elif MODE == 1:
        loss = gap / sum_s - (m_s - m_t) - (log_sum_s - log_sum_t)
    else:  # Pass 2 (JSD): beta KL(p_t || m) + (1 - beta) KL(p_s || m)
        kl_t = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            log_ps = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
            log_pt = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            log_m = _log_mixture(log_ps, log_pt, log_1mb, log_b)
            kl_s += tl.sum(tl.where(mask, tl.exp(log_ps) * (log_ps - log_m), 0.0), axis=0)
            kl_t += tl.sum(tl.where(mask, tl.exp(log_pt) * (log_pt - log_m), 0.0), axis=0)
        loss = beta * kl_t + (1.0 - beta) * kl_s

    y = tl.load(IDS + row)
    lse_h = lse_s
    if HARD_SEPARATE:
        m_h = tl.where(m_h == float("-inf"), 0.0, m_h)
        lse_h = m_h + tl.log(sum_h)
    divergence = loss  # the reverse KL's gradient needs it alone
    if HAS_HARD:
        loss += hard_weight * (lse_h - tl.load(z_row + y).to(tl.float32) * tl.where(HARD_SEPARATE, 1.0, inv_t))
    tl.store(LOSS + row, tl.where(w != 0.0, w * loss, 0.0))

    if COMPUTE_GRAD:  # last pass: dL/dz_s, written over the student logits
        coef = w * tl.load(SCALE + row * stride_scale).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            raw = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            log_ps = raw * inv_t - lse_s
            log_pt = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            p_s = tl.exp(log_ps)
            if MODE == 0:
                g = p_s - tl.exp(log_pt)
            elif MODE == 1:
                g = p_s * (log_ps - log_pt - divergence)
            else:
                g = (1.0 - beta) * p_s * (log_ps - _log_mixture(log_ps, log_pt, log_1mb, log_b) - kl_s)
            g = g * inv_t
            if HAS_HARD:
                p_h = tl.exp(tl.where(HARD_SEPARATE, raw, raw * inv_t) - lse_h)
                g += hard_weight * (p_h - tl.where(cols == y, 1.0, 0.0))
            g = tl.where(w != 0.0, g * coef, 0.0)  # ignored rows stay exactly zero
            tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    return min(2048, triton.next_power_of_2(max(vocab, 16)))


def distill_rows(z: torch.Tensor, rows: TeacherRows, spec: DistillSpec, compute_grad: bool):
    """Same contract as torch_impl.distill_rows: loss_rows; z overwritten by the gradient."""
    n, vocab = z.shape
    assert z.stride(1) == 1, "logits chunk must be row-major (GEMM output)"
    loss = torch.empty(n, dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)
    if n == 0:
        return loss
    zt = rows.teacher_logits()
    scale = rows.scale.float() if rows.scale.dtype != torch.float32 else rows.scale
    beta = spec.beta
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    hard = spec.hard_label_weight != 0.0
    entropy = loss if rows.entropy_sum is None else torch.empty_like(loss)  # a placeholder when unused
    _distill_rows_kernel[(n,)](
        z, z.stride(0), zt, zt.stride(0), rows.ids.contiguous(), rows.weight.contiguous().float(), scale,
        scale.stride(0), loss, entropy,
        vocab, 1.0 / spec.temperature, beta, math.log1p(-beta) if mode == 2 else 0.0,
        math.log(beta) if mode == 2 else 0.0, spec.hard_label_weight,
        MODE=mode, HAS_HARD=hard, HARD_SEPARATE=hard and spec.temperature != 1.0,
        HAS_ENTROPY=rows.entropy_sum is not None, COMPUTE_GRAD=compute_grad,
        BLOCK_V=_block_v(vocab), num_warps=8,
    )
    if rows.entropy_sum is not None:
        rows.entropy_sum += entropy.sum()
    return loss
