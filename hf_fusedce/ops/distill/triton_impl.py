"""The `triton` backend's distillation row kernel (the math of torch_impl.distill_rows: see its docstring for
why the log-ratio r = log p_t - log p_s is formed from the logits' difference and each divergence is summed as
non-negative terms).

The chunk's GEMMs (student logits, teacher logits, dh, dW) run in cuBLAS; this kernel is the only other pass over
the chunk. One program per row:
    pass 1: online maxima of s and t, W = sum e^(s - max s) and A = sum e^(s - max s) expm1(x) with
            x = t - s - (max t - max s): when a block raises a maximum, W and A are rescaled exactly (A's shift
            moves by delta: A <- A e^-delta + W expm1(-delta), both factors as the maxima moved); the student at
            temperature 1 for hard labels when T != 1; the entropy sum.
    pass 2: the loss from r = x - log1p(A / W); for beta = 0 the gradient in the same pass (it does not need L).
    pass 3 (beta > 0): the gradient, which needs KL(p_s || m) (or L), written over the student logits in place.
expm1 and log1p are written out (libdevice's do not run under the interpreter, and exp(x) - 1 or a fast log near
1 would bring back the cancellation this avoids). Row offsets are int64. On CPU tensors it runs under
TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spec import DistillSpec, TeacherRows


def working_bytes_per_logit(spec: DistillSpec, chunk_dtype: torch.dtype) -> int:
    """The student chunk and the teacher chunk (same dtype); the kernel itself works in registers."""
    return 2 * (torch.finfo(chunk_dtype).bits // 8)


@triton.jit
def _expm1(x):
    """e^x - 1 to a few float32 ulps: Taylor series to x^9 for |x| < 0.5 (truncation < 1e-9 relative), exp
    elsewhere (no cancellation there)."""
    p = 1.0 + x * (1.0 / 9.0)
    p = 1.0 + x * p * (1.0 / 8.0)
    p = 1.0 + x * p * (1.0 / 7.0)
    p = 1.0 + x * p * (1.0 / 6.0)
    p = 1.0 + x * p * (1.0 / 5.0)
    p = 1.0 + x * p * (1.0 / 4.0)
    p = 1.0 + x * p * (1.0 / 3.0)
    p = 1.0 + x * p * (1.0 / 2.0)
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)


@triton.jit
def _log1p(y):
    """log(1 + y), y > -1, to a few float32 ulps: 2 atanh(w), w = y / (2 + y), as an odd series (|w| <= 1/3,
    to w^15) for |y| < 0.5, log elsewhere."""
    w = y / (2.0 + y)
    w2 = w * w
    p = 1.0 / 13.0 + w2 * (1.0 / 15.0)
    p = 1.0 / 11.0 + w2 * p
    p = 1.0 / 9.0 + w2 * p
    p = 1.0 / 7.0 + w2 * p
    p = 1.0 / 5.0 + w2 * p
    p = 1.0 / 3.0 + w2 * p
    p = 1.0 + w2 * p
    return tl.where(tl.abs(y) < 0.5, 2.0 * w * p, tl.log(1.0 + y))


@triton.jit
def _online(m, total, x):
    """Fold a block into a running (max, sum exp(x - max)); returns the new pair and the rescale factor."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    return m_new, total * rescale + tl.sum(tl.exp(x - m_safe), axis=0), rescale


@triton.jit
def _terms(raw, traw, mask, inv_t, m_s, m_t, k, c1, total_s, total_t):
    """Per column: r = log p_t - log p_s, p_s, p_t, e = expm1(-|r|) and diff = p_t - p_s (0 on masked lanes)."""
    r = ((traw - raw) * inv_t - k) - c1
    p_s = tl.where(mask, tl.exp(raw * inv_t - m_s) / total_s, 0.0)
    p_t = tl.where(mask, tl.exp(traw * inv_t - m_t) / total_t, 0.0)
    e = _expm1(-tl.abs(r))
    diff = tl.where(r > 0, -p_t, p_s) * e
    return r, p_s, p_t, e, diff


@triton.jit
def _jsd_logs(r, e, beta):
    """u_s = log(m / p_s), u_t = log(m / p_t), each from the expm1 of the bounded side."""
    u = _log1p(tl.where(r > 0, 1.0 - beta, beta) * e)
    u_s = tl.where(r > 0, u + r, u)
    return u_s, u_s - r


@triton.jit
def _distill_rows_kernel(
    Z, stride_z, ZT, stride_zt, IDS, WEIGHT, SCALE, stride_scale, LOSS, ENTROPY,
    V, inv_t, beta, hard_weight,
    MODE: tl.constexpr, HAS_HARD: tl.constexpr, HARD_SEPARATE: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t_row = ZT + row * stride_zt
    w = tl.load(WEIGHT + row)

    # Pass 1: online maxima, W, A (see the module docstring), the entropy sum and the hard labels' normalizer.
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    m_h = tl.full((), float("-inf"), tl.float32)
    sum_s = tl.zeros((), tl.float32)
    excess = tl.zeros((), tl.float32)
    sum_h = tl.zeros((), tl.float32)
    xs = tl.zeros((), tl.float32)
    k = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        raw = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        traw = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, raw * inv_t, float("-inf"))
        t = tl.where(mask, traw * inv_t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
        m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
        r_s = tl.exp(m_s - m_s_new)  # 0 on the first block (m_s = -inf)
        r_t = tl.exp(m_t - m_t_new)
        k_new = m_t_new - m_s_new
        e_s = tl.where(mask, tl.exp(s - m_s_new), 0.0)
        x = (traw - raw) * inv_t - k_new
        shift = tl.where(sum_s > 0.0, sum_s * r_s * _expm1(k - k_new), 0.0)  # the old terms' new shift
        excess = excess * r_t + shift + tl.sum(tl.where(mask, e_s * _expm1(x), 0.0), axis=0)
        if HAS_ENTROPY:  # sum e^(s - m_s) s, for the entropy lse_s - E_p_s[s]
            xs = xs * r_s + tl.sum(e_s * tl.where(mask, s, 0.0), axis=0)
        sum_s = sum_s * r_s + tl.sum(e_s, axis=0)
        m_s, m_t, k = m_s_new, m_t_new, k_new
        if HARD_SEPARATE:
            m_h, sum_h, _ = _online(m_h, sum_h, tl.where(mask, raw, float("-inf")))
    c1 = _log1p(excess / sum_s)
    sum_t = sum_s + excess
    lse_s = m_s + tl.log(sum_s)
    if HAS_ENTROPY:
        tl.store(ENTROPY + row, tl.where(w != 0.0, lse_s - xs / sum_s, 0.0))

    y = tl.load(IDS + row)
    hard = tl.zeros((), tl.float32)
    lse_h = lse_s
    if HARD_SEPARATE:
        m_h = tl.where(m_h == float("-inf"), 0.0, m_h)
        lse_h = m_h + tl.log(sum_h)
    if HAS_HARD:  # read before pass 2 may overwrite the row with the gradient
        hard = hard_weight * (lse_h - tl.load(z_row + y).to(tl.float32) * tl.where(HARD_SEPARATE, 1.0, inv_t))
    coef = w * tl.load(SCALE + row * stride_scale).to(tl.float32)

    # Pass 2: the loss as sums of non-negative terms (and, for beta = 0, the gradient p_s - p_t = -diff).
    loss = tl.zeros((), tl.float32)
    kl_s = tl.zeros((), tl.float32)
    kl_t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        raw = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        traw = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        r, p_s, p_t, e, diff = _terms(raw, traw, mask, inv_t, m_s, m_t, k, c1, sum_s, sum_t)
        if MODE == 0:  # KL(p_t || p_s) = sum p_t r - (p_t - p_s)
            loss += tl.sum(p_t * r - diff, axis=0)
            if COMPUTE_GRAD:
                _store_grad(z_row, cols, mask, raw, -diff, inv_t, coef, w, lse_h, y, hard_weight, HAS_HARD,
                            HARD_SEPARATE, Z)
        elif MODE == 1:  # KL(p_s || p_t) = sum (p_t - p_s) - p_s r
            loss += tl.sum(diff - p_s * r, axis=0)
        else:
            u_s, u_t = _jsd_logs(r, e, beta)
            kl_s += tl.sum(beta * diff - p_s * u_s, axis=0)
            kl_t += tl.sum((beta - 1.0) * diff - p_t * u_t, axis=0)
    if MODE == 2:
        loss = beta * kl_t + (1.0 - beta) * kl_s
    tl.store(LOSS + row, tl.where(w != 0.0, w * (loss + hard), 0.0))

    if COMPUTE_GRAD and MODE != 0:  # pass 3: dL/ds needs L (beta = 1) or KL(p_s || m)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            raw = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            traw = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            r, p_s, p_t, e, diff = _terms(raw, traw, mask, inv_t, m_s, m_t, k, c1, sum_s, sum_t)
            if MODE == 1:
                g = -p_s * (r + loss)
            else:
                u_s, u_t = _jsd_logs(r, e, beta)
                g = (beta - 1.0) * p_s * (u_s + kl_s)
            _store_grad(z_row, cols, mask, raw, g, inv_t, coef, w, lse_h, y, hard_weight, HAS_HARD, HARD_SEPARATE,
                        Z)


@triton.jit
def _store_grad(z_row, cols, mask, raw, g, inv_t, coef, w, lse_h, y, hard_weight, HAS_HARD: tl.constexpr,
                HARD_SEPARATE: tl.constexpr, Z):
    """dL/dz_s = coef (dL/ds / T + hard part), over the student logits in their dtype; ignored rows exactly 0."""
    g = g * inv_t
    if HAS_HARD:
        p_h = tl.exp(tl.where(HARD_SEPARATE, raw, raw * inv_t) - lse_h)
        g += hard_weight * (p_h - tl.where(cols == y, 1.0, 0.0))
    g = tl.where(w != 0.0, g * coef, 0.0)
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
        vocab, 1.0 / spec.temperature, beta, spec.hard_label_weight,
        MODE=mode, HAS_HARD=hard, HARD_SEPARATE=hard and spec.temperature != 1.0,
        HAS_ENTROPY=rows.entropy_sum is not None, COMPUTE_GRAD=compute_grad,
        BLOCK_V=_block_v(vocab), num_warps=8,
    )
    if rows.entropy_sum is not None:
        rows.entropy_sum += entropy.sum()
    return loss
