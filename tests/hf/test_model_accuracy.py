"""The model-level accuracy rule (testing.assert_model_as_accurate_as_stock) passes the patched model as it is
and still catches the bugs a fused head makes, injected into the op's chunk loop: a gradient off by one part
in ten thousand, one token's term dropped, a chunk's weight gradient counted twice. Each must fail the bound
on the tiny Llama; otherwise the bound anchored to stock's float64 error would be too loose to mean anything."""
import pytest
import torch

import hf_fusedce
from hf_fusedce.ops.ce import autograd
from hf_fusedce.testing import (assert_model_as_accurate_as_stock, float64_twin, model_loss_and_grads,
                                tiny_batch, tiny_llama)


@pytest.fixture(scope="module")
def runs():
    """(stock float32 run, float64 run, patched model, batch) of the untied tiny Llama."""
    ids, labels = tiny_batch(seed=3)
    batch = {"input_ids": ids, "labels": labels}
    stock = tiny_llama(tie=False)
    exact = model_loss_and_grads(float64_twin(stock), batch)
    stock_run = model_loss_and_grads(stock, batch)
    patched = hf_fusedce.patch(tiny_llama(tie=False), backend="torch")
    return stock_run, exact, patched, batch


def _run_with(monkeypatch, patched, batch, mutate):
    """The patched run with `mutate(original chunked_pass, its args) -> (loss, grads)` in the op's chunk loop."""
    calls = []
    original = autograd.chunked_pass

    def mutated(*args):
        calls.append(1)
        return mutate(original, *args)

    monkeypatch.setattr(autograd, "chunked_pass", mutated)
    run = model_loss_and_grads(patched, batch)
    assert calls, "the patched model did not run the op's chunk loop"
    return run


def _active(h, active_rows):
    return torch.arange(h.shape[0]) if active_rows is None else active_rows


def test_the_patched_model_as_it_is_passes(runs, monkeypatch):
    stock_run, exact, patched, batch = runs
    ours = _run_with(monkeypatch, patched, batch, lambda f, *a: f(*a))
    assert_model_as_accurate_as_stock(ours, stock_run, exact)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_a_gradient_off_by_one_part_in_ten_thousand_fails(runs, monkeypatch, which):
    stock_run, exact, patched, batch = runs

    def scaled(f, *args):
        loss, grads = f(*args)
        setattr(grads, which, getattr(grads, which) * (1 + 1e-4))
        return loss, grads

    with pytest.raises(AssertionError, match="rel err vs float64"):
        assert_model_as_accurate_as_stock(_run_with(monkeypatch, patched, batch, scaled), stock_run, exact)


def test_a_dropped_token_fails(runs, monkeypatch):
    """The last token with a label left out of the chunk loop (an off-by-one at the last chunk's end)."""
    stock_run, exact, patched, batch = runs

    def dropped(f, h, w, b, rows, active_rows, plan, need):
        return f(h, w, b, rows, _active(h, active_rows)[:-1], plan, need)

    with pytest.raises(AssertionError, match="rel err vs float64"):
        assert_model_as_accurate_as_stock(_run_with(monkeypatch, patched, batch, dropped), stock_run, exact)


def test_a_chunk_counted_twice_fails(runs, monkeypatch):
    """dW plus the first 3 tokens' contribution again (chunk boundaries that overlap)."""
    stock_run, exact, patched, batch = runs

    def twice(f, h, w, b, rows, active_rows, plan, need):
        loss, grads = f(h, w, b, rows, active_rows, plan, need)
        _, again = f(h, w, b, rows, _active(h, active_rows)[:3], plan, (False, need[1], False))
        grads.weight = grads.weight + again.weight
        return loss, grads

    with pytest.raises(AssertionError, match="rel err vs float64"):
        assert_model_as_accurate_as_stock(_run_with(monkeypatch, patched, batch, twice), stock_run, exact)
