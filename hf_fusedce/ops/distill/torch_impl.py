"""Distillation loss and dL/dz_student for one chunk of logits rows, in plain PyTorch (the `torch` backend,
and the readable twin of triton_impl.distill_rows).

Per row, with s = z_s / T, t = z_t / T, log p = log_softmax, counted-token weight w and upstream factor c:
    beta = 0:  L = KL(p_t || p_s) = sum p_t (log p_t - log p_s)         dL/ds = p_s - p_t
    beta = 1:  L = KL(p_s || p_t) = sum p_s (log p_s - log p_t)         dL/ds = p_s (log p_s - log p_t - L)
    else:      m = (1-beta) p_s + beta p_t,  L = beta KL(p_t || m) + (1-beta) KL(p_s || m)
                                                                       dL/ds = (1-beta) p_s (log p_s - log m - KL(p_s || m))
    hard labels (weight h, temperature 1): L += h (lse(z_s) - z_s[y]),  dL/dz_s += h (softmax(z_s) - onehot(y))
    dL/dz_s = w c (dL/ds / T + hard part). No T^2 factor (TRL's convention).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..ce import torch_impl
from .spec import DistillSpec, TeacherRows


def working_bytes_per_logit(spec: DistillSpec, chunk_dtype: torch.dtype) -> int:
    """The student chunk in its dtype and the chunk's teacher logits (float32, float64 beside a float64 student):
    the row math works on row blocks (torch_impl.ROW_BLOCK_BYTES of float32 each), whose buffers are a scratch."""
    own = torch.finfo(chunk_dtype).bits // 8
    return own + max(own, 4)


def distill_rows(z: torch.Tensor, rows: TeacherRows, spec: DistillSpec, compute_grad: bool) -> torch.Tensor:
    """Returns loss_rows in float32; if compute_grad, z now holds d(row_scale * loss)/dz_student.
    The teacher's logits of the whole chunk come from one GEMM (a large GEMM runs near the BLAS rate: on CPU,
    64-row GEMMs took 1.8x the time of 512-row ones at D=512, V=32000), then the row math goes block by block."""
    return _blockwise(z, dataclasses.replace(rows, logits=rows.teacher_logits()), spec, compute_grad)


def _acc_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, torch.float32)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij per row. A product then torch's cascade sum: a batched GEMV (bmm) accumulates V terms one
    after the other and lost 1e-5 relative at V=32000."""
    return (a * b).sum(1)


def _scaled_log_softmax(x: torch.Tensor, inv_t: float, acc: torch.dtype) -> torch.Tensor:
    x = x.to(acc)
    return torch.log_softmax(x.mul_(inv_t) if inv_t != 1.0 else x, dim=1)


@torch_impl.in_row_blocks
def _blockwise(z: torch.Tensor, rows: TeacherRows, spec: DistillSpec, compute_grad: bool, scratch) -> torch.Tensor:
    """distill_rows on a block of rows whose teacher logits are given (its temporaries are its own: `scratch` is
    not used). Few, large ops: on a busy CPU every op pays a thread barrier, so the op count matters as much as
    the passes."""
    acc = _acc_dtype(z)
    inv_t = 1.0 / spec.temperature
    hard_loss, hard_p = _hard_label_part(z, rows, spec, acc, compute_grad)
    log_ps = _scaled_log_softmax(z, inv_t, acc)  # z itself is scaled in place when float32: only dL/dz goes there
    log_pt = _scaled_log_softmax(rows.teacher_logits(), inv_t, acc)
    if rows.entropy_sum is not None:  # -sum p_s log p_s of the counted rows
        entropy = _row_dot(log_ps.exp(), log_ps).neg_()
        rows.entropy_sum += torch.where(rows.weight != 0, entropy, torch.zeros_like(entropy)).sum()
    out = z if z.dtype == acc else None  # the gradient is written straight into a float32 chunk
    loss, grad = _divergence(log_ps, log_pt, spec.beta, compute_grad, out)
    if hard_loss is not None:
        loss = loss + spec.hard_label_weight * hard_loss
    active = rows.weight != 0
    loss = torch.where(active, rows.weight * loss, torch.zeros_like(loss))
    if not compute_grad:
        return loss
    coef = torch.where(active, rows.weight * rows.scale.to(acc), torch.zeros_like(loss))[:, None]
    grad.mul_(coef * inv_t)
    if hard_p is not None:  # h (softmax(z) - onehot(y)) at temperature 1
        grad.add_(hard_p.mul_(spec.hard_label_weight * coef))
        grad.scatter_add_(1, rows.ids, -spec.hard_label_weight * coef)
    if grad.data_ptr() != z.data_ptr():
        z.copy_(grad)
    return loss


def _divergence(log_ps, log_pt, beta, compute_grad, out):
    """Per-row loss and (if asked) dL/ds, written into `out` when given (else into a consumed input).
    log_ps and log_pt are consumed."""
    if beta == 0.0:
        p_t = log_pt.exp()
        loss = _row_dot(p_t, log_pt.sub_(log_ps))
        if not compute_grad:
            return loss, None
        return loss, torch.exp(log_ps, out=out if out is not None else log_ps).sub_(p_t)
    if beta == 1.0:
        p_s = log_ps.exp()
        log_ratio = log_ps.sub_(log_pt)
        loss = _row_dot(p_s, log_ratio)
        if not compute_grad:
            return loss, None
        return loss, torch.mul(log_ratio.sub_(loss[:, None]), p_s, out=out if out is not None else p_s)
    log_m = torch.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
    kl_t = _row_dot(log_pt.exp(), log_pt.sub_(log_m))
    p_s = log_pt.copy_(log_ps).exp_()  # log_pt's buffer is free now
    log_ratio_s = log_ps.sub_(log_m)
    kl_s = _row_dot(p_s, log_ratio_s)
    loss = beta * kl_t + (1.0 - beta) * kl_s
    if not compute_grad:
        return loss, None
    grad = torch.mul(log_ratio_s.sub_(kl_s[:, None]), p_s, out=out if out is not None else p_s)
    return loss, grad.mul_(1.0 - beta)


def _hard_label_part(z, rows, spec, acc, compute_grad):
    """CE(z_s at temperature 1, y) per row, and softmax(z_s) for its gradient (None when not needed)."""
    if not spec.hard_label_weight:
        return None, None
    x = z.to(acc)
    lse = torch.logsumexp(x, 1)
    loss = lse - x.gather(1, rows.ids)[:, 0]
    probs = None
    if compute_grad:
        probs = x.sub_(lse[:, None]).exp_() if x.data_ptr() != z.data_ptr() else (x - lse[:, None]).exp_()
    return loss, probs
