"""Chunk-loop internals: the dW accumulation policy, the in-place blockwise downcast, chunk rows in multiples of
128, the first chunk's beta=0 write (no zero fill) and the skipped scaling when grad_out is 1."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from hf_fusedce import fused_linear_cross_entropy
from hf_fusedce.ops.ce import autograd
from hf_fusedce.ops.planning.chunking import ROW_MULTIPLE, rows_per_chunk
from hf_fusedce.testing import rel_err


def test_chunk_rows_are_multiples_of_128_and_fit_the_budget():
    for n, vocab, budget in [(8192, 128256, 768 << 20), (65536, 128256, 768 << 20), (1000, 32000, 32 << 20),
                             (8192, 256000, 256 << 20)]:
        step = rows_per_chunk(n, vocab, 2, budget)
        assert step * vocab * 2 <= budget
        assert step % ROW_MULTIPLE == 0 or step == n, (n, step)
    assert rows_per_chunk(39, 517, 4, 7 * 517 * 4) == 7  # budgets below 128 rows keep their small chunks


def test_dw_policy():
    bf16, f32 = torch.bfloat16, torch.float32
    assert autograd.dw_accumulator_dtype(bf16, autograd.MAX_CHUNKS_NATIVE_DW) == bf16
    assert autograd.dw_accumulator_dtype(bf16, autograd.MAX_CHUNKS_NATIVE_DW + 1) == f32
    assert autograd.dw_accumulator_dtype(bf16, 1000, "native") == bf16
    assert autograd.dw_accumulator_dtype(bf16, 1, "fp32") == f32
    assert autograd.dw_accumulator_dtype(f32, 1000, "native") == f32
    with pytest.raises(ValueError, match="dw_accumulation"):
        fused_linear_cross_entropy(torch.randn(2, 4), torch.randn(8, 4), torch.zeros(2, dtype=torch.long),
                                   dw_accumulation="bf16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_blockwise_downcast_in_place_equals_a_plain_cast(monkeypatch, dtype, scale):
    monkeypatch.setattr(autograd, "DOWNCAST_BLOCK_BYTES", 3 * 40 * 4)  # 3-row blocks: many blocks, uneven tail
    acc = torch.randn(23, 40) * 5
    s = None if scale is None else torch.tensor(scale)
    want = (acc * scale if scale is not None else acc).to(dtype)
    got = autograd._finish(acc.clone(), dtype, s)
    assert got.dtype == dtype and torch.equal(got, want)
    acc2 = acc.clone()
    assert autograd._finish(acc2, dtype, s).untyped_storage().data_ptr() == acc2.untyped_storage().data_ptr()


def test_backward_scaling_skipped_only_for_one():
    assert autograd._is_one(torch.tensor(1.0))
    assert not autograd._is_one(torch.tensor(2.0))
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 100, (300,))
    g1 = torch.autograd.grad(fused_linear_cross_entropy(h, w, t), (h, w))
    g3 = torch.autograd.grad(fused_linear_cross_entropy(h, w, t) * 3.0, (h, w))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, 3 * a)


@pytest.mark.parametrize("policy", ["auto", "fp32", "native"])
def test_bf16_weight_gradient_under_each_policy_with_many_chunks(policy):
    """Twelve chunks (beta=0 first write, then accumulation) against the float64 oracle, loosely: exact policy
    comparisons are in the README's measurement."""
    from hf_fusedce.ops import reference_linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12 * 128, 32, generator=g)
    w = torch.randn(64, 32, generator=g) / 4
    t = torch.randint(0, 64, (12 * 128,), generator=g)
    w16 = w.bfloat16().requires_grad_()
    fused_linear_cross_entropy(h.bfloat16(), w16, t, dw_accumulation=policy,
                               chunk_budget_bytes=128 * 64 * 2).backward()
    w64 = w16.detach().double().requires_grad_()
    reference_linear_cross_entropy(h.bfloat16().double(), w64, t).backward()
    err = rel_err(w16.grad, w64.grad)
    assert w16.grad.dtype == torch.bfloat16 and err < 2e-2, err


def _caller_outside_torch() -> str:
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else ""


class _Float32Widths(torch.utils._python_dispatch.TorchDispatchMode):
    """Rows of every new float32 tensor `vocab` wide (no view, not the logits GEMM's output, not the chunk loop's
    own chunk buffer, which the GEMM writes into): the row function's float32 working set."""
    GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _caller_outside_torch() == "_chunk_loop":  # the chunk buffer: GEMM 1's output
            return out
        if func._schema.is_mutable:  # in place: no new tensor (the chunk-level target terms write z itself)
            return out
        if (func not in self.GEMMS and not func.is_view and isinstance(out, torch.Tensor)
                and out.dtype == torch.float32 and out.dim() == 2 and out.shape[1] == self.vocab):
            self.rows.append(out.shape[0])
        return out


def _ce_and_token_stats(h, w, t, **kw):
    from hf_fusedce.ops import fused_linear_token_stats
    loss = fused_linear_cross_entropy(h, w, t, **kw)
    out = fused_linear_token_stats(h, w, t, outputs=("log_probs", "entropy"), softcap=kw.get("softcap"),
                                   chunk_budget_bytes=kw["chunk_budget_bytes"])
    total = loss + out["log_probs"].sum() * 1e-3 + out["entropy"].sum() * 1e-3
    return [total.detach(), *torch.autograd.grad(total, (h, w))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}])
def test_chunks_are_worked_in_row_blocks_with_the_same_numbers(monkeypatch, dtype, options):
    """A chunk's float32 work happens 5 rows at a time, never on the whole chunk, and gives the same loss and
    gradients bit for bit as one call on the whole chunk (rows are independent)."""
    from hf_fusedce.ops.ce import torch_impl
    from hf_fusedce.testing import make_inputs
    vocab = 97
    h, w, t = make_inputs(203, vocab, 24, dtype, seed=3, ignore_ratio=0.2, scale=4.0)
    kw = dict(options, backend="torch", chunk_budget_bytes=64 * vocab * dtype.itemsize)  # 64-row chunks, uneven tail
    monkeypatch.setattr(torch_impl, "ROW_BLOCK_BYTES", 10**9)
    whole = _ce_and_token_stats(h, w, t, **kw)
    monkeypatch.setattr(torch_impl, "ROW_BLOCK_BYTES", 5 * vocab * 4)
    monkeypatch.setattr(torch_impl, "ROW_BLOCK_MIN_ROWS", 1)
    with _Float32Widths(vocab) as seen:
        blocked = _ce_and_token_stats(h, w, t, **kw)
    assert seen.rows and max(seen.rows) <= 5, sorted(set(seen.rows))
    for a, b in zip(whole, blocked):
        assert torch.equal(a, b)


def test_the_budget_pays_the_chunk_only():
    from hf_fusedce.ops.ce import torch_impl
    from hf_fusedce.ops.ce.spec import LossSpec
    from hf_fusedce.ops.token_stats import torch_impl as token_rows
    assert torch_impl.working_bytes_per_logit(LossSpec(softcap=30.0), torch.bfloat16) == 2
    assert torch_impl.working_bytes_per_logit(LossSpec(softcap=30.0), torch.float32) == 4
    assert token_rows.working_bytes_per_logit(token_rows.TokenSpec(), torch.float16) == 2


def test_dw_precision_bench_table():
    """The README's dW-accumulation table comes from this measurement: the fp32 accumulator keeps stock's error,
    native accumulation loses more with more chunks; the table shows every measured row."""
    from hf_fusedce.bench import dw_precision
    result = dw_precision.measure(n=2048, d=32, v=256, chunks=(4, 16))
    fp32 = [row["fp32"] for row in result["rows"]]
    native = [row["native"] for row in result["rows"]]
    assert all(abs(e - result["stock"]) <= 0.05 * result["stock"] for e in fp32), (fp32, result["stock"])
    assert result["stock"] < native[0] < native[1]
    table = dw_precision.to_markdown([result], {"device": "cpu", "torch": torch.__version__, "date": "today"})
    assert "fp32 acc (CUDA, emulated)" in table and "native / stock" in table
    assert table.count("2048 x 32 x 256") == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", ["saturated", "all_at_minus_cap"])
def test_softcap_rows_without_a_row_max_at_the_bound(dtype, shift):
    """Softcaps up to FIXED_SHIFT_MAX_SOFTCAP exponentiate the capped logits unshifted (mode "capped"); larger
    ones, and soft targets, take the row-max path. At the bound, with logits saturated at +-c (exp's extremes:
    e^40 per term, or every term e^-40 when all logits sit at -c), loss and gradients match float64 like the
    general path's, and the two paths agree."""
    import functools
    from hf_fusedce.ops.ce import torch_impl
    from hf_fusedce.ops.ce.spec import LossSpec
    from hf_fusedce.testing import compare_to_reference, make_inputs
    cap = torch_impl.FIXED_SHIFT_MAX_SOFTCAP
    z = torch.zeros(2, 3, dtype=dtype)
    assert torch_impl._write_mode(z, LossSpec(softcap=cap), 1) == "capped"
    assert torch_impl._write_mode(z, LossSpec(softcap=cap + 0.5), 1) == "general"
    assert torch_impl._write_mode(z, LossSpec(softcap=cap), 3) == "general"
    vocab = 1031
    h, w, t = make_inputs(157, vocab, 32, dtype, seed=5, ignore_ratio=0.1, scale=300.0)
    bias = None
    if shift == "all_at_minus_cap":
        bias = torch.full((vocab,), -1e4, dtype=dtype, requires_grad=True)
    fn = functools.partial(fused_linear_cross_entropy, backend="torch", chunk_budget_bytes=64 * vocab * 4)
    kw = dict(softcap=cap, label_smoothing=0.1, z_loss=1e-4)
    capped = compare_to_reference(fn, h, w, t, bias=bias, **kw)
    general = compare_to_reference(fn, h, w, t, bias=bias, **dict(kw, softcap=cap + 1e-6))
    assert rel_err(capped.loss, general.loss) < 1e-5
    for name in ("hidden", "weight"):
        assert rel_err(capped.grads[name].double(), general.grads[name].double()) < (1e-5 if dtype == torch.float32
                                                                                     else 2e-2)
