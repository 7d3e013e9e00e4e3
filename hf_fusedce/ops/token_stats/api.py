"""`fused_linear_token_stats`: per-token log-probability of the target (and entropy, top-1 hit, ...) of
softmax(transform(hidden @ weight.T + bias)), chunk by chunk, never materializing the [tokens x vocab] logits.

What policy-gradient and preference objectives (TRL's fused LM head protocol) read per token. Gradients flow
through `log_probs` and `entropy`; the other statistics are for metrics and carry none. The chunk loop is the
cross-entropy op's (autograd.chunked_pass) with a different row function (torch_impl.py): the forward stores
nothing but its inputs and the backward recomputes the chunks with the per-token upstream gradients.
"""
from __future__ import annotations

import torch

from ..ce import api
from ..ce.autograd import Plan, check_dw_accumulation, chunked_pass
from ..planning.chunking import default_budget_bytes
from .torch_impl import STAT_COLUMNS, TokenRows, TokenSpec

TOKEN_OUTPUTS = ("log_probs", *STAT_COLUMNS)


def fused_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    outputs=("log_probs",),
    backend: str = "auto",
    chunk_budget_bytes: int | None = None,
    dw_accumulation: str = "auto",
) -> dict[str, torch.Tensor]:
    """Per-token statistics of p = softmax(x), x = softcap*tanh(logit_scale*(hidden @ weight.T + bias)/softcap)
    / temperature, for each target (already aligned with hidden, no shift). Returns {name: tensor of targets'
    shape} for the requested `outputs` among TOKEN_OUTPUTS ("log_probs" always):

    log_probs: log p[target] (with label_smoothing eps: sum_j q_j log p_j, q = (1-eps) onehot + eps/V, i.e.
    minus the smoothed cross-entropy); entropy: -sum p log p; log_sum_sq_probs: log sum p^2; mean_logits: mean
    of x; is_top1 (bool): target is the first argmax. float32 (float64 for float64 inputs); zeros (False) at
    ignored targets. Differentiable through log_probs and entropy (hidden, weight, bias).
    """
    unknown = set(outputs) - set(TOKEN_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown per-token outputs {sorted(unknown)}; choose among {TOKEN_OUTPUTS}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if backend not in api.BACKENDS:
        raise ValueError(f"backend must be one of {api.BACKENDS}, got {backend!r}")
    api._check_tensors(hidden, weight, targets, bias, None, None)
    d = hidden.shape[-1]
    h2, ids = hidden.reshape(-1, d), targets.reshape(-1).long()
    valid = ids != ignore_index
    ids = torch.where(valid, ids, 0)
    api._validate_labels_and_count(ids[:, None], valid, api.LossSpec(ignore_index), weight.shape[0])
    keep = valid.nonzero().squeeze(1)  # only scored tokens enter the loop (as TRL's head does on GPU)
    spec = TokenSpec(None if softcap is None else float(softcap), float(logit_scale), float(temperature),
                     float(label_smoothing), frozenset(outputs) & frozenset(STAT_COLUMNS))
    plan = _plan(spec, backend, hidden, weight, chunk_budget_bytes, check_dw_accumulation(dw_accumulation))
    per_token = FusedTokenStatsFn.apply(h2.index_select(0, keep), weight, bias, ids.index_select(0, keep), plan)
    result = {}
    for name, value in zip(TOKEN_OUTPUTS, per_token):
        if name in outputs:
            full = value.new_zeros(ids.shape).index_copy(0, keep, value)  # stays connected when nothing is kept
            result[name] = full.reshape(targets.shape)
    if "is_top1" in result:
        result["is_top1"] = result["is_top1"].bool()
    return result


def _plan(spec: TokenSpec, backend, hidden, weight, budget, dw_accumulation) -> Plan:
    device = hidden.device
    compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    impl = _row_backend(backend, device)
    return Plan(spec, impl.token_rows, impl.working_bytes_per_logit, compute_dtype,
                budget if budget is not None else default_budget_bytes(device), dw_accumulation=dw_accumulation)


def _row_backend(backend: str, device: torch.device):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and api.triton_available(device) else "torch"
    if backend == "torch":
        from . import torch_impl
        return torch_impl
    if not api.triton_available(device):
        raise ValueError(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU) and triton "
                         f"installed; got a tensor on {device}")
    from . import triton_impl
    return triton_impl


def _rows(ids, stats, scale, grad_entropy) -> TokenRows:
    n = ids.shape[0]
    ones = torch.ones(n, 1, dtype=torch.float32, device=ids.device)
    return TokenRows(ids[:, None], ones, ones[:, 0], scale, stats, grad_entropy)


class FusedTokenStatsFn(torch.autograd.Function):
    """(h, w, b, ids) -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) per row."""

    @staticmethod
    def forward(ctx, h, w, b, ids, plan: Plan):
        acc = torch.promote_types(plan.compute_dtype, torch.float32)
        stats = torch.zeros(h.shape[0], len(STAT_COLUMNS), dtype=acc, device=h.device)
        rows = _rows(ids, stats, torch.ones(1, device=h.device).expand(h.shape[0]), None)
        neg_log_prob, _ = chunked_pass(h, w, b, rows, None, plan, (False, False, False))
        ctx.save_for_backward(h, w, b, ids)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        entropy, log_sum_sq, mean_logits, top1 = stats.unbind(1)
        ctx.mark_non_differentiable(log_sum_sq, mean_logits, top1)
        return -neg_log_prob, entropy, log_sum_sq, mean_logits, top1

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy, *_):
        h, w, b = ctx.saved_tensors[:3]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        if (grad_log_prob is None and grad_entropy is None) or not any(need):
            return None, None, None, None, None
        ids = ctx.saved_tensors[3]
        if grad_log_prob is None:
            grad_log_prob = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        rows = _rows(ids, None, -grad_log_prob.contiguous(),
                     None if grad_entropy is None else grad_entropy.contiguous())
        _, grads = chunked_pass(h, w, b, rows, None, ctx.plan, need)

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return cast(grads.hidden, h), cast(grads.weight, w), cast(grads.bias, b) if b is not None else None, None, None
