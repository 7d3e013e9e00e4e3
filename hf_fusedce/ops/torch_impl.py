"""Loss and dL/dlogits for one chunk of logits rows, in plain PyTorch.

This is the `torch` backend's row kernel and the readable twin of `triton_impl.ce_rows`: both take a chunk of
raw logits z = W h + b (any float dtype), compute per-row loss in float32, and, when asked,
overwrite the chunk in place with the gradient of (row_scale * loss) with respect to the raw logits.

Per row t with target ids k, probabilities tau_k (one-hot: one id, tau=1), smoothing eps, z-loss c, weight w:
    x      = softcap * tanh(scale * z / softcap)          (or scale * z)
    loss_t = w * [(1-eps) * (T lse - sum_k tau_k x_k) + eps * (lse - mean_j x_j) + c lse^2],  T = sum_k tau_k
    dL/dx  = w * [((1-eps) T + eps + 2 c lse) p - (1-eps) tau - eps / V]
    dL/dz  = dL/dx * scale * (1 - tanh^2)                  (softcap chain rule)
"""
from __future__ import annotations

import torch

from .spec import RowInputs, LossSpec

# float32 working buffers alive per logit while a chunk is processed (on top of the chunk itself).
def working_bytes_per_logit(spec: LossSpec, chunk_dtype: torch.dtype) -> int:
    own = torch.finfo(chunk_dtype).bits // 8
    fp32_copies = 0 if chunk_dtype in (torch.float32, torch.float64) else 1
    if spec.softcap is not None:
        fp32_copies += 1  # tanh values kept for the chain rule beside the probabilities
    return own + 4 * fp32_copies


def transform_(z: torch.Tensor, spec: LossSpec):
    """(x, tanh): x = softcap * tanh(scale * z / softcap) (or scale * z) in float32 at least, in place when z is;
    tanh kept for the chain rule (None without softcap)."""
    x = z if z.dtype in (torch.float32, torch.float64) else z.float()
    if spec.logit_scale != 1.0:
        x.mul_(spec.logit_scale)
    tanh = None
    if spec.softcap is not None:
        tanh = x.div_(spec.softcap).tanh_()
        x = tanh * spec.softcap  # new buffer: tanh is kept for the chain rule
    return x, tanh


def weighted_row_loss(log_sum, tau_sum, tau_dot_gap, mean_gap, lse, rows: RowInputs, spec: LossSpec):
    """(loss, active) per row from the row statistics (see the module docstring); zero where the weight is 0.
    tau_sum*lse - sum tau x == tau_sum*log_sum + sum tau (max - x): exact for large logits."""
    eps, zl = spec.label_smoothing, spec.z_loss
    loss = (1.0 - eps) * (tau_sum * log_sum + tau_dot_gap)
    if eps:
        loss = loss + eps * (log_sum + mean_gap)
    if zl:
        loss = loss + zl * lse.square()
    active = rows.weight != 0
    return torch.where(active, rows.weight * loss, torch.zeros_like(loss)), active


def to_raw_grad_(g: torch.Tensor, z: torch.Tensor, tanh, spec: LossSpec) -> None:
    """dL/dx -> dL/dz through softcap and scale, left in z."""
    if tanh is not None:
        g.mul_(tanh.square_().neg_().add_(1.0))
    if spec.logit_scale != 1.0:
        g.mul_(spec.logit_scale)
    if g is not z:  # identity, not data_ptr: torch.compile traces it
        z.copy_(g)


def ce_rows(z: torch.Tensor, rows: RowInputs, spec: LossSpec, compute_grad: bool) -> torch.Tensor:
    """Returns loss_rows in float32; if compute_grad, z now holds d(row_scale*loss)/dz."""
    x, tanh = transform_(z, spec)
    ids, tau = rows.ids, rows.probs  # (n, K); ignored entries have id 0 and tau 0
    eps, zl, vocab = spec.label_smoothing, spec.z_loss, x.shape[1]
    row_max = x.amax(1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    x.sub_(row_max[:, None])  # shifted logits: the terms below never subtract two large numbers
    tau_sum = tau.sum(1)
    tau_dot_gap = -(tau * x.gather(1, ids)).sum(1)  # sum_k tau_k (max - x_k) >= 0
    mean_gap = -x.mean(1) if eps else None
    p = x.exp_()  # x is consumed: from here on it holds exp(x - max)
    sum_exp = p.sum(1)
    log_sum = sum_exp.log()
    lse = row_max + log_sum
    loss, active = weighted_row_loss(log_sum, tau_sum, tau_dot_gap, mean_gap, lse, rows, spec)
    if not compute_grad:
        return loss
    coef = torch.where(active, rows.weight * rows.scale, torch.zeros_like(loss))
    # softmax = exp(x - max) / sum_exp (not exp(x - lse): lse's rounding would dominate p ~ 1 at large logits)
    p.mul_(((1.0 - eps) * tau_sum + eps + 2.0 * zl * lse).mul_(coef).div_(sum_exp)[:, None])
    p.scatter_add_(1, ids, -(1.0 - eps) * tau * coef[:, None])
    if eps:
        p.sub_((eps / vocab) * coef[:, None])
    to_raw_grad_(p, z, tanh, spec)
    return loss
