"""Hostile and edge input to `fused_linear_cross_entropy` (issue 6), each case on both backends.

Bad input must raise ValueError naming the problem (never an IndexError deep in a kernel, a hang or a crash);
edge input (empty, all ignored, NaN/inf, huge fp16 values, odd strides, N*V > 2^31) must give what the
materialized float64 definition gives, or, for non-finite input, be non-finite exactly where stock PyTorch is.
Decided semantics (documented in the op's docstring): an all-ignored batch gives loss 0 and zero gradients under
every reduction, and num_items_in_batch=0 is treated as 1 (so it also gives 0, not NaN).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from hf_fusedce import fused_linear_cross_entropy
from hf_fusedce.ops import reference_linear_cross_entropy
from hf_fusedce.testing import (
    compare_to_reference,
    make_inputs,
    reference_loss_and_grads,
    run_with_grads,
)

N, V, D = 12, 37, 8  # small: the triton backend runs through the interpreter on CPU


def op(backend, **fixed):
    return functools.partial(fused_linear_cross_entropy, backend=backend, **fixed)


def inputs(device, dtype=torch.float32, n=N, vocab=V, dim=D, **kw):
    h, w, t = make_inputs(n, vocab, dim, dtype, device=device, **kw)
    return h, w, t


# --------------------------------------------------------------------------------------------------------------
# Bad labels
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [V, V + 1, 2**40])
def test_label_at_or_above_vocab_raises(backend, device, bad):
    h, w, t = inputs(device)
    t[3] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
        fused_linear_cross_entropy(h, w, t, backend=backend)


@pytest.mark.parametrize("bad", [-1, -2, -101, -(2**40)])
def test_negative_label_other_than_ignore_index_raises(backend, device, bad):
    h, w, t = inputs(device)
    t[0] = bad
    with pytest.raises(ValueError, match="ignore_index"):
        fused_linear_cross_entropy(h, w, t, backend=backend)


def test_default_ignore_index_is_not_ignored_under_custom_ignore_index(backend, device):
    h, w, t = inputs(device)
    t[0] = -100
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(h, w, t, ignore_index=-1, backend=backend)


def test_bad_soft_target_ids_raise(backend, device):
    h, w, _ = inputs(device)
    ids = torch.randint(0, V, (N, 3), device=device)
    ids[2, 1] = V
    probs = torch.full((N, 3), 1 / 3, device=device)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(h, w, ids, target_probs=probs, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool,
                                   torch.complex64])
def test_non_integer_labels_raise(backend, device, dtype):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="targets must hold integer class ids"):
        fused_linear_cross_entropy(h, w, t.to(dtype), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_match_int64(backend, device, dtype):
    h, w, t = inputs(device, ignore_ratio=0.0)
    want = fused_linear_cross_entropy(h, w, t, backend=backend)
    got = fused_linear_cross_entropy(h, w, t.to(dtype), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ignore_index_inside_vocab_ignores_that_class(backend, device):
    h, w, t = inputs(device)
    t[::3] = 5
    compare_to_reference(op(backend), h, w, t, ignore_index=5)


def test_non_tensor_inputs_raise(backend, device):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="targets must be a torch.Tensor"):
        fused_linear_cross_entropy(h, w, t.tolist(), backend=backend)
    with pytest.raises(ValueError, match="weight must be a torch.Tensor"):
        fused_linear_cross_entropy(h, w.detach().numpy(), t, backend=backend)


# --------------------------------------------------------------------------------------------------------------
# Shapes, ranks, dtypes, devices
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(N + 1,), (N, 1), (1, N), (N // 2, 2), ()])
def test_targets_shape_mismatch_raises(backend, device, shape):
    h, w, _ = inputs(device)
    t = torch.zeros(shape, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="targets shape"):
        fused_linear_cross_entropy(h, w, t, backend=backend)


def test_hidden_dim_mismatch_raises(backend, device):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="does not match weight's hidden dim"):
        fused_linear_cross_entropy(h[:, :-1], w, t, backend=backend)
    with pytest.raises(ValueError, match="does not match weight's hidden dim"):
        fused_linear_cross_entropy(h, w.t(), t, backend=backend)  # (D, V): a transposed head


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_weight_of_wrong_rank_raises(backend, device, rank):
    h, w, t = inputs(device)
    bad = {0: w[0, 0], 1: w[0], 3: w[None]}[rank]
    with pytest.raises(ValueError, match=r"weight must have shape \(vocab, hidden_dim\)"):
        fused_linear_cross_entropy(h, bad, t, backend=backend)


@pytest.mark.parametrize("shape", [(0,), (0, D)])
def test_zero3_style_empty_weight_raises(backend, device, shape):
    """DeepSpeed ZeRO-3 leaves a numel-0 placeholder outside the module's hooks: fail naming it, not garbage."""
    h, _, t = inputs(device)
    with pytest.raises(ValueError, match="weight is empty .* ZeRO-3 partition"):
        fused_linear_cross_entropy(h, torch.empty(shape, device=device), t, backend=backend)


def test_bias_shape_and_dtype_mismatch_raise(backend, device):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_cross_entropy(h, w, t, bias=torch.zeros(V + 1, device=device), backend=backend)
    with pytest.raises(ValueError, match="bias dtype"):
        fused_linear_cross_entropy(h, w, t, bias=torch.zeros(V, dtype=torch.float64, device=device),
                                   backend=backend)


def test_token_weights_and_probs_shape_mismatch_raise(backend, device):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="token_weights shape"):
        fused_linear_cross_entropy(h, w, t, token_weights=torch.ones(N + 1, device=device), backend=backend)
    with pytest.raises(ValueError, match="token_weights must be floating"):
        fused_linear_cross_entropy(h, w, t, token_weights=torch.ones(N, dtype=torch.long, device=device),
                                   backend=backend)
    ids = torch.randint(0, V, (N, 2), device=device)
    with pytest.raises(ValueError, match="target_probs shape"):
        fused_linear_cross_entropy(h, w, ids, target_probs=torch.ones(N, 3, device=device), backend=backend)


@pytest.mark.parametrize("hd,wd", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                   (torch.bfloat16, torch.float16)])
def test_hidden_weight_dtype_mismatch_raises(backend, device, hd, wd):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="does not match weight dtype"):
        fused_linear_cross_entropy(h.to(hd), w.to(wd), t, backend=backend)


def test_integer_hidden_raises(backend, device):
    h, w, t = inputs(device)
    with pytest.raises(ValueError, match="hidden must be a floating tensor"):
        fused_linear_cross_entropy(h.long(), w, t, backend=backend)


@pytest.mark.parametrize("which", ["targets", "weight", "hidden", "bias", "token_weights"])
def test_device_mismatch_raises(backend, device, which):
    """One tensor elsewhere (the meta device stands in for a second device on a CPU-only machine; with CUDA the
    other one is the CPU). The error names the tensors and their devices."""
    other = torch.device("cpu") if device.type == "cuda" else torch.device("meta")
    h, w, t = inputs(device)
    kw = {"bias": torch.zeros(V, device=device), "token_weights": torch.ones(N, device=device)}
    args = {"hidden": h, "weight": w, "targets": t}
    if which in args:
        args[which] = args[which].detach().to(other)
    else:
        kw[which] = kw[which].to(other)
    with pytest.raises(ValueError, match="must be on one device.*" + which + " on " + other.type):
        fused_linear_cross_entropy(args["hidden"], args["weight"], args["targets"], backend=backend, **kw)


def test_bad_options_raise(backend, device):
    h, w, t = inputs(device)
    f = op(backend)
    for kw, msg in [({"reduction": "avg"}, "reduction"), ({"label_smoothing": 1.5}, "label_smoothing"),
                    ({"label_smoothing": -0.1}, "label_smoothing"), ({"z_loss": -1.0}, "z_loss"),
                    ({"softcap": 0.0}, "softcap"), ({"softcap": -3.0}, "softcap"),
                    ({"reduction": "none", "num_items_in_batch": 4}, "num_items_in_batch")]:
        with pytest.raises(ValueError, match=msg):
            f(h, w, t, **kw)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, t, backend="cuda")


# --------------------------------------------------------------------------------------------------------------
# Empty and all-ignored batches
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, device, lead, reduction):
    h = torch.randn(*lead, D, device=device, requires_grad=True)
    w = torch.randn(V, D, device=device, requires_grad=True)
    t = torch.zeros(lead, dtype=torch.long, device=device)
    loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, backend=backend)
    if reduction == "none":
        assert loss.shape == lead
        loss.sum().backward()
    else:
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    assert torch.count_nonzero(w.grad) == 0


ALL_IGNORED_CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "num_items=0": {"num_items_in_batch": 0},
    "num_items=tensor(0)": {"num_items_in_batch": torch.tensor(0)},
    "num_items=7": {"num_items_in_batch": 7},
    "everything": {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0, "logit_scale": 2.0},
    "soft": {"soft": True},
}


@pytest.mark.parametrize("case", list(ALL_IGNORED_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_ignored_gives_zero_loss_and_zero_grads(backend, device, case, dtype):
    kw = dict(ALL_IGNORED_CASES[case])
    h, w, t = inputs(device, dtype, ignore_ratio=0.0)
    b = torch.randn(V, dtype=dtype, device=device, requires_grad=True)
    if kw.pop("soft", False):
        t = torch.full((N, 3), -100, device=device)
        kw["target_probs"] = torch.full((N, 3), 1 / 3, device=device)
    else:
        t = torch.full_like(t, -100)
    loss = fused_linear_cross_entropy(h, w, t, bias=b, backend=backend, **kw)
    assert torch.isfinite(loss).all()
    assert torch.count_nonzero(loss) == 0
    loss.sum().backward()
    for g in (h.grad, w.grad, b.grad):
        assert g is not None and torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_num_items_in_batch_zero_is_treated_as_one(backend, device):
    """Documented choice: 0 -> 1 (a rank whose tokens are all ignored, or a zero count, never divides by 0)."""
    h, w, t = inputs(device, ignore_ratio=0.3)
    zero = fused_linear_cross_entropy(h, w, t, num_items_in_batch=0, backend=backend)
    one = fused_linear_cross_entropy(h, w, t, num_items_in_batch=1, backend=backend)
    total = fused_linear_cross_entropy(h, w, t, reduction="sum", backend=backend)
    torch.testing.assert_close(zero, one)
    torch.testing.assert_close(zero, total)


def test_num_items_in_batch_int_float_and_tensor_agree(backend, device):
    h, w, t = inputs(device, ignore_ratio=0.3)
    got = [fused_linear_cross_entropy(h, w, t, num_items_in_batch=x, backend=backend)
           for x in (19, 19.0, torch.tensor(19), torch.tensor([19]).squeeze(0).to(device))]
    for g in got[1:]:
        torch.testing.assert_close(g, got[0], rtol=0, atol=0)
    compare_to_reference(op(backend), h, w, t, num_items_in_batch=19)


def test_single_token_and_vocab_of_one(backend, device):
    h, w, t = inputs(device, n=1)
    compare_to_reference(op(backend), h[0], w, t[0])  # hidden (D,), targets ()
    h1, w1, t1 = inputs(device, vocab=1)  # one class: loss exactly 0
    loss = fused_linear_cross_entropy(h1, w1, t1, backend=backend)
    assert loss.item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# Non-finite input
# --------------------------------------------------------------------------------------------------------------
def _stock_per_token(h, w, t, dtype):
    logits = (h.detach() @ w.detach().t()).float()
    return torch.nn.functional.cross_entropy(logits, t, reduction="none")


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_hidden_propagates_like_stock(backend, device, poison, dtype):
    """A poisoned token gives a non-finite loss exactly where stock does (per token); the others stay exact;
    the mean is non-finite like stock's; nothing hangs or raises."""
    h, w, t = inputs(device, dtype)
    with torch.no_grad():
        h[4, 2] = poison
    stock = _stock_per_token(h, w, t, dtype)
    per_tok = fused_linear_cross_entropy(h, w, t, reduction="none", backend=backend)
    assert torch.equal(torch.isfinite(per_tok), torch.isfinite(stock)), (per_tok, stock)
    assert not torch.isfinite(per_tok[4])
    fine = torch.isfinite(stock)
    torch.testing.assert_close(per_tok[fine], stock[fine], **_loose(dtype))
    mean = fused_linear_cross_entropy(h, w, t, backend=backend)
    assert not torch.isfinite(mean)
    mean.backward()  # must not raise
    assert h.grad.shape == h.shape
    # rows that carry no poison get finite gradients (the poisoned row's own gradient may be anything)
    clean = torch.ones(N, dtype=torch.bool)
    clean[4] = False
    if poison != poison:  # NaN: dW is NaN like stock; dh of clean rows needs W, which stays finite
        assert torch.isfinite(h.grad[clean.to(h.device)]).all()


def test_nan_in_ignored_row_does_not_leak(backend, device):
    """An ignored token's hidden state never reaches the loss or the weight gradient (stock: loss finite, dW
    finite since the ignored row's dlogits are exactly 0; 0 * NaN would be NaN, so the row must be skipped)."""
    h, w, t = inputs(device, ignore_ratio=0.0)
    with torch.no_grad():
        h[5] = float("nan")
    t[5] = -100
    res = run_with_grads(op(backend), h, w, t)
    ref = reference_loss_and_grads(h.detach().nan_to_num(0.0).requires_grad_(), w, t)
    assert torch.isfinite(res.loss)
    torch.testing.assert_close(res.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(res.grads["weight"]).all()
    torch.testing.assert_close(res.grads["weight"].double(), ref.grads["weight"], rtol=1e-4, atol=1e-6)


def test_nan_in_weight_propagates(backend, device):
    h, w, t = inputs(device)
    with torch.no_grad():
        w[3, 1] = float("nan")
    loss = fused_linear_cross_entropy(h, w, t, backend=backend)
    assert torch.isnan(loss)


def _loose(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.bfloat16, torch.float16) else {"rtol": 1e-5, "atol": 1e-5}


# --------------------------------------------------------------------------------------------------------------
# Large values, low precision
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"softcap": 30.0}, {"z_loss": 1e-4}, {"label_smoothing": 0.1}],
                         ids=["plain", "softcap", "z_loss", "smoothing"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_logits_low_precision_no_overflow(backend, device, dtype, kw):
    """Logits in the thousands: exp() of them overflows anything, and a sum of them overflows float16 (65504).
    The loss must be finite and match float64; no inf/NaN in the gradients."""
    h, w, t = make_inputs(N, V, D, dtype, scale=3000.0, seed=3, device=device)
    with torch.no_grad():
        h.mul_(4.0)  # |logits| up to ~ 3e4, still representable in fp16
    raw = (h.detach().double() @ w.detach().double().t())
    assert raw.abs().max() > 1e4 and raw.abs().max() < 6e4
    res = compare_to_reference(op(backend), h, w, t, **kw)
    assert torch.isfinite(res.loss)
    for g in res.grads.values():
        assert g is None or torch.isfinite(g).all()


def test_float16_large_hidden_sum_reduction_no_overflow(backend, device):
    """The sum of many large per-token losses exceeds float16's range: the loss is float32, never fp16."""
    h, w, t = make_inputs(64, V, D, torch.float16, scale=2000.0, seed=4, device=device)
    loss = fused_linear_cross_entropy(h, w, t, reduction="sum", backend=backend)
    ref = reference_linear_cross_entropy(h.detach().double(), w.detach().double(), t, reduction="sum")
    assert ref.item() > 65504  # the float16 maximum
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= 2e-3 * ref.item()


# --------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["transposed_bt", "strided_rows", "column_major", "expanded", "weight_t_view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(backend, device, layout, dtype):
    g = torch.Generator().manual_seed(1)
    B, T = 3, 5
    if layout == "transposed_bt":  # hidden (T, B, D) viewed as (B, T, D)
        h = torch.randn(T, B, D, generator=g).to(dtype).to(device).transpose(0, 1)
        t = torch.randint(0, V, (T, B), generator=g).to(device).t()
    elif layout == "strided_rows":  # every other token of a longer sequence, every other feature
        h = torch.randn(B, 2 * T, 2 * D, generator=g).to(dtype).to(device)[:, ::2, ::2]
        t = torch.randint(0, V, (B, 2 * T), generator=g).to(device)[:, ::2]
    elif layout == "column_major":  # (N, D) with strides (1, N)
        h = torch.randn(D, B * T, generator=g).to(dtype).to(device).t()
        t = torch.randint(0, V, (B * T,), generator=g).to(device)
    elif layout == "expanded":  # stride-0 rows: the same hidden state repeated
        h = torch.randn(1, D, generator=g).to(dtype).to(device).expand(B * T, D)
        t = torch.randint(0, V, (B * T,), generator=g).to(device)
    else:  # weight given as a transposed view of a (D, V) tensor (tied embeddings stored the other way)
        h = torch.randn(B * T, D, generator=g).to(dtype).to(device)
        t = torch.randint(0, V, (B * T,), generator=g).to(device)
    w = torch.randn(V, D, generator=g).to(dtype).to(device)
    if layout == "weight_t_view":
        w = w.t().contiguous().t()
    assert not h.is_contiguous() or layout == "weight_t_view"
    h.requires_grad_(True)
    w.requires_grad_(True)
    res = compare_to_reference(op(backend, chunk_budget_bytes=4 * V * 4), h, w, t)
    assert res.grads["hidden"].shape == h.shape


def test_leaf_grads_accumulate_into_non_contiguous_leaf(backend, device):
    base = torch.randn(D, N, device=device, requires_grad=True)
    w = torch.randn(V, D, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    fused_linear_cross_entropy(base.t(), w, t, backend=backend).backward()
    ref_b = base.detach().clone().requires_grad_()
    reference_linear_cross_entropy(ref_b.t(), w.detach(), t).backward()
    torch.testing.assert_close(base.grad, ref_b.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Gradient plumbing (bugs seen in peers)
# --------------------------------------------------------------------------------------------------------------
def test_reduction_none_uses_every_grad_output_element(backend, device):
    """Peer bug: reduction='none' gradients multiplied by grad_output[0] instead of per token."""
    h, w, t = inputs(device, ignore_ratio=0.2)
    go = torch.linspace(-2.0, 3.0, N, device=device)
    compare_to_reference(op(backend), h, w, t, reduction="none", grad_output=go)


@pytest.mark.parametrize("needs", [(False, True), (True, False), (False, False)], ids=["w_only", "h_only", "none"])
def test_partial_requires_grad(backend, device, needs):
    """Peer bug: dW missing when hidden does not require grad but W does (frozen trunk, trainable head)."""
    h, w, t = inputs(device, ignore_ratio=0.2)
    h.requires_grad_(needs[0])
    w.requires_grad_(needs[1])
    if not any(needs):
        loss = fused_linear_cross_entropy(h, w, t, backend=backend)
        assert not loss.requires_grad
        ref = reference_linear_cross_entropy(h.double(), w.double(), t)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        return
    res = compare_to_reference(op(backend), h, w, t)
    assert (res.grads["hidden"] is not None) == needs[0]
    assert (res.grads["weight"] is not None) == needs[1]


def test_many_chunks_bf16_weight_grad_does_not_drift(backend, device):
    """Peer bug: dW accumulated in bf16 chunk after chunk drifts. One row per chunk (the worst case) must be as
    accurate as a single chunk."""
    h, w, t = make_inputs(96, V, D, torch.bfloat16, seed=7, device=device)
    rows = 1 if backend == "torch" else 4  # fewer launches under the triton interpreter
    one_chunk = compare_to_reference(op(backend), h, w, t)
    row_chunks = compare_to_reference(op(backend, chunk_budget_bytes=rows * V * 2), h, w, t)
    ref = reference_loss_and_grads(h, w, t)
    from hf_fusedce.testing import rel_err

    e1 = rel_err(one_chunk.grads["weight"], ref.grads["weight"])
    e2 = rel_err(row_chunks.grads["weight"], ref.grads["weight"])
    assert e2 <= 1.5 * e1 + 1e-3, (e1, e2)


def test_loss_is_reused_twice_in_graph(backend, device):
    """The loss used twice (e.g. logged and added to an aux loss) backpropagates the summed grad_output."""
    h, w, t = inputs(device)
    loss = fused_linear_cross_entropy(h, w, t, backend=backend)
    (2.0 * loss + 3.0 * loss).backward()
    ref_h = h.detach().double().requires_grad_()
    (5.0 * reference_linear_cross_entropy(ref_h, w.detach().double(), t)).backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-5, atol=1e-7)


def test_tiny_chunk_budget_and_uneven_tail(backend, device):
    h, w, t = inputs(device, n=23, ignore_ratio=0.3)
    for budget in (1, V * 4 * 3, V * 4 * 22):
        compare_to_reference(op(backend, chunk_budget_bytes=budget), h, w, t, label_smoothing=0.1)


# --------------------------------------------------------------------------------------------------------------
# N * V beyond 2^31 (int64 offsets)
# --------------------------------------------------------------------------------------------------------------
def _check_huge(backend, device, vocab, n_rows, dtype, budget):
    """Most hidden rows are zero, so their logits are all 0: loss log(V) each and, for the summed loss,
    dh = mean_v W_v - W_target, known in closed form for every row; the last rows are random and checked against
    the float64 reference. So every row, including those whose flat offset row*V is beyond 2^31, is verified
    at O(N*D) cost, with the op the only thing that touches N*V logits."""
    g = torch.Generator().manual_seed(11)
    tail = 64
    hidden = torch.zeros(n_rows, 2, dtype=torch.float64)
    hidden[-tail:] = torch.randn(tail, 2, generator=g)
    weight = torch.randn(vocab, 2, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n_rows,), generator=g)
    targets[100:110] = -100  # a few ignored rows: the active rows are gathered, still more than 2^31 logits
    active = targets != -100
    assert active.sum().item() * vocab > 2**31
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # rounded inputs: the reference uses the same values
    h = hidden.to(device).requires_grad_()
    loss = fused_linear_cross_entropy(h, weight.to(device), targets.to(device), reduction="sum", backend=backend,
                                      chunk_budget_bytes=budget)
    loss.backward()
    dh = h.grad.double().cpu()
    w64 = weight.double()
    ref_h = hidden[-tail:].double().requires_grad_()
    ref_tail = reference_linear_cross_entropy(ref_h, w64, targets[-tail:], reduction="sum")
    ref_tail.backward()
    head_active = active[:-tail]
    expected_total = head_active.sum().item() * math.log(vocab) + ref_tail.item()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - expected_total) <= rtol * expected_total, (loss.item(), expected_total)
    expected_dh = torch.where(head_active[:, None], w64.mean(0) - w64[targets[:-tail].clamp(min=0)], 0.0)
    atol = 2e-4 if dtype == torch.float32 else 2e-2  # float32 sums over V = 2^16 terms
    torch.testing.assert_close(dh[:-tail], expected_dh, rtol=1e-4, atol=atol)
    torch.testing.assert_close(dh[-tail:], ref_h.grad, rtol=1e-3 if dtype == torch.float32 else 2e-2,
                               atol=atol)


@pytest.mark.slow
def test_tokens_times_vocab_beyond_int32_torch_cpu():
    """Torch backend on CPU at D=2: N*V ~ 2^31 + 2^22 logits in 256 MiB chunks (the weight is 1 MiB). ~30 s on
    2 cores (one pass of exp over 2^31 logits cannot be cheaper), hence slow."""
    _check_huge("torch", torch.device("cpu"), vocab=1 << 16, n_rows=(1 << 15) + 64, dtype=torch.float32,
                budget=256 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="N*V > 2^31 on the triton kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tokens_times_vocab_beyond_int32_gpu(backend, dtype):
    """One chunk holding more than 2^31 logits (chunk budget raised), so in-kernel offsets row*stride exceed
    int32, on both backends."""
    vocab, n_rows = 1 << 17, (1 << 14) + 64
    _check_huge(backend, torch.device("cuda"), vocab, n_rows, dtype, budget=1 << 40)
