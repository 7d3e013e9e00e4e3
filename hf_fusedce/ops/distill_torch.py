"""Distillation loss and dL/dz_student for one chunk of logits rows, in plain PyTorch (the `torch` backend,
and the readable twin of distill_triton.distill_rows).

Per row, with s = z_s / T, t = z_t / T, log p = log_softmax, counted-token weight w and upstream factor c:
    beta = 0:  L = KL(p_t || p_s) = sum p_t (log p_t - log p_s)         dL/ds = p_s - p_t
    beta = 1:  L = KL(p_s || p_t) = sum p_s (log p_s - log p_t)         dL/ds = p_s (log p_s - log p_t - L)
    else:      m = (1-beta) p_s + beta p_t,  L = beta KL(p_t || m) + (1-beta) KL(p_s || m)
                                                                       dL/ds = (1-beta) p_s (log p_s - log m - KL(p_s || m))
    hard labels (weight h, temperature 1): L += h (lse(z_s) - z_s[y]),  dL/dz_s += h (softmax(z_s) - onehot(y))
    dL/dz_s = w c (dL/ds / T + hard part). No T^2 factor (TRL's convention).
"""
from __future__ import annotations

import math

import torch

from .distill_spec import DistillSpec, TeacherRows


def working_bytes_per_logit(spec: DistillSpec, chunk_dtype: torch.dtype) -> int:
    """The student chunk in its dtype plus float32 buffers: log p_s, log p_t, one product (the JSD: also log m
    and p_t), the temperature-1 softmax for hard labels; upcast copies when the chunk is not float32."""
    own = torch.finfo(chunk_dtype).bits // 8
    fp32_buffers = 4 if spec.beta in (0.0, 1.0) else 6  # the JSD adds log m and its temporaries
    fp32_buffers += 1 if spec.hard_label_weight else 0
    fp32_buffers += 0 if chunk_dtype in (torch.float32, torch.float64) else 2
    return own + 4 * fp32_buffers


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In place: x - max - log(sum exp(x - max)); an all -inf row stays finite-safe like the CE kernel."""
    row_max = x.amax(1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    x.sub_(row_max)
    return x.sub_(x.exp().sum(1, keepdim=True).log_())


def _acc_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, torch.float32)


def distill_rows(z: torch.Tensor, rows: TeacherRows, spec: DistillSpec, compute_grad: bool) -> torch.Tensor:
    """Returns loss_rows in float32; if compute_grad, z now holds d(row_scale * loss)/dz_student."""
    acc = _acc_dtype(z)
    inv_t = 1.0 / spec.temperature
    hard_loss, hard_p = _hard_label_part(z, rows, spec, acc, compute_grad)
    s = z.to(acc)  # aliases z when z is float32: z is only needed again as the gradient's destination
    log_ps = _log_softmax_(s.mul_(inv_t) if inv_t != 1.0 else s)
    log_pt = _log_softmax_(rows.teacher_logits().to(acc).mul_(inv_t))
    if rows.entropy_sum is not None:  # -sum p_s log p_s of the counted rows
        entropy = (log_ps.exp() * log_ps).sum(1).neg_()
        rows.entropy_sum += torch.where(rows.weight != 0, entropy, torch.zeros_like(entropy)).sum()
    loss, grad_s = _divergence(log_ps, log_pt, spec.beta, compute_grad)
    if hard_loss is not None:
        loss = loss + spec.hard_label_weight * hard_loss
    active = rows.weight != 0
    loss = torch.where(active, rows.weight * loss, torch.zeros_like(loss))
    if not compute_grad:
        return loss
    coef = torch.where(active, rows.weight * rows.scale.to(acc), torch.zeros_like(loss))[:, None]
    grad_s.mul_(coef * inv_t)
    if hard_p is not None:  # h (softmax(z) - onehot(y)) at temperature 1
        grad_s.add_(hard_p.mul_(spec.hard_label_weight * coef))
        grad_s.scatter_add_(1, rows.ids, -spec.hard_label_weight * coef)
    if grad_s.data_ptr() != z.data_ptr():
        z.copy_(grad_s)
    return loss


def _divergence(log_ps, log_pt, beta, compute_grad):
    """Per-row loss and (if asked) dL/ds in a fresh or reused (n, V) buffer. log_ps/log_pt may be consumed."""
    if beta == 0.0:
        p_t = log_pt.exp()
        loss = (p_t * (log_pt - log_ps)).sum(1)
        return loss, (log_ps.exp_().sub_(p_t) if compute_grad else None)
    if beta == 1.0:
        p_s = log_ps.exp()
        log_ratio = log_ps.sub_(log_pt)
        loss = (p_s * log_ratio).sum(1)
        return loss, (p_s.mul_(log_ratio.sub_(loss[:, None])) if compute_grad else None)
    log_m = torch.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
    kl_t = (log_pt.exp() * log_pt.sub_(log_m)).sum(1)
    p_s = log_ps.exp()
    log_ratio_s = log_ps.sub_(log_m)
    kl_s = (p_s * log_ratio_s).sum(1)
    loss = beta * kl_t + (1.0 - beta) * kl_s
    if not compute_grad:
        return loss, None
    return loss, p_s.mul_(log_ratio_s.sub_(kl_s[:, None])).mul_(1.0 - beta)


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
