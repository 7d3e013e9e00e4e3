"""The accuracy oracle (hf_fusedce.testing.assert_as_accurate_as_materialized) can fail: on the V = 32000
distillation case its bound passes the op as it is and rejects a wrong op or a wrong gradient of the size a real
bug makes (one vocabulary term dropped in the teacher's softmax, one row chunk's weight gradient counted twice,
a gradient scaled by 1 + 1e-4). Mutation test for issue 24's portable tolerances."""
from __future__ import annotations

import functools

import pytest
import torch

from hf_fusedce import fused_linear_distillation
from hf_fusedce.ops import reference_linear_distillation
from hf_fusedce.ops.distill.spec import TeacherRows
from hf_fusedce.testing import accuracy_bound, assert_as_accurate_as_materialized, rel_err

V, ROWS, BUDGET = 32000, 8, 3 * 32000 * 40  # a few rows per chunk: several chunks


def _case():
    g = torch.Generator().manual_seed(4)
    return (torch.randn(ROWS, 16, generator=g), torch.randn(V, 16, generator=g) * 0.8,
            torch.randn(ROWS, 24, generator=g), torch.randn(V, 24, generator=g))


def loss_dh_dw(fn, dtype, rows=slice(None)):
    hs, ws, ht, wt = _case()
    h, w = hs[rows].to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()
    loss = fn(h, w, ht[rows].to(dtype), wt.to(dtype), beta=0.5, temperature=1.3, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


OURS = functools.partial(fused_linear_distillation, backend="torch", chunk_budget_bytes=BUDGET)


@pytest.fixture(scope="module")
def truth():
    return loss_dh_dw(reference_linear_distillation, torch.float64), loss_dh_dw(reference_linear_distillation,
                                                                                 torch.float32)


def test_the_op_as_it_is_passes(truth):
    ref, mat = truth
    for name, a, r, m in zip(("loss", "dh", "dW"), loss_dh_dw(OURS, torch.float32), ref, mat):
        assert_as_accurate_as_materialized(a, r, m, name=name)


def test_a_dropped_vocabulary_term_fails(truth, monkeypatch):
    """The teacher's last logit pushed to -50 (its term gone from the softmax, 1 of 32000): dh and dW are off."""
    real = TeacherRows.teacher_logits

    def drop_last_term(self):
        z = real(self).clone()
        z[:, -1] -= 50.0
        return z
    monkeypatch.setattr(TeacherRows, "teacher_logits", drop_last_term)
    ref, mat = truth
    got = loss_dh_dw(OURS, torch.float32)
    caught = [name for name, a, r, m in zip(("loss", "dh", "dW"), got, ref, mat) if rel_err(a, r) > accuracy_bound(r, m)]
    assert caught, [(rel_err(a, r), accuracy_bound(r, m)) for a, r, m in zip(got, ref, mat)]


def test_a_chunk_counted_twice_fails(truth):
    """dW plus the first 3 rows' contribution again (a chunk boundary that overlaps): caught."""
    ref, mat = truth
    _, _, dw = loss_dh_dw(OURS, torch.float32)
    _, _, dw_chunk = loss_dh_dw(OURS, torch.float32, rows=slice(0, 3))
    with pytest.raises(AssertionError, match="dW: rel err"):
        assert_as_accurate_as_materialized(dw + dw_chunk, ref[2], mat[2], name="dW")


@pytest.mark.parametrize("which", [1, 2])
def test_a_gradient_scaled_by_one_part_in_ten_thousand_fails(truth, which):
    ref, mat = truth
    got = loss_dh_dw(OURS, torch.float32)[which]
    with pytest.raises(AssertionError, match="rel err"):
        assert_as_accurate_as_materialized(got * (1 + 1e-4), ref[which], mat[which])
