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

from ..planning.chunking import rows_per_chunk
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
    dw_accumulation: str = "auto"  # see DW_ACCUMULATION


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
    if need_dw:  # the first chunk's GEMM writes dW with beta=0: no zero fill, unless there is no chunk at all
        dtype = dw_accumulator_dtype(w.dtype, -(-n_active // step), plan.dw_accumulation)
        dw = (torch.empty if n_active else torch.zeros)(w.shape, dtype=dtype, device=w.device)
    # One chunk buffer for the whole loop: on CPU a fresh chunk-sized allocation is returned to the OS when freed
    # and page-faults in again on every chunk (measured ~15% of GEMM 1's time at 1024 x 151936 bf16).
    zbuf = torch.empty(min(step, max(n_active, 1)), vocab, dtype=plan.compute_dtype, device=h.device)
    for start in range(0, n_active, step):
        sel = slice(start, min(start + step, n_active))
        if active_rows is not None:
            sel = active_rows[sel]
        hc = (h[sel] if isinstance(sel, slice) else h.index_select(0, sel)).to(plan.compute_dtype)
        z = zbuf[:hc.shape[0]]
        z = torch.addmm(bc, hc, wc.t(), out=z) if bc is not None else torch.mm(hc, wc.t(), out=z)
        loss_c = plan.ce_rows(z, rows.select(sel), plan.spec, compute_grad)
        _put_rows(loss, sel, loss_c)
        if need_dh:
            if z.shape[0] < FEW_ROWS and z.dtype == torch.float32:
                _put_rows(dh, sel, _few_rows_product(z, wc))
            elif isinstance(sel, slice) and dh.dtype == z.dtype:
                torch.mm(z, wc, out=dh[sel])  # straight into the gradient, no temporary
            else:
                _put_rows(dh, sel, z @ wc)
        if need_dw:
            _accumulate_dw(dw, z, hc, first=start == 0)
        if need_db:
            db += z.sum(0, dtype=acc_dtype)
    return loss, Grads(dh, dw, db)


# A float32 GEMM with fewer rows than this may run BLAS's matrix-vector path, which sums the V-long products in one
# sequence: dh = dL/dz @ W (rows summing to ~0) came out with 2.4e-6 relative error at V = 32000 against 3.4e-7 on
# the blocked path (MKL takes it below 4 rows on AVX-512, below 8 with MKL_CBWR=COMPATIBLE, as on an AMD EPYC).
FEW_ROWS = 8
_VOCAB_BLOCK = 256  # products over 256 vocabulary rows, summed as a cascade: 2e-7 to 4e-7 on every path
_BLOCKS_AT_ONCE = 64  # bounds the partial products held at once to 64 x rows x D


def _few_rows_product(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z @ w for a chunk of few rows, as a sum of short products (see FEW_ROWS)."""
    rows, vocab = z.shape
    full = vocab // _VOCAB_BLOCK * _VOCAB_BLOCK
    parts = []
    for start in range(0, full, _VOCAB_BLOCK * _BLOCKS_AT_ONCE):
        end = min(start + _VOCAB_BLOCK * _BLOCKS_AT_ONCE, full)
        blocks = (end - start) // _VOCAB_BLOCK
        zb = z[:, start:end].reshape(rows, blocks, _VOCAB_BLOCK).transpose(0, 1)
        parts.append(torch.bmm(zb, w[start:end].reshape(blocks, _VOCAB_BLOCK, -1)).sum(0))
    if full < vocab:
        parts.append(z[:, full:] @ w[full:])
    return torch.stack(parts).sum(0)


def _put_rows(dst, sel, src):
    if isinstance(sel, slice):
        dst[sel] = src
    else:
        dst.index_copy_(0, sel, src.to(dst.dtype))


# dW accumulation for bf16/fp16 weights (float32 and float64 weights always accumulate in their own dtype):
#   "native": dW in the weight's dtype; every chunk's GEMM sums its tokens in fp32 and rounds once, then the
#             chunk is added in low precision. No V x D fp32 buffer, but one more rounding per chunk.
#   "fp32":   a V x D fp32 accumulator, cast down blockwise in place at the end (see _finish).
#   "auto":   native up to MAX_CHUNKS_NATIVE_DW chunks, fp32 beyond.
# MAX_CHUNKS_NATIVE_DW comes from measured error (README, "GPU status"; hf_fusedce/bench/dw_precision.py).
DW_ACCUMULATION = ("auto", "fp32", "native")
MAX_CHUNKS_NATIVE_DW = 4


def check_dw_accumulation(policy: str) -> str:
    if policy not in DW_ACCUMULATION:
        raise ValueError(f"dw_accumulation must be one of {DW_ACCUMULATION}, got {policy!r}")
    return policy


def dw_accumulator_dtype(weight_dtype: torch.dtype, n_chunks: int, policy: str = "auto") -> torch.dtype:
    if weight_dtype not in (torch.float16, torch.bfloat16):
        return weight_dtype
    if policy == "native" or (policy == "auto" and n_chunks <= MAX_CHUNKS_NATIVE_DW):
        return weight_dtype
    return torch.float32


def _accumulate_dw(dw, g, hc, first: bool):
    beta = 0.0 if first else 1.0  # beta=0 ignores dw's (uninitialized) contents, NaN included
    if g.dtype == dw.dtype:
        dw.addmm_(g.t(), hc, beta=beta)
        return
    if dw.is_cuda and _MIXED_ADDMM["ok"]:  # fp32 accumulator fed by a low-precision GEMM, no V x D temporary
        try:
            torch.addmm(dw, g.t(), hc, beta=beta, out_dtype=dw.dtype, out=dw)
            return
        except (RuntimeError, TypeError):  # this build lacks the kernel: remember, use the fallback
            _MIXED_ADDMM["ok"] = False
    # no mixed-dtype GEMM here (CPU, older torch): an fp32 GEMM of the upcast operands, the same exact products
    # and fp32 sums as the mixed GEMM (a chunk-sized fp32 copy of g, no V x D temporary)
    dw.addmm_(g.t().to(dw.dtype), hc.to(dw.dtype), beta=beta)


_MIXED_ADDMM = {"ok": "dtype_out" in torch.ops.aten.addmm.overloads()}
DOWNCAST_BLOCK_BYTES = 64 << 20


def _finish(grad, dtype, scale):
    """grad * scale (scale None: 1) in `dtype`. A float32 gradient of a bf16/fp16 parameter is cast blockwise
    into its own storage, so no second full-size buffer exists; the result is a view of that storage."""
    if grad is None:
        return None
    if grad.dtype == dtype:
        return grad.mul_(scale.to(dtype)) if scale is not None else grad
    if grad.dim() < 2 or torch.finfo(dtype).bits * 2 != torch.finfo(grad.dtype).bits or not grad.is_contiguous():
        return (grad.mul_(scale.to(grad.dtype)) if scale is not None else grad).to(dtype)
    out = grad.view(-1).view(dtype)[: grad.numel()].view(grad.shape)
    rows = max(1, DOWNCAST_BLOCK_BYTES // (grad.stride(0) * grad.element_size()))
    for start in range(0, grad.shape[0], rows):
        # block i lands on bytes of rows already read (out's end <= start of unread rows): safe in place
        src = grad[start:start + rows]
        out[start:start + rows] = (src * scale.to(src.dtype) if scale is not None else src).to(dtype)
    return out


def _is_one(t: torch.Tensor) -> bool:
    """grad_out == 1 (the usual loss.backward()): skip the scaling. One host sync; none under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return t.numel() == 1 and bool(t == 1)


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
            scale = None  # the per-token upstream gradient is already inside
        else:
            grads, like = ctx.grads, ctx.dtypes
            if grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the same loss "
                                   "(retain_graph). Its gradients are computed in the forward and handed over "
                                   "once; recompute the loss for a second backward.")
            ctx.grads = None  # free the saved gradients as soon as they are handed over
            scale = None if _is_one(grad_out) else grad_out
        return (_finish(grads.hidden, like[0], scale), _finish(grads.weight, like[1], scale),
                _finish(grads.bias, like[2], scale) if like[2] is not None else None, None, None, None, None)
