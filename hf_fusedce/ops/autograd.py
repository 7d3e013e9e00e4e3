"""Autograd glue shared by both backends: the chunk loop (three GEMMs per chunk) and the Function.

Per chunk of rows: z = h_c W^T + b (GEMM 1), a row kernel turns z into the per-row loss and, in place, into
g = dL/dz; then dh_c = g W (GEMM 2) and dW += g^T h_c (GEMM 3). Total 6*N*D*V FLOPs, the floor.

Scalar reductions (mean/sum) compute the gradients during the forward, scaled by 1/denominator, and the
backward only multiplies them by the incoming scalar. reduction="none" cannot know its per-token upstream
gradient in the forward, so it stores nothing but the inputs and recomputes the chunks in the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .chunking import rows_per_chunk
from .spec import LossSpec, RowInputs


@dataclass(frozen=True)
class Plan:
    """Everything the Function needs besides tensors."""

    spec: LossSpec
    ce_rows: Callable  # (z, RowInputs, LossSpec, compute_grad) -> loss_rows; z becomes dL/dz if compute_grad
    bytes_per_logit: Callable  # (LossSpec, chunk dtype) -> int
    compute_dtype: torch.dtype
    budget_bytes: int
    chunk_vocab: int | None = None  # vocab width that sizes chunks, if not the weight's (vocab-parallel ranks)


@dataclass
class Grads:
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def chunked_pass(h, w, b, rows: RowInputs, active_rows, plan: Plan, need: tuple[bool, bool, bool]):
    """Loss per row (float32, zeros at ignored rows) and, if any of `need`, the gradients.

    active_rows: None (all rows) or an int64 index of the rows that carry loss; others are skipped.
    Runs with autocast off: operands are cast to plan.compute_dtype explicitly, and autocast would otherwise
    recast the float32 dW accumulator that the mixed-dtype addmm writes into.
    """
    with torch.autocast(h.device.type, enabled=False):
        return _chunk_loop(h, w, b, rows, active_rows, plan, need)


def _chunk_loop(h, w, b, rows, active_rows, plan, need):
    n_total, vocab = h.shape[0], w.shape[0]
    need_dh, need_dw, need_db = need
    compute_grad = any(need)
    wc = w.to(plan.compute_dtype)
    bc = b.to(plan.compute_dtype) if b is not None else None
    acc_dtype = torch.promote_types(plan.compute_dtype, torch.float32)  # float32, or float64 for f64 inputs
    loss = torch.zeros(n_total, dtype=acc_dtype, device=h.device)
    dh = dw = db = None
    if need_dh:
        dh = (torch.zeros_like if active_rows is not None else torch.empty_like)(h)
    if need_db:
        db = torch.zeros(vocab, dtype=acc_dtype, device=w.device)
    n_active = n_total if active_rows is None else active_rows.numel()
    width = plan.chunk_vocab or vocab
    step = rows_per_chunk(n_active, width, plan.bytes_per_logit(plan.spec, plan.compute_dtype), plan.budget_bytes)
    if need_dw:
        dw = torch.zeros(w.shape, dtype=_dw_dtype(w, acc_dtype, -(-n_active // step)), device=w.device)
    for start in range(0, n_active, step):
        sel = slice(start, min(start + step, n_active))
        if active_rows is not None:
            sel = active_rows[sel]
        hc = (h[sel] if isinstance(sel, slice) else h.index_select(0, sel)).to(plan.compute_dtype)
        z = torch.addmm(bc, hc, wc.t()) if bc is not None else hc @ wc.t()
        loss_c = plan.ce_rows(z, rows.select(sel), plan.spec, compute_grad)
        _put_rows(loss, sel, loss_c)
        if need_dh:
            if isinstance(sel, slice) and dh.dtype == z.dtype:
                torch.mm(z, wc, out=dh[sel])  # straight into the gradient, no temporary
            else:
                _put_rows(dh, sel, z @ wc)
        if need_dw:
            _accumulate_dw(dw, z, hc)
        if need_db:
            db += z.sum(0, dtype=acc_dtype)
        del z  # free this chunk before the next one is allocated: one chunk alive at a time
    return loss, Grads(dh, dw, db)


def _put_rows(dst, sel, src):
    if isinstance(sel, slice):
        dst[sel] = src
    else:
        dst.index_copy_(0, sel, src.to(dst.dtype))


# Low-precision weights with at most this many chunks accumulate dW in their own dtype: every chunk's GEMM
# sums its tokens in fp32 and rounds once, so a few chunks round about as often as stock's single GEMM, and
# no V x D fp32 buffer (2 GiB at V=128k, D=4096) is needed. More chunks: an fp32 accumulator.
MAX_CHUNKS_NATIVE_DW = 4


def _dw_dtype(w, acc_dtype, n_chunks):
    if w.dtype in (torch.float16, torch.bfloat16) and n_chunks <= MAX_CHUNKS_NATIVE_DW:
        return w.dtype
    return acc_dtype


def _accumulate_dw(dw, g, hc):
    if g.dtype == dw.dtype:
        dw.addmm_(g.t(), hc)
        return
    if dw.is_cuda and _MIXED_ADDMM["ok"]:  # fp32 accumulator fed by a low-precision GEMM, no V x D temporary
        try:
            torch.addmm(dw, g.t(), hc, out_dtype=dw.dtype, out=dw)
            return
        except (RuntimeError, TypeError):  # this build lacks the kernel: remember, use the fallback
            _MIXED_ADDMM["ok"] = False
    # no mixed-dtype GEMM here (CPU, older torch): low-precision GEMM, then fp32 sum
    dw += g.t() @ hc


_MIXED_ADDMM = {"ok": "dtype_out" in torch.ops.aten.addmm.overloads()}


def _finish(grad, dtype):
    return None if grad is None else grad.to(dtype)


class FusedLinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, rows: RowInputs, denom, active_rows, plan: Plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        reduction = plan.spec.reduction
        ctx.plan, ctx.need = plan, need
        if reduction == "none":
            loss_rows, _ = chunked_pass(h, w, b, rows, active_rows, plan, (False, False, False))
            if any(need):
                ctx.save_for_backward(h, w, b)
                ctx.rows, ctx.active_rows = rows, active_rows
            return loss_rows
        inv = (1.0 / denom).to(torch.promote_types(plan.compute_dtype, torch.float32))
        rows.scale = inv.expand(h.shape[0])
        loss_rows, grads = chunked_pass(h, w, b, rows, active_rows, plan, need)
        ctx.grads = grads
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        return loss_rows.sum() * inv

    @staticmethod
    def backward(ctx, grad_out):
        plan, need = ctx.plan, ctx.need
        if plan.spec.reduction == "none":
            h, w, b = ctx.saved_tensors
            rows = ctx.rows
            rows.scale = grad_out.contiguous()
            _, grads = chunked_pass(h, w, b, rows, ctx.active_rows, plan, need)
            like = (h.dtype, w.dtype, None if b is None else b.dtype)
        else:
            grads, like = ctx.grads, ctx.dtypes
            if grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the same loss "
                                   "(retain_graph). Its gradients are computed in the forward and handed over "
                                   "once; recompute the loss for a second backward.")
            ctx.grads = None  # free the saved gradients as soon as they are handed over
            go = grad_out
            for g in (grads.hidden, grads.weight, grads.bias):
                if g is not None:
                    g.mul_(go.to(g.dtype))
        return (_finish(grads.hidden, like[0]), _finish(grads.weight, like[1]),
                _finish(grads.bias, like[2]) if like[2] is not None else None, None, None, None, None)
