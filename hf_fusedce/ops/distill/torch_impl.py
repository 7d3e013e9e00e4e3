"""Distillation loss and dL/dz_student for one chunk of logits rows, in plain PyTorch (the `torch` backend,
and the readable twin of triton_impl.distill_rows).

Per row, with s = z_s / T, t = z_t / T, counted-token weight w and upstream factor c:
    beta = 0:  L = KL(p_t || p_s)                                      dL/ds = p_s - p_t
    beta = 1:  L = KL(p_s || p_t)                                      dL/ds = p_s (log p_s - log p_t - L)
    else:      m = (1-beta) p_s + beta p_t,  L = beta KL(p_t || m) + (1-beta) KL(p_s || m)
                                                                       dL/ds = (1-beta) p_s (log p_s - log m - KL(p_s || m))
    hard labels (weight h, temperature 1): L += h (lse(z_s) - z_s[y]),  dL/dz_s += h (softmax(z_s) - onehot(y))
    dL/dz_s = w c (dL/ds / T + hard part). No T^2 factor (TRL's convention).

How, in float32 as close to float64 as the logits allow. The textbook sum p_t (log p_t - log p_s) forms each log p
as x - lse: near-equal distributions over V = 32000 have lse ~ log V ~ 10 and log p_t - log p_s ~ 0.1, so the
lse's rounding (1e-6) is ~1e-5 of every term and of the loss (the materialized computation's error). Instead:
    k = max t - max s;  x = (z_t - z_s) / T - k;  W = sum e^(s - max s);  A = sum e^(s - max s) expm1(x)
    r = log p_t - log p_s = x - log1p(A / W)       (A / W is small where it matters: no lse difference)
    p_s = e^(s - max s) / W,  p_t = e^(t - max t) / (W + A),  p_t - p_s = p_s expm1(r) = -p_t expm1(-r)
(the expm1 of -|r| is in (-1, 0]: nothing overflows), and every divergence is summed as non-negative terms,
KL(P || Q) = sum P (e^y - 1 - y) with y = log Q / P, whose total has no cancellation. The error is then the
rounding of the logits themselves (measured in tests/ops/test_distillation.py against float64).
"""
from __future__ import annotations

import dataclasses

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


@torch_impl.in_row_blocks
def _blockwise(z: torch.Tensor, rows: TeacherRows, spec: DistillSpec, compute_grad: bool, scratch) -> torch.Tensor:
    """distill_rows on a block of rows whose teacher logits are given (its temporaries are its own: `scratch` is
    not used)."""
    acc = _acc_dtype(z)
    inv_t = 1.0 / spec.temperature
    hard_loss, hard_p = _hard_label_part(z, rows, spec, acc, compute_grad)
    parts = _log_ratio(z, rows.teacher_logits(), inv_t, acc, rows.entropy_sum is not None)
    if rows.entropy_sum is not None:
        rows.entropy_sum += torch.where(rows.weight != 0, parts.entropy, torch.zeros_like(parts.entropy)).sum()
    loss, grad = _divergence(parts, spec.beta, compute_grad)
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
    z.copy_(grad)
    return loss


@dataclasses.dataclass
class LogRatio:
    """Per row block: r = log p_t - log p_s (exact to the rounding of the logits' difference), p_s, p_t,
    e = expm1(-|r|), diff = p_t - p_s without cancellation, and the student's entropy (None unless asked)."""

    r: torch.Tensor
    p_s: torch.Tensor
    p_t: torch.Tensor
    e: torch.Tensor
    diff: torch.Tensor
    entropy: torch.Tensor | None


def _log_ratio(z, zt, inv_t, acc, with_entropy) -> LogRatio:
    """The module docstring's r, p_s, p_t, p_t - p_s (never log p = x - lse, see there)."""
    s, t = z.to(acc, copy=True).mul_(inv_t), zt.to(acc, copy=True).mul_(inv_t)
    m_s, m_t = s.amax(1, keepdim=True), t.amax(1, keepdim=True)
    x = torch.sub(zt.to(acc), z.to(acc)).mul_(inv_t).sub_(m_t - m_s)  # t - s - k, k = m_t - m_s
    w = s.sub_(m_s).exp()  # exp(s - m_s) <= 1; and w e^x = exp(t - m_t) <= 1: nothing overflows
    total = w.sum(1, keepdim=True)
    entropy = total.log()[:, 0] - _row_dot(w, s) / total[:, 0] if with_entropy else None  # s holds s - m_s
    excess = _row_dot(w, torch.expm1(x)).unsqueeze(1)  # sum w (e^x - 1): the teacher's total minus the student's
    r = x.sub_(torch.log1p(excess / total))  # log p_t - log p_s = x - log(1 + excess / total)
    p_s = w.div_(total)
    p_t = t.sub_(m_t).exp_().div_(total + excess)
    e = torch.expm1(r.abs().neg_())  # in (-1, 0]: p_t - p_s = p_s e (r <= 0) = -p_t e (r > 0)
    diff = torch.where(r > 0, p_t.neg(), p_s).mul_(e)
    return LogRatio(r, p_s, p_t, e, diff, entropy)


def _divergence(lr: LogRatio, beta: float, compute_grad: bool):
    """Per-row loss and (if asked) dL/ds. Each loss term is written as a non-negative term of the form
    p (e^y - 1 - y) (KL(P || Q) = E_P[e^y - 1 - y], y = log Q/P): a sum of non-negative terms has no cancellation,
    where the textbook sum p (log p - log q) adds terms of both signs to a small total."""
    if beta == 0.0:  # KL(p_t || p_s) = sum p_t r - (p_t - p_s); dL/ds = p_s - p_t
        loss = (lr.p_t * lr.r).sub_(lr.diff).sum(1)
        return loss, (lr.diff.neg_() if compute_grad else None)
    if beta == 1.0:  # KL(p_s || p_t) = sum (p_t - p_s) - p_s r; dL/ds = -p_s (r + L)
        loss = (lr.p_s * lr.r).neg_().add_(lr.diff).sum(1)
        return loss, (lr.r.add_(loss[:, None]).mul_(lr.p_s).neg_() if compute_grad else None)
    # m = p_s + beta (p_t - p_s). u = log(m / p_s) = log1p(beta e^... ) with the bounded side's expm1:
    # r <= 0: u_s = log1p(beta e), r > 0: u_t = log1p((1 - beta) e), and u_s = u_t + r.
    positive = lr.r > 0
    u_s = torch.log1p(lr.e.mul_(torch.where(positive, 1.0 - beta, beta)))
    u_s = torch.where(positive, u_s + lr.r, u_s)
    u_t = u_s - lr.r
    kl_s = (lr.diff * beta).sub_(lr.p_s * u_s).sum(1)  # KL(p_s || m) = sum beta (p_t - p_s) - p_s u_s
    kl_t = (lr.diff * (beta - 1.0)).sub_(lr.p_t * u_t).sum(1)  # KL(p_t || m) = sum (1-beta)(p_s - p_t) - p_t u_t
    loss = beta * kl_t + (1.0 - beta) * kl_s
    if not compute_grad:
        return loss, None
    return loss, u_s.add_(kl_s[:, None]).mul_(lr.p_s).mul_(beta - 1.0)  # (1-beta) p_s (-u_s - KL(p_s || m))


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
