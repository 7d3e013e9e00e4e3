"""The loss written out in full, logits materialized: the definition every backend must match.

Used as the float64 oracle in the tests and readable as the specification of every option.
Never used for training (it holds the whole [tokens x vocab] logits).
"""
from __future__ import annotations

import torch


def transform_logits(raw: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """z = softcap * tanh(logit_scale * raw / softcap), raw = W h + b."""
    z = raw * logit_scale if logit_scale != 1.0 else raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    token_weights: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable, materialized; computes in the dtype it is given (pass float64 for an oracle).

    logits_dtype: upcast the logits after the GEMM, as transformers does (bf16 GEMM, float32 softmax).
    """
    d = hidden.shape[-1]
    raw = torch.nn.functional.linear(hidden.reshape(-1, d), weight, bias)  # as lm_head: bias added before rounding
    if logits_dtype is not None:
        raw = raw.to(logits_dtype)
    return reference_cross_entropy_on_logits(
        raw, targets, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
        token_weights=token_weights, target_probs=target_probs)


def reference_cross_entropy_on_logits(raw: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                                      reduction: str = "mean", num_items_in_batch=None, label_smoothing: float = 0.0,
                                      z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
                                      token_weights: torch.Tensor | None = None,
                                      target_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss from the raw logits (tokens x vocab, hidden @ weight.T + bias) instead of the head's inputs:
    for a reference whose logits were built another way (e.g. a vocabulary slice at a time)."""
    soft = target_probs is not None
    lead = targets.shape[:-1] if soft else targets.shape
    z = transform_logits(raw, logit_scale, softcap)
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    vocab = z.shape[-1]
    if soft:
        ids = targets.reshape(-1, targets.shape[-1])
        tau = target_probs.reshape(ids.shape).to(logp.dtype)
        keep = ids != ignore_index
        tau = torch.where(keep, tau, torch.zeros_like(tau))
        picked = logp.gather(1, torch.where(keep, ids, torch.zeros_like(ids)))
        nll = -(tau * picked).sum(-1)
        valid = keep.any(-1)
    else:
        ids = targets.reshape(-1)
        valid = ids != ignore_index
        safe = torch.where(valid, ids, torch.zeros_like(ids))
        nll = -logp.gather(1, safe[:, None]).squeeze(1)
    per_token = (1.0 - label_smoothing) * nll
    if label_smoothing:
        per_token = per_token - label_smoothing * logp.sum(-1) / vocab
    if z_loss:
        per_token = per_token + z_loss * lse.square()
    if token_weights is not None:
        per_token = per_token * token_weights.reshape(-1).to(per_token.dtype)
    return reduce_per_token(per_token, valid, lead, reduction, num_items_in_batch)


def reduce_per_token(per_token, valid, lead, reduction, num_items_in_batch):
    """Zeros at ignored tokens, then none (shape `lead`) / sum / sum over num_items_in_batch / mean over valid."""
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token.reshape(lead)
    total = per_token.sum()
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
        return total / denom.clamp(min=1)
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def reference_token_stats(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None, logit_scale=1.0,
                          temperature=1.0, label_smoothing=0.0) -> dict:
    """`fused_linear_token_stats` materialized (differentiable, in the dtype it is given): every output."""
    d = hidden.shape[-1]
    raw = torch.nn.functional.linear(hidden.reshape(-1, d), weight, bias)
    x = transform_logits(raw, logit_scale, softcap) / temperature
    logp = torch.log_softmax(x, dim=-1)
    ids = targets.reshape(-1)
    valid = ids != ignore_index
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    picked = logp.gather(1, safe[:, None]).squeeze(1)
    log_probs = (1.0 - label_smoothing) * picked + label_smoothing * logp.mean(-1)
    p = logp.exp()
    out = {
        "log_probs": log_probs,
        "entropy": -(p * logp).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2.0 * logp, dim=-1),
        "mean_logits": x.mean(-1),
        "is_top1": x.argmax(-1) == safe,
    }
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return {k: (torch.where(valid, v, False) if v.dtype == torch.bool else torch.where(valid, v, zero)
                ).reshape(targets.shape) for k, v in out.items()}
