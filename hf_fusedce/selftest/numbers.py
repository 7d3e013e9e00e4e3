"""Is it right: the op against float64 at small shapes with every option, at real head shapes (Llama-3,
Qwen2.5, Gemma-2 with its softcap), in bf16 and fp32; the Triton kernel against the torch twin; distillation and
the per-token statistics. Every verdict is testing.py's dtype-relative rule: ours may be as far from float64 as
stock PyTorch in the same dtype (times a small factor), plus a few ulps."""
from __future__ import annotations

import functools
import math

import torch

from ..bench.runner import make_inputs as bench_inputs
from ..bench.shapes import DTYPE_MODES, REAL_HEADS, Shape
from ..ops import (TOKEN_OUTPUTS, fused_linear_cross_entropy, fused_linear_distillation, fused_linear_token_stats,
                   reference_token_stats)
from ..ops.ce.reference import reference_cross_entropy_on_logits, reference_linear_cross_entropy
from ..ops.distill.reference import reference_linear_distillation
from ..testing import (accuracy_bound, assert_within_tolerance, make_inputs, reference_loss_and_grads, rel_err,
                       run_with_grads, stock_loss_and_grads, tolerance_for)
from .report import Check

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_F32_SLACK = 8 * torch.finfo(torch.float32).eps  # float32 summation slack: the op accumulates in float32
N, D, V = 48, 32, 1031  # odd vocabulary: ragged blocks; a chunk budget of a few rows: several chunks


def option_cases() -> dict[str, dict]:
    """Every option of the op, alone and together (targets built per case: ignored tokens, soft targets)."""
    return {"plain": {}, "ignored tokens": {"ignore": 0.3}, "label smoothing": {"label_smoothing": 0.1},
            "z-loss": {"z_loss": 1e-3}, "softcap": {"softcap": 3.0}, "logit scale": {"logit_scale": 0.6},
            "soft targets": {"soft": 3},
            "all together": {"ignore": 0.2, "label_smoothing": 0.05, "z_loss": 1e-3, "softcap": 5.0,
                             "logit_scale": 1.3}}


def option_check(case: str, dtype_key: str, backend: str, device) -> Check:
    opts = dict(option_cases()[case])
    ignore, soft = opts.pop("ignore", 0.0), opts.pop("soft", 0)
    dtype = DTYPES[dtype_key]
    h, w, y = make_inputs(N, V, D, dtype, seed=7, ignore_ratio=ignore, scale=4.0, device=device)
    if soft:
        g = torch.Generator().manual_seed(8)
        y = torch.randint(0, V, (N, soft), generator=g).to(device)
        opts["target_probs"] = torch.rand(N, soft, generator=g).softmax(-1).to(device)
    budget = 7 * V * torch.finfo(dtype).bits // 8  # 7-row chunks
    fn = functools.partial(fused_linear_cross_entropy, backend=backend, chunk_budget_bytes=budget)
    return _against_float64("numbers", f"{case}, {dtype_key}, {backend}", fn, h, w, y, opts)


def _against_float64(group, name, fn, h, w, y, opts) -> Check:
    ours = run_with_grads(fn, h, w, y, **opts)
    ref = reference_loss_and_grads(h, w, y, **opts)
    base = stock_loss_and_grads(h, w, y, **opts)
    figures, problems = {}, []
    for key, o, r, b in (("loss", ours.loss, ref.loss, base.loss),
                         *((f"d{k}", ours.grads[k], ref.grads[k], base.grads[k]) for k in ("hidden", "weight"))):
        figures[f"{key} err"] = rel_err(o, r)
        figures[f"{key} stock err"] = rel_err(b, r)
        try:
            assert_within_tolerance(o, r, b, tolerance_for(h.dtype), key)
        except AssertionError as err:
            problems.append(str(err))
        # Norm-wise too, with float32's slack only: bf16's elementwise rule allows a few percent per element (its
        # ulp is 0.8%), which a uniformly scaled gradient hides in; stock's norm-wise bf16 error is ~0.2%.
        bound = accuracy_bound(r, b, eps=_F32_SLACK)
        if figures[f"{key} err"] > bound:
            problems.append(f"{key}: rel err {figures[f'{key} err']:.3e} > {bound:.3e} (4 x stock's)")
    return Check(group, name, "fail" if problems else "pass", figures, "; ".join(problems))


def real_head_cases(quick: bool, device) -> list[tuple[Shape, int, str]]:
    """Every head in bf16 and fp32 on a GPU. On a CPU the weights alone are 0.5-2.4 GB and its GEMMs take seconds
    each: --quick checks Qwen2.5-0.5B's head in bf16, the full run adds Llama-3.2-1B's in bf16 and Qwen2.5-0.5B's
    in fp32. Gemma-2-2B's head (V=256000, softcap) is left to the GPU: on a loaded 2-core CPU it ran past 8 minutes
    alone; the softcap itself is checked at the small shapes."""
    heads = {k: REAL_HEADS[k] for k in ("qwen2.5-0.5b", "llama3.2-1b", "gemma2-2b-softcap")}
    if device.type == "cuda":
        n = 1024 if quick else 4096
        return [(shape, n, dt) for shape in heads.values() for dt in ("bf16", "fp32")]
    cases = [(heads["qwen2.5-0.5b"], 16, "bf16")]
    if not quick:
        cases += [(heads["qwen2.5-0.5b"], 16, "fp32"), (heads["llama3.2-1b"], 16, "bf16")]
    return cases


@torch.no_grad()
def _float64_head(h, w, y, softcap, vocab_rows, chunk: int = 16384):
    """Exact loss, dL/dh on every token and dL/dW on `vocab_rows`, from float64 logits built a vocabulary slice at
    a time (the V x D weight is never copied to float64: at Gemma-2's head that would be 4.7 GB)."""
    h64 = h.double()
    raw = torch.cat([h64 @ w[s:s + chunk].double().t() for s in range(0, w.shape[0], chunk)], 1)
    with torch.enable_grad():
        raw.requires_grad_()
        loss = reference_cross_entropy_on_logits(raw, y, softcap=softcap)
        (g,) = torch.autograd.grad(loss, raw)
    dh = sum(g[:, s:s + chunk] @ w[s:s + chunk].double() for s in range(0, w.shape[0], chunk))
    return float(loss), dh, g[:, vocab_rows].t() @ h64


def real_head_check(shape: Shape, n: int, dtype_key: str, backend: str, device) -> Check:
    """At the head's real D and V: ours and stock in `dtype_key`, both against float64 (dW on 512 vocabulary
    rows: the targets that occur and random ones)."""
    h, w, y = bench_inputs(shape, n, DTYPE_MODES[dtype_key], device, seed=0)
    y[::5] = -100
    g = torch.Generator().manual_seed(1)
    rows = torch.unique(torch.cat([y[y >= 0].cpu(), torch.randperm(shape.v, generator=g)[:256]])).to(device)
    loss64, dh64, dw64 = _float64_head(h.detach(), w.detach(), y, shape.softcap, rows)
    figures, problems = {"N": n, "D": shape.d, "V": shape.v, "softcap": shape.softcap}, []
    results = {}
    for who, fn in (("ours", functools.partial(fused_linear_cross_entropy, backend=backend)),
                    ("stock", functools.partial(reference_linear_cross_entropy, logits_dtype=torch.float32))):
        loss = fn(h, w, y, softcap=shape.softcap)
        loss.backward()
        results[who] = (float(loss.detach()), h.grad, w.grad[rows].clone())
        h.grad = w.grad = None
    for i, key in enumerate(("loss", "dhidden", "dweight")):
        ref = torch.tensor(loss64) if i == 0 else (dh64, dw64)[i - 1]
        ours, stock = (torch.tensor(results[k][i]) if i == 0 else results[k][i] for k in ("ours", "stock"))
        err, bound = rel_err(ours, ref), accuracy_bound(ref, stock)
        figures[f"{key} err"], figures[f"{key} stock err"] = err, rel_err(stock, ref)
        if not err <= bound:
            problems.append(f"{key}: rel err {err:.3e} > bound {bound:.3e}")
    return Check("numbers", f"{shape.name} head N={n}, {dtype_key}, {backend}", "fail" if problems else "pass",
                 figures, "; ".join(problems))


def twin_check(dtype_key: str, device, n: int = 256, vocab: int = 32000, dim: int = 64) -> Check:
    """The Triton kernel and the torch twin on the same inputs (softcapped, some tokens ignored): their
    difference no larger than either one's error against float64, plus a few ulps."""
    dtype = DTYPES[dtype_key]
    h, w, y = make_inputs(n, vocab, dim, dtype, seed=3, ignore_ratio=0.1, scale=4.0, device=device)
    outs = {b: run_with_grads(functools.partial(fused_linear_cross_entropy, backend=b), h, w, y, softcap=30.0)
            for b in ("triton", "torch")}
    ref = reference_loss_and_grads(h, w, y, softcap=30.0)
    figures, problems = {}, []
    for key in ("hidden", "weight"):
        t, c, r = outs["triton"].grads[key], outs["torch"].grads[key], ref.grads[key]
        gap, err = rel_err(t, c), max(rel_err(t, r), rel_err(c, r))
        figures[f"d{key} triton vs torch"], figures[f"d{key} worst vs float64"] = gap, err
        if gap > err + 8 * torch.finfo(dtype).eps:
            problems.append(f"d{key}: triton and torch differ by {gap:.3e}, more than either's error {err:.3e}")
    return Check("numbers", f"triton vs torch twin, {dtype_key}", "fail" if problems else "pass", figures,
                 "; ".join(problems))


def distill_check(dtype_key: str, backend: str, device) -> Check:
    dtype = DTYPES[dtype_key]
    hs, ws, y = make_inputs(N, V, D, dtype, seed=11, ignore_ratio=0.2, scale=3.0, device=device)
    ht, wt, _ = make_inputs(N, V, D + 8, dtype, seed=12, scale=3.0, device=device, requires_grad=False)
    kw = dict(beta=0.5, temperature=1.5, hard_label_weight=0.3)

    def run(fn, cast=None, **extra):
        a, b = (hs.detach().to(cast or dtype).requires_grad_(), ws.detach().to(cast or dtype).requires_grad_())
        loss = fn(a, b, ht.to(cast or dtype), wt.to(cast or dtype), y, **kw, **extra)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    ours = run(fused_linear_distillation, backend=backend, chunk_budget_bytes=7 * V * 4)
    ref = run(reference_linear_distillation, cast=torch.float64)
    stock = run(reference_linear_distillation, logits_dtype=torch.float32)
    figures, problems = {}, []
    for key, o, r, s in zip(("loss", "dhidden", "dweight"), ours, ref, stock):
        err, bound = rel_err(o, r), accuracy_bound(r, s)
        figures[f"{key} err"], figures[f"{key} stock err"] = err, rel_err(s, r)
        if not err <= bound:
            problems.append(f"{key}: rel err {err:.3e} > bound {bound:.3e}")
    return Check("numbers", f"distillation (generalized JSD), {dtype_key}, {backend}", "fail" if problems else "pass",
                 figures, "; ".join(problems))


def token_stats_check(backend: str, device) -> Check:
    """Per-token log-probs, entropy and the rest (fp32) against float64, and the gradient of an objective that
    weights log-probs and entropy per token (as TRL's trainers do)."""
    h, w, y = make_inputs(37, 203, 19, torch.float32, seed=3, ignore_ratio=0.3, scale=4.0, device=device)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(37, generator=g).to(device), torch.randn(37, generator=g).to(device)
    kw = dict(softcap=3.0, logit_scale=1.7, temperature=0.7)

    def run(fn, cast, **extra):
        hh, ww = h.detach().to(cast).requires_grad_(), w.detach().to(cast).requires_grad_()
        out = fn(hh, ww, y, **kw, **extra)
        ((a.to(cast) * out["log_probs"]).sum() + (b.to(cast) * out["entropy"]).sum()).backward()
        return out, hh.grad, ww.grad

    ours, dh, dw = run(fused_linear_token_stats, torch.float32, outputs=TOKEN_OUTPUTS, backend=backend,
                       chunk_budget_bytes=9 * 203 * 16)
    ref, dh64, dw64 = run(reference_token_stats, torch.float64)
    figures = {name: rel_err(ours[name], ref[name]) for name in TOKEN_OUTPUTS if name != "is_top1"}
    figures.update({"is_top1 equal": bool(torch.equal(ours["is_top1"], ref["is_top1"])),
                    "dhidden": rel_err(dh, dh64), "dweight": rel_err(dw, dw64)})
    bound = 64 * torch.finfo(torch.float32).eps * math.sqrt(203)  # float32 sums over the vocabulary
    bad = [k for k, v in figures.items() if (v is False) or (not isinstance(v, bool) and v > bound)]
    return Check("numbers", f"token statistics, fp32, {backend}", "fail" if bad else "pass", figures,
                 f"beyond {bound:.1e}: {', '.join(bad)}" if bad else "")
