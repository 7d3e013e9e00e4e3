"""Vocabulary-parallel fused linear + cross-entropy: each rank holds rows [vocab_start, vocab_start + V_r) of the
head weight (tensor parallelism shards the lm_head along the vocabulary) and never sees the others.

The chunk loop of `ce/autograd.py` runs unchanged on the local slice; only the row kernel differs. Per chunk of tokens
the statistics a row's loss needs are combined across the group with two small all-reduces (a few floats per
token): MAX of the row max, then one SUM of [sum of exponentials, target gap, smoothing gap] packed in one tensor.
From there the gradient of the slice's logits is local, so dW (and db) of the slice is local too. The gradient
of the hidden states is each slice's partial product, summed over the group once, in the backward (one
all-reduce of N x D; per chunk would be the same bytes in more messages).

Every rank must pass the same hidden states and targets (tensor parallelism replicates them); the loss returned
is the full loss, identical on every rank. Same formulas as `torch_impl.ce_rows` (see its docstring).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist

from ..ce.api import _check_options, _check_tensors, _denominator, _plan, _row_inputs, _validate_labels_and_count
from ..ce.autograd import FusedLinearCrossEntropyFn, check_dw_accumulation
from ..ce.spec import LossSpec, RowInputs
from ..ce.torch_impl import is_low_precision, to_raw_grad_, transform_, weighted_row_loss


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
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
    backend: str = "auto",
    chunk_budget_bytes: int | None = None,
    dw_accumulation: str = "auto",
) -> torch.Tensor:
    """`fused_linear_cross_entropy` with the head split over the ranks of `group` along the vocabulary.

    weight (V_r, D) / bias (V_r,): this rank's rows [vocab_start, vocab_start + V_r) of the (vocab_size, D) head;
    the ranks' slices tile [0, vocab_size) (`shard_range` gives torch's Shard(0) split). `targets` hold global
    class ids. Gradients reach weight and bias (this slice only) and hidden (summed over the group).
    backend: "auto" or "torch" (the row kernel is split around the all-reduces in plain PyTorch).
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"vocab-parallel cross-entropy runs the torch row kernel only; got backend={backend!r} "
                         "(use 'auto' or 'torch')")
    spec = LossSpec(ignore_index, reduction, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap), float(logit_scale))
    _check_options(spec, "torch", num_items_in_batch)
    _check_tensors(hidden, weight, targets, bias, token_weights, target_probs, empty_vocab_ok=True)
    if not (0 <= vocab_start and vocab_start + weight.shape[0] <= vocab_size):
        raise ValueError(f"weight rows [{vocab_start}, {vocab_start + weight.shape[0]}) fall outside the vocabulary "
                         f"[0, {vocab_size})")
    lead = targets.shape[:-1] if target_probs is not None else targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rows, valid = _row_inputs(targets, target_probs, token_weights, spec, h2.shape[0])
    n_valid = _validate_labels_and_count(rows.ids, valid, spec, vocab_size)
    widest = _check_same_tokens(rows.ids, n_valid, weight.shape[0], group)
    active = None if n_valid == h2.shape[0] else valid.nonzero().squeeze(1)
    denom = _denominator(spec, num_items_in_batch, n_valid, h2.device)
    plan = _plan(spec, "torch", hidden, weight, chunk_budget_bytes, check_dw_accumulation(dw_accumulation))
    rows_fn = functools.partial(_ce_rows_shard, group=group, vocab_start=vocab_start, vocab_size=vocab_size)
    # every rank sizes its chunks by the widest slice, so all ranks reach each all-reduce with the same rows
    plan = dataclasses.replace(plan, ce_rows=rows_fn, chunk_vocab=widest, bytes_per_logit=_shard_bytes_per_logit)
    if torch.is_grad_enabled() and hidden.requires_grad:
        h2 = SumGradOverGroup.apply(h2, group)
    out = FusedLinearCrossEntropyFn.apply(h2, weight, bias, rows, denom, active, plan)
    return out.reshape(lead) if reduction == "none" else out


def shard_range(vocab_size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s rows when `vocab_size` rows are split as torch.chunk / DTensor Shard(0) does:
    ceil(V / world) rows per rank, the last ranks shorter (possibly empty)."""
    per = math.ceil(vocab_size / world)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)


def _check_same_tokens(ids, n_valid, width, group) -> int:
    """All ranks must hold the same tokens (else their all-reduces would pair different rows, or hang). One MAX
    all-reduce of a few integers: row and target counts and a checksum of the targets (equal on every rank iff
    their max equals minus the max of their negation), and the widest slice. Raised on every rank alike."""
    position = torch.arange(1, ids.numel() + 1, device=ids.device).reshape(ids.shape)
    checksum = (ids * position).sum().remainder(1 << 61)  # wraps alike on every rank; kept off INT64_MIN
    mine = torch.stack([torch.tensor(ids.shape[0], device=ids.device), torch.tensor(n_valid, device=ids.device),
                        checksum])
    got = torch.cat([mine, -mine, torch.tensor([width], device=ids.device)])
    dist.all_reduce(got, op=dist.ReduceOp.MAX, group=group)
    vals = got.tolist()
    top, bottom = vals[:3], [-v for v in vals[3:6]]
    if top != bottom:
        raise ValueError("vocab-parallel cross-entropy: the ranks of the group hold different tokens (rows, "
                         f"non-ignored targets, target checksum range from {bottom} to {top}); tensor parallelism "
                         "needs the same hidden states and targets on every rank of the group")
    return vals[6]


class SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (each rank's dh covers its vocab slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _shard_bytes_per_logit(spec: LossSpec, chunk_dtype: torch.dtype) -> int:
    """The chunk, its float32 copy if low precision, and tanh under softcap: a shard's chunk is worked on whole,
    not in row blocks, because ranks of different widths would split it differently between the all-reduces."""
    own = torch.finfo(chunk_dtype).bits // 8
    return own + 4 * (is_low_precision(chunk_dtype) + (spec.softcap is not None))


def _ce_rows_shard(z: torch.Tensor, rows: RowInputs, spec: LossSpec, compute_grad: bool, *, group, vocab_start,
                   vocab_size):
    """`torch_impl.ce_rows` on a vocabulary slice: the loss of the full rows; z (n, V_r) holds this slice's raw
    logits and, if compute_grad, becomes the gradient of those logits."""
    x, tanh = transform_(z, spec)
    n, width = x.shape
    eps, zl = spec.label_smoothing, spec.z_loss
    local_ids = rows.ids - vocab_start
    mine = (local_ids >= 0) & (local_ids < width)
    local_ids = torch.where(mine, local_ids, 0)
    tau = rows.probs
    tau_mine = torch.where(mine, tau, 0.0) if width else torch.zeros_like(tau)

    row_max = x.amax(1) if width else x.new_full((n,), -math.inf)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    x.sub_(row_max[:, None])  # shifted by the global max: every term below is a sum of non-negative numbers
    parts = [None, -(tau_mine * x.gather(1, local_ids)).sum(1) if width else x.new_zeros(n)]
    if eps:
        parts.append(-x.sum(1))
    p = x.exp_()
    parts[0] = p.sum(1)
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=group)  # [sum_exp, sum_k tau_k (max - x_k), sum_j (max - x_j)] of the full row
    sum_exp, tau_dot_gap = sums[0], sums[1]
    tau_sum = tau.sum(1)
    log_sum = sum_exp.log()
    lse = row_max + log_sum
    mean_gap = sums[2] / vocab_size if eps else None
    loss, active = weighted_row_loss(log_sum, tau_sum, tau_dot_gap, mean_gap, lse, rows, spec)
    if not compute_grad:
        return loss
    coef = torch.where(active, rows.weight * rows.scale, torch.zeros_like(loss))
    p.mul_(((1.0 - eps) * tau_sum + eps + 2.0 * zl * lse).mul_(coef).div_(sum_exp)[:, None])
    if width:
        p.scatter_add_(1, local_ids, -(1.0 - eps) * tau_mine * coef[:, None])
    if eps:
        p.sub_((eps / vocab_size) * coef[:, None])
    to_raw_grad_(p, z, tanh, spec)
    return loss
