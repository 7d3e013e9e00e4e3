"""The `triton` backend's per-token row kernel: the twin of torch_impl.token_rows (same math, see there).

One program per row reads the chunk twice: pass 1 folds it into online statistics relative to the running
max m (S = sum e, T = sum e (x - m), Q = sum e^2, with e = exp(x - m)), the sum of x, the target's logit and
the max of the logits before the target (first-argmax rule for the top-1 hit); pass 2 (backward only)
overwrites the chunk with dL/dz in place. Under TRITON_INTERPRET=1 it runs on CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch_impl import STAT_COLUMNS, TokenRows, TokenSpec
from ..ce.triton_impl import _block_v, _transform


def working_bytes_per_logit(spec: TokenSpec, chunk_dtype: torch.dtype) -> int:
    return torch.finfo(chunk_dtype).bits // 8  # registers only, in place


@triton.jit
def _token_rows_kernel(
    Z, stride_z, IDS, SCALE, GRAD_H, STATS, LOSS,
    V, logit_scale, softcap, inv_t, eps,
    HAS_STATS: tl.constexpr, HAS_GRAD_H: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    target = tl.load(IDS + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t_sum = tl.zeros((), tl.float32)
    q = tl.zeros((), tl.float32)
    x_sum = tl.zeros((), tl.float32)
    before = tl.full((), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x, _ = _transform(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), logit_scale, softcap)
        x = x * inv_t
        x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        x = tl.where(mask, x, float("-inf"))
        before = tl.maximum(before, tl.max(tl.where(cols < target, x, float("-inf")), axis=0))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # old terms relative to the new max
        r = tl.exp(shift)
        e = tl.where(mask, tl.exp(x - m_new), 0.0)
        d = tl.where(mask, x - m_new, 0.0)
        t_sum = r * (t_sum + shift * s) + tl.sum(e * d, axis=0)
        s = s * r + tl.sum(e, axis=0)
        q = q * r * r + tl.sum(e * e, axis=0)
        m = m_new
    log_s = tl.log(s)
    x_t, _ = _transform(tl.load(z_row + target).to(tl.float32), logit_scale, softcap)
    x_t = x_t * inv_t
    lse = m + log_s
    log_prob = (1.0 - eps) * (x_t - lse) + eps * (x_sum / V - lse)
    entropy = log_s - t_sum / s
    tl.store(LOSS + row, -log_prob)
    if HAS_STATS:
        tl.store(STATS + row * 4 + 0, entropy)
        tl.store(STATS + row * 4 + 1, tl.log(q) - 2.0 * log_s)
        tl.store(STATS + row * 4 + 2, x_sum / V)
        tl.store(STATS + row * 4 + 3, tl.where((x_t >= m) & (x_t > before), 1.0, 0.0))
    if COMPUTE_GRAD:
        a = tl.load(SCALE + row).to(tl.float32)
        g_h = tl.zeros((), tl.float32)
        if HAS_GRAD_H:
            g_h = tl.load(GRAD_H + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x, t = _transform(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), logit_scale, softcap)
            x = x * inv_t
            p = tl.exp(x - m) / s
            g = a * (p - eps / V) - g_h * p * (x - lse + entropy)
            g -= tl.where(cols == target, a * (1.0 - eps), 0.0)
            g = g * inv_t
            if softcap > 0.0:
                g = g * (1.0 - t * t)
            tl.store(z_row + cols, (g * logit_scale).to(Z.dtype.element_ty), mask=mask)


def token_rows(z: torch.Tensor, rows: TokenRows, spec: TokenSpec, compute_grad: bool) -> torch.Tensor:
    """Same contract as torch_impl.token_rows: -log_prob per row; rows.stats filled; z overwritten by dL/dz."""
    n, vocab = z.shape
    assert z.stride(1) == 1, "logits chunk must be row-major (GEMM output)"
    loss = torch.empty(n, dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)
    if n == 0:
        return loss
    stats = rows.stats
    if stats is not None:
        assert stats.shape[1] == len(STAT_COLUMNS) and stats.is_contiguous()
    scale = rows.scale.float().contiguous()
    grad_h = rows.grad_entropy.float().contiguous() if rows.grad_entropy is not None else scale
    _token_rows_kernel[(n,)](
        z, z.stride(0), rows.ids[:, 0].contiguous(), scale, grad_h, stats if stats is not None else loss, loss,
        vocab, spec.logit_scale, spec.softcap if spec.softcap is not None else 0.0, 1.0 / spec.temperature,
        spec.label_smoothing, HAS_STATS=stats is not None, HAS_GRAD_H=rows.grad_entropy is not None,
        COMPUTE_GRAD=compute_grad, BLOCK_V=_block_v(vocab), num_warps=8,
    )
    return loss
