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

import functools

import torch

from .spec import RowInputs, LossSpec

# A bf16/fp16 chunk is worked on in row blocks of about ROW_BLOCK_BYTES of float32: each block's float32 copy
# (and tanh) stays in cache through the row's passes, and the chunk budget pays only the chunk's own 2 bytes per
# logit (not 2 + 4), so a chunk holds 3x the rows and the GEMMs see fewer, larger chunks. Measured on the CPU
# (N=2048 D=512 V=32000 bf16, fwd+bwd): 820 ms whole-chunk float32 copies -> 590 ms, the GEMMs' own time.
ROW_BLOCK_BYTES = 4 << 20


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float32, torch.float64)


def working_bytes_per_logit(spec: LossSpec, chunk_dtype: torch.dtype) -> int:
    """Bytes per logit the chunk budget pays: the chunk itself, and for a float32/64 chunk the tanh values kept
    beside it under softcap. A low-precision chunk's float32 work is a fixed scratch of a row block or two."""
    own = torch.finfo(chunk_dtype).bits // 8
    if is_low_precision(chunk_dtype) or spec.softcap is None:
        return own
    return own + 4


def in_row_blocks(row_fn):
    """row_fn(z, rows, spec, compute_grad) -> per-row outputs, applied block by block to a low-precision chunk
    (rows are independent, so the results are the same); a float32/64 chunk is handed over whole."""

    @functools.wraps(row_fn)
    def run(z: torch.Tensor, rows, spec, compute_grad: bool):
        block = max(1, ROW_BLOCK_BYTES // (4 * max(1, z.shape[1])))
        if not is_low_precision(z.dtype) or z.shape[0] <= block:
            return row_fn(z, rows, spec, compute_grad)
        return torch.cat([row_fn(z[i:i + block], rows.select(slice(i, i + block)), spec, compute_grad)
                          for i in range(0, z.shape[0], block)])

    return run


def transform_(z: torch.Tensor, spec: LossSpec):
    """(x, tanh): x = softcap * tanh(scale * z / softcap) (or scale * z) in float32 at least, in place when z is;
    tanh kept for the chain rule (None without softcap)."""
    x = z.float() if is_low_precision(z.dtype) else z
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


@in_row_blocks
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
