"""The distillation loss written out with both models' logits materialized: the definition every backend must
match (float64 oracle in the tests, the "materialized" line of the bench). Never used for training."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ce.reference import reduce_per_token


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Per row: beta=0 KL(p_t || p_s), beta=1 KL(p_s || p_t), else beta KL(p_t || m) + (1-beta) KL(p_s || m) with
    m = (1-beta) p_s + beta p_t (TRL's generalized JSD). Logits already divided by the temperature."""
    log_ps = torch.log_softmax(student_logits, -1)
    log_pt = torch.log_softmax(teacher_logits, -1)
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def reference_linear_distillation(
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None, *, beta=0.0, temperature=1.0,
    ignore_index=-100, reduction="mean", num_items_in_batch=None, hard_label_weight=0.0, student_bias=None,
    teacher_bias=None, logits_dtype=None,
) -> torch.Tensor:
    """Differentiable and materialized, in the dtype it is given (float64 for the oracle). logits_dtype upcasts
    both models' logits after their GEMMs (a low-precision model run as transformers runs it)."""
    lead = student_hidden.shape[:-1]
    zs = F.linear(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    zt = F.linear(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias)
    if logits_dtype is not None:
        zs, zt = zs.to(logits_dtype), zt.to(logits_dtype)
    zt = zt.to(zs.dtype)
    per_token = generalized_jsd(zs / temperature, zt / temperature, beta)
    if targets is None:
        valid = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    else:
        ids = targets.reshape(-1)
        valid = ids != ignore_index
        if hard_label_weight:
            safe = torch.where(valid, ids, torch.zeros_like(ids)).long()
            per_token = per_token + hard_label_weight * F.cross_entropy(zs, safe, reduction="none")
    return reduce_per_token(per_token, valid, lead, reduction, num_items_in_batch)
