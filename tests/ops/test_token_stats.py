"""fused_linear_token_stats against the materialized float64 definition: every per-token output and the
gradients through log_probs and entropy (hidden, weight, bias), at odd shapes, ignored tokens, several chunks,
and with the head options TRL's protocol needs (softcap, scale, temperature, label smoothing)."""
from __future__ import annotations

import pytest
import torch

from hf_fusedce.ops import TOKEN_OUTPUTS, fused_linear_token_stats, reference_token_stats
from hf_fusedce.testing import make_inputs, rel_err

CASES = {
    "plain": {},
    "softcap_scale_temperature": dict(softcap=3.0, logit_scale=1.7, temperature=0.7),
    "temperature": dict(temperature=1.3),
    "label_smoothing": dict(label_smoothing=0.1),
}


def _objective(out, a, b):
    """A loss weighting each token's log-prob and entropy differently (as DPO/GRPO-style objectives do)."""
    return (a * out["log_probs"]).sum() + (b * out["entropy"]).sum()


def _run(fn, h, w, bias, targets, a, b, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    out = fn(h, w, targets, bias=bias, **kw)
    _objective(out, a, b).backward()
    return out, (h.grad, w.grad, bias.grad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(backend, case):
    n, vocab, dim = 37, 203, 19
    h, w, targets = make_inputs(n, vocab, dim, torch.float32, seed=3, ignore_ratio=0.3, scale=4.0)
    bias = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 0.5
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    kw = CASES[case]
    ours, ours_grads = _run(fused_linear_token_stats, h, w, bias, targets, a, b, outputs=TOKEN_OUTPUTS,
                            backend=backend, chunk_budget_bytes=9 * vocab * 16, **kw)  # several chunks
    ref, ref_grads = _run(reference_token_stats, h.double(), w.double(), bias.double(), targets, a.double(),
                          b.double(), **kw)
    ignored = targets == -100
    for name in TOKEN_OUTPUTS:
        assert ours[name].shape == targets.shape
        if name == "is_top1":
            assert ours[name].dtype == torch.bool and torch.equal(ours[name], ref[name])
            continue
        assert ours[name].dtype == torch.float32
        assert rel_err(ours[name], ref[name]) < 2e-6, name
        assert torch.all(ours[name][ignored] == 0), f"{name} not zero at ignored tokens"
    for name, g_ours, g_ref in zip(("hidden", "weight", "bias"), ours_grads, ref_grads):
        assert g_ours.dtype == torch.float32
        assert rel_err(g_ours, g_ref) < 2e-5, f"d{name}"


def test_log_prob_gradient_equals_cross_entropy_none():
    """-log_probs is the per-token cross-entropy: same values and gradients as reduction='none'."""
    from hf_fusedce.ops import fused_linear_cross_entropy

    h, w, targets = make_inputs(29, 111, 13, torch.float32, seed=5, ignore_ratio=0.2)
    up = torch.randn(29, generator=torch.Generator().manual_seed(0))
    lp = fused_linear_token_stats(h, w, targets, backend="torch")["log_probs"]
    (-(lp * up).sum()).backward()
    g1 = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ce = fused_linear_cross_entropy(h, w, targets, reduction="none", backend="torch")
    (ce * up).sum().backward()
    assert rel_err(-lp, ce) < 1e-6
    assert rel_err(g1[0], h.grad) < 1e-6 and rel_err(g1[1], w.grad) < 1e-6


def test_only_requested_outputs_and_no_grad_without_need():
    h, w, targets = make_inputs(8, 50, 6, torch.float32, seed=1)
    out = fused_linear_token_stats(h, w, targets, outputs=("log_probs", "is_top1"), backend="torch")
    assert set(out) == {"log_probs", "is_top1"}
    assert out["log_probs"].requires_grad and not out["is_top1"].requires_grad
    with torch.no_grad():
        assert not fused_linear_token_stats(h, w, targets, backend="torch")["log_probs"].requires_grad


def test_all_ignored_stays_connected():
    h, w, targets = make_inputs(5, 40, 4, torch.float32, seed=2)
    targets = torch.full_like(targets, -100)
    out = fused_linear_token_stats(h, w, targets, outputs=("log_probs", "entropy"), backend="torch")
    (out["log_probs"].sum() + out["entropy"].sum()).backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_rejects_bad_options():
    h, w, targets = make_inputs(4, 10, 3, torch.float32)
    with pytest.raises(ValueError, match="unknown per-token outputs"):
        fused_linear_token_stats(h, w, targets, outputs=("logits",))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_token_stats(h, w, targets, temperature=0.0)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_token_stats(h, w, torch.full_like(targets, 10))
