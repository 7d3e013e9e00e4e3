"""Per-token statistics of one chunk of logits rows, in plain PyTorch (the `torch` backend's row function).

Plugged into the shared chunk loop (autograd.chunked_pass) in place of the cross-entropy row kernel; it is
the readable twin of `triton_impl` here. Per row t with target k, smoothing eps, vocabulary V:

    x        = softcap * tanh(scale * z / softcap) / T          (or scale * z / T)
    p        = softmax(x),  q = (1 - eps) onehot(k) + eps / V  (q = onehot(k) without smoothing)
    log_prob = sum_j q_j log p_j          (the target's log-probability; eps > 0: minus the smoothed CE)
    entropy  = -sum_j p_j log p_j = log S - sum_j e_j (x_j - m) / S,   e = exp(x - m), S = sum e
    log_sum_sq_probs = log sum_j p_j^2,  mean_logits = mean_j x_j,  is_top1 = (first argmax of x == k)

The row "loss" handed to the loop is -log_prob. With compute_grad the chunk is overwritten by
    dL/dx_j = a (p_j - q_j) - g_H p_j (log p_j + H)        a = rows.scale = -dL/dlog_prob, g_H = dL/dH
then chained through 1/T, the cap (1 - tanh^2) and the scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ce.spec import RowInputs
from ..ce.torch_impl import Scratch, in_row_blocks, transform_

# Columns of the per-row statistics buffer.
STAT_COLUMNS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class TokenSpec:
    """Options of the per-token op (the Plan's spec)."""

    softcap: float | None = None
    logit_scale: float = 1.0
    temperature: float = 1.0
    label_smoothing: float = 0.0
    stats: frozenset = frozenset()  # which of STAT_COLUMNS to compute


@dataclass
class TokenRows(RowInputs):
    """RowInputs plus the per-row outputs written by the row function and the entropy's upstream gradient.

    stats:        (n, len(STAT_COLUMNS)) float buffer the forward fills (None in the backward)
    grad_entropy: (n,) dL/dentropy, or None when the entropy gets no gradient
    """

    stats: torch.Tensor | None = None
    grad_entropy: torch.Tensor | None = None

    def select(self, index) -> "TokenRows":
        base = RowInputs.select(self, index)
        pick = (lambda t: None if t is None else t[index]) if isinstance(index, slice) else (
            lambda t: None if t is None else t.index_select(0, index))
        return TokenRows(base.ids, base.probs, base.weight, base.scale, pick(self.stats), pick(self.grad_entropy))


def working_bytes_per_logit(spec: TokenSpec, chunk_dtype: torch.dtype) -> int:
    """The chunk itself: it is worked on in row blocks (torch_impl.in_row_blocks), its float32 work is a scratch."""
    return torch.finfo(chunk_dtype).bits // 8


def _transform(z, spec: TokenSpec, scratch):
    """x (float32 or float64, possibly z itself) and the tanh values kept for the chain rule: the CE row
    function's transform, then the temperature."""
    x, tanh = transform_(z, spec, scratch)
    if spec.temperature != 1.0:
        x.div_(spec.temperature)
    return x, tanh


@in_row_blocks
def token_rows(z: torch.Tensor, rows: TokenRows, spec: TokenSpec, compute_grad: bool, scratch: Scratch):
    """Returns -log_prob per row (float32); fills rows.stats; if compute_grad, z now holds dL/dz."""
    x, tanh = _transform(z, spec, scratch)
    ids = rows.ids[:, :1]
    eps, vocab = spec.label_smoothing, x.shape[1]
    if rows.stats is not None:
        _top1_and_mean(x, ids, spec, rows.stats)
    m = x.amax(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    x.sub_(m[:, None])  # shifted: no term below subtracts two large numbers
    e = torch.exp(x, out=scratch("e", x.shape[0]))
    s = e.sum(1)
    log_s = s.log()
    log_prob = (1.0 - eps) * (x.gather(1, ids)[:, 0] - log_s)
    if eps:
        log_prob = log_prob + eps * (x.mean(1) - log_s)
    need_entropy = "entropy" in spec.stats or (compute_grad and rows.grad_entropy is not None)
    entropy = log_s - torch.einsum("ij,ij->i", e, x) / s if need_entropy else None
    if rows.stats is not None:
        if "entropy" in spec.stats:
            rows.stats[:, 0] = entropy
        if "log_sum_sq_probs" in spec.stats:
            rows.stats[:, 1] = torch.einsum("ij,ij->i", e, e).log() - 2.0 * log_s
    if not compute_grad:
        return -log_prob
    p = e.div_(s[:, None])
    a = rows.scale.to(x.dtype)
    if rows.grad_entropy is not None:  # x becomes -g_H p (log p + H), log p = x - log S
        x.add_((entropy - log_s)[:, None]).mul_(p).mul_(-rows.grad_entropy.to(x.dtype)[:, None])
        x.addcmul_(p, a[:, None])
    else:
        torch.mul(p, a[:, None], out=x)
    x.scatter_add_(1, ids, -(1.0 - eps) * a[:, None])
    if eps:
        x.sub_((eps / vocab) * a[:, None])
    _chain_rule(x, tanh, spec)
    if x.data_ptr() != z.data_ptr():
        z.copy_(x)
    return -log_prob


def _top1_and_mean(x, ids, spec: TokenSpec, stats):
    if "mean_logits" in spec.stats:
        stats[:, 2] = x.mean(1)
    if "is_top1" in spec.stats:  # argmax returns the first maximum: a tie with an earlier token is not a hit
        stats[:, 3] = (x.argmax(1) == ids[:, 0]).to(stats.dtype)


def _chain_rule(g, tanh, spec: TokenSpec):
    if spec.temperature != 1.0:
        g.div_(spec.temperature)
    if tanh is not None:
        g.mul_(tanh.square_().neg_().add_(1.0))
    if spec.logit_scale != 1.0:
        g.mul_(spec.logit_scale)
