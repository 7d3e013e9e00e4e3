"""The native softcap row kernel (ops/ce/cpu_native.py, capped_rows.c): same numbers as the eager "capped" rows
and as float64, every option and gradient; a missing compiler or switch-off falls back to the eager path."""
from __future__ import annotations

import functools

import pytest
import torch

from hf_fusedce import fused_linear_cross_entropy
from hf_fusedce.ops.ce import cpu_native, torch_impl
from hf_fusedce.testing import compare_to_reference, make_inputs, rel_err, run_with_grads

VOCAB, DIM = 1031, 32
OPTIONS = {"plain": {"softcap": 30.0},
           "everything": {"softcap": 7.0, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_scale": 1.3}}


def _op(budget_rows=40):
    return functools.partial(fused_linear_cross_entropy, backend="torch",
                             chunk_budget_bytes=budget_rows * VOCAB * 4)  # several chunks, an uneven tail


@pytest.fixture
def native_calls(monkeypatch):
    if not cpu_native.available():
        pytest.skip(f"native CPU kernel {cpu_native.status()}")
    calls = []
    real = cpu_native.capped_rows
    monkeypatch.setattr(cpu_native, "capped_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIONS)
def test_native_rows_match_float64_and_the_eager_rows(monkeypatch, native_calls, dtype, name):
    kw = OPTIONS[name]
    h, w, t = make_inputs(157, VOCAB, DIM, dtype, seed=11, ignore_ratio=0.2, scale=20.0)
    bias = torch.randn(VOCAB, dtype=dtype).requires_grad_()
    native = compare_to_reference(_op(), h, w, t, bias=bias, **kw)
    assert native_calls, "the native kernel did not run"
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    eager = run_with_grads(_op(), h, w, t, bias=bias, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 gradients: one rounding apart at most per entry
    assert rel_err(native.loss.double(), eager.loss.double()) < 1e-6
    for g in ("hidden", "weight", "bias"):
        assert rel_err(native.grads[g].double(), eager.grads[g].double()) < tol, g


def test_forward_only_and_row_stats(native_calls):
    """No gradient asked: the loss alone, the chunk left unwritten is not read again."""
    h, w, t = make_inputs(64, VOCAB, DIM, torch.bfloat16, seed=2, requires_grad=False)
    with torch.no_grad():
        loss = _op()(h, w, t, softcap=30.0, label_smoothing=0.1)
    from hf_fusedce.ops.ce.reference import reference_linear_cross_entropy
    ref = reference_linear_cross_entropy(h.double(), w.double(), t, softcap=30.0, label_smoothing=0.1)
    assert native_calls and abs(loss.item() - ref.item()) < 1e-5 * ref.item()


def test_larger_caps_and_soft_targets_stay_eager(native_calls):
    h, w, t = make_inputs(32, VOCAB, DIM, torch.float32, seed=3)
    _op()(h, w, t, softcap=torch_impl.FIXED_SHIFT_MAX_SOFTCAP + 1.0).backward()
    assert not native_calls


def test_no_compiler_falls_back_to_the_eager_rows(monkeypatch, tmp_path):
    """No C compiler: the kernel is unavailable with the reason, the op runs the eager rows, same numbers."""
    monkeypatch.setenv("CC", "no-such-cc-hf-fusedce")
    monkeypatch.setenv("HF_FUSEDCE_CACHE", str(tmp_path))  # no cached build to reuse
    cpu_native._load.cache_clear()
    try:
        assert not cpu_native.available() and "no C compiler" in cpu_native.status()
        h, w, t = make_inputs(50, VOCAB, DIM, torch.float32, seed=4, ignore_ratio=0.1)
        compare_to_reference(_op(), h, w, t, softcap=30.0)
    finally:
        cpu_native._load.cache_clear()


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    assert not cpu_native.available() and cpu_native.status().startswith("off")
    assert not cpu_native.supports(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))
