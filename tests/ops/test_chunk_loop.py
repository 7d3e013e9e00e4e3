"""Chunk-loop internals: the dW accumulation policy, the in-place blockwise downcast, chunk rows in multiples of
128, the first chunk's beta=0 write (no zero fill) and the skipped scaling when grad_out is 1."""
from __future__ import annotations

import pytest
import torch

from hf_fusedce import fused_linear_cross_entropy
from hf_fusedce.ops import autograd
from hf_fusedce.ops.chunking import ROW_MULTIPLE, rows_per_chunk
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
