"""Helpers for testing a fused linear cross-entropy against the materialized float64 definition.

The accuracy rule follows Apple's Cut Cross-Entropy tests: compute the loss and gradients three ways,

* ``ref``  - the materialized definition (`reference_linear_cross_entropy`) in float64 on the same (rounded)
  inputs: the truth;
* ``base`` - what a user gets without this package: logits materialized in the input dtype by ``F.linear``,
  upcast to float32 for the loss (what transformers' ``ForCausalLMLoss`` does), gradients back in the dtype;
* ``ours`` - the op under test;

and require, elementwise, ``|ref - ours| <= k * |ref - base| + rtol * |ref| + atol * max|ref|``: we may be as
wrong as stock PyTorch in the same dtype (times ``k``), plus a few units in the last place of that dtype.

The same rule for a whole tiny model (`assert_model_as_accurate_as_stock`): the float64 reference is the stock
model itself in float64 (`float64_twin`) on the same batch; loss and every parameter gradient of the patched
model must be within ``c`` times stock's own float32 error of it, plus a few ulps.

Also the tiny offline models and batches the tests share (`tiny_llama`, `tiny_batch`; tests/conftest.py offers
them as fixtures). Importing this module does not import transformers; `tiny_llama` does, when called.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .ops.ce.reference import reference_linear_cross_entropy

__all__ = [
    "Tolerance",
    "tolerance_for",
    "rel_err",
    "LossAndGrads",
    "run_with_grads",
    "reference_loss_and_grads",
    "stock_loss_and_grads",
    "assert_within_tolerance",
    "accuracy_bound",
    "assert_as_accurate_as_materialized",
    "compare_to_reference",
    "MODEL_EPS",
    "ModelRun",
    "model_loss_and_grads",
    "float64_twin",
    "inputs_in",
    "assert_model_as_accurate_as_stock",
    "make_inputs",
    "triton_backend_status",
    "device_under_test",
    "tiny_llama",
    "tiny_batch",
]

# Units in the last place of each dtype (machine epsilon 2^-mantissa_bits).
_ULP = {
    torch.float64: 2.0 ** -52,
    torch.float32: 2.0 ** -23,
    torch.bfloat16: 2.0 ** -7,
    torch.float16: 2.0 ** -10,
}


@dataclass(frozen=True)
class Tolerance:
    """|ref - ours| <= k * |ref - base| + rtol * |ref| + atol * max|ref| (elementwise)."""

    k: float
    rtol: float
    atol: float


def tolerance_for(dtype: torch.dtype, k: float = 2.0) -> Tolerance:
    """Dtype-aware slack: a few ulps of ``dtype`` relative to each element and to the tensor's scale.

    float32/float64 inputs: the op promises float32 accuracy, so the slack is set by float32 summation error over
    thousands of terms (~1e-6 relative), not by the input ulp.
    """
    if dtype in (torch.float32, torch.float64):  # the op promises float32 accuracy (per-row factors are float32)
        return Tolerance(k, 2e-5, 2e-5)
    ulp = _ULP[dtype]
    return Tolerance(k, 2 * ulp, 2 * ulp)


@torch.no_grad()
def rel_err(actual: torch.Tensor, expected: torch.Tensor, *, norm: str = "l2", floor: float = 0.0,
            rows: torch.Tensor | None = None, block: int = 8192) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64; 0 when both are 0, inf when only the
    expected is. norm: "l2" (Frobenius) or "max" (largest absolute value). rows: compare these rows of `actual`
    with `expected` (which holds only them). Computed by blocks of rows, so no float64 copy of a large tensor
    is made; `actual` is moved to `expected`'s device block by block."""
    if norm not in ("l2", "max"):
        raise ValueError(f"norm must be 'l2' or 'max', got {norm!r}")
    a, e = actual.detach(), expected.detach()
    if rows is not None:
        a = a.index_select(0, rows.to(a.device))
    if a.numel() != e.numel():
        raise ValueError(f"sizes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    e = e.reshape(-1, 1) if e.dim() < 2 else e
    a = a.reshape(e.shape)
    err = torch.zeros((), dtype=torch.float64, device=e.device)
    scale = torch.zeros((), dtype=torch.float64, device=e.device)
    for s in range(0, e.shape[0], block):
        ref = e[s:s + block].double()
        diff = a[s:s + block].to(device=e.device, dtype=torch.float64) - ref
        if norm == "max":
            err, scale = torch.maximum(err, diff.abs().amax()), torch.maximum(scale, ref.abs().amax())
        else:
            err, scale = err + diff.square().sum(), scale + ref.square().sum()
    num, den = (err.item(), scale.item()) if norm == "max" else (err.sqrt().item(), scale.sqrt().item())
    den = max(den, floor)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


@dataclass
class LossAndGrads:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)


_DIFFERENTIABLE = ("hidden", "weight", "bias")


def run_with_grads(fn: Callable, hidden, weight, targets, *, bias=None, grad_output=None, dtype=None,
                   **kwargs) -> LossAndGrads:
    """Call ``fn(hidden, weight, targets, bias=..., **kwargs)`` on fresh leaf copies (cast to ``dtype`` if given)
    and backpropagate ``grad_output`` (ones for a scalar loss). Returns detached loss and the leaf gradients."""
    leaves = {}
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            leaves[name] = None
            continue
        x = t.detach()
        if dtype is not None:
            x = x.to(dtype)
        leaves[name] = x.clone().requires_grad_(t.requires_grad)
    call = dict(kwargs)
    if leaves["bias"] is not None:
        call["bias"] = leaves["bias"]
    for key in ("token_weights", "target_probs"):
        if call.get(key) is not None and dtype is not None:
            call[key] = call[key].to(torch.float64 if dtype == torch.float64 else call[key].dtype)
    loss = fn(leaves["hidden"], leaves["weight"], targets, **call)
    wants = [leaves[n] for n in _DIFFERENTIABLE if leaves[n] is not None and leaves[n].requires_grad]
    grads = {n: None for n in _DIFFERENTIABLE}
    if wants:
        go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
        got = torch.autograd.grad(loss, wants, go, allow_unused=True)
        it = iter(got)
        for n in _DIFFERENTIABLE:
            if leaves[n] is not None and leaves[n].requires_grad:
                grads[n] = next(it)
    return LossAndGrads(loss.detach(), grads)


def reference_loss_and_grads(hidden, weight, targets, *, bias=None, grad_output=None, **kwargs) -> LossAndGrads:
    """The float64 oracle: the materialized definition on the inputs upcast (exactly) to float64."""
    return run_with_grads(reference_linear_cross_entropy, hidden, weight, targets, bias=bias,
                          grad_output=None if grad_output is None else grad_output.double(),
                          dtype=torch.float64, **kwargs)


def _stock(hidden, weight, targets, *, bias=None, **kwargs):
    """Logits in the input dtype, then the loss in float32 on those rounded logits (transformers' path)."""
    return reference_linear_cross_entropy(hidden, weight, targets, bias=bias, logits_dtype=torch.float32, **kwargs)


def stock_loss_and_grads(hidden, weight, targets, *, bias=None, grad_output=None, **kwargs) -> LossAndGrads:
    """Stock PyTorch in the input dtype: the baseline of the tolerance rule."""
    kw = dict(kwargs)
    for key in ("token_weights", "target_probs"):
        if kw.get(key) is not None:
            kw[key] = kw[key].float()
    return run_with_grads(_stock, hidden, weight, targets, bias=bias,
                          grad_output=None if grad_output is None else grad_output.float(), **kw)


def assert_within_tolerance(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None, tol: Tolerance,
                            name: str = "tensor") -> None:
    """Elementwise |ref - ours| <= k |ref - base| + rtol |ref| + atol max|ref|; raises AssertionError with the
    worst element, the relative errors of ours and of the baseline."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    if ours.numel() == 0:
        return
    o, r = ours.detach().double().cpu(), ref.detach().double().cpu()
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    if not torch.equal(fin_o, fin_r):
        bad = (fin_o != fin_r).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: finiteness differs from the float64 reference at {bad}")
    o, r = torch.where(fin_r, o, 0.0), torch.where(fin_r, r, 0.0)
    scale = r.abs().max()
    allowed = tol.rtol * r.abs() + tol.atol * scale
    if base is not None:
        b = base.detach().double().cpu()
        b = torch.where(torch.isfinite(b), b, r)
        allowed = allowed + tol.k * (r - b).abs()
    err = (r - o).abs()
    excess = err - allowed
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), r.shape)) if r.dim() else ()
        base_err = "n/a" if base is None else f"{rel_err(b, r):.3e}"
        raise AssertionError(
            f"{name}: |ref - ours| = {err.flatten()[i].item():.3e} > allowed {allowed.flatten()[i].item():.3e} at "
            f"{idx} (ref {r.flatten()[i].item():.6e}, ours {o.flatten()[i].item():.6e}); rel err ours "
            f"{rel_err(o, r):.3e}, stock {base_err}; {tol}")


def accuracy_bound(ref: torch.Tensor, materialized: torch.Tensor, *, c: float = 4.0,
                   eps: float | None = None) -> float:
    """The largest relative error (vs the float64 ``ref``) an op may have: ``c`` times the error of the
    materialized computation in the same dtype, plus ``eps`` (default 8 ulps of ``materialized``'s dtype).

    Why not a fixed number: a float32 error depends on the summation order the BLAS and the thread count choose;
    on one CPU an op's dh error was 6.5e-6, on another 1.14e-5. The materialized run on the same
    machine carries the same conditioning (cancellation in p - q, vocabulary length), so the ratio is what is
    portable. c = 4: ours sums in a different order (chunks, row blocks) than the materialized run, so its error
    is another draw of the same size; measured ratios 0.66-1.44 (docs/numerics-tolerances.md). A wrong
    gradient (a dropped vocabulary term out of 32000, a chunk counted twice) is well beyond it
    (tests/ops/test_accuracy_oracle.py)."""
    if eps is None:
        eps = 8 * _ULP.get(materialized.dtype, _ULP[torch.float32])
    return c * rel_err(materialized, ref) + eps


def assert_as_accurate_as_materialized(ours: torch.Tensor, ref: torch.Tensor, materialized: torch.Tensor, *,
                                       c: float = 4.0, eps: float | None = None, name: str = "tensor") -> None:
    """rel_err(ours, ref) <= accuracy_bound(ref, materialized, c=c, eps=eps) (norm-wise, float64 ``ref``);
    the AssertionError names both errors and the bound."""
    err, bound = rel_err(ours, ref), accuracy_bound(ref, materialized, c=c, eps=eps)
    assert err <= bound, (f"{name}: rel err {err:.3e} > bound {bound:.3e} (materialized in the same dtype: "
                          f"{rel_err(materialized, ref):.3e}, c={c})")


def compare_to_reference(fn: Callable, hidden, weight, targets, *, bias=None, grad_output=None,
                         tol: Tolerance | None = None, check_grads: bool = True, **kwargs) -> LossAndGrads:
    """Run ``fn`` (e.g. ``functools.partial(fused_linear_cross_entropy, backend="torch")``) and check its loss
    and gradients against the float64 reference with the stock baseline. Returns ours."""
    dtype = hidden.dtype
    tol = tol or tolerance_for(dtype)
    ours = run_with_grads(fn, hidden, weight, targets, bias=bias, grad_output=grad_output, **kwargs)
    ref = reference_loss_and_grads(hidden, weight, targets, bias=bias, grad_output=grad_output, **kwargs)
    base = stock_loss_and_grads(hidden, weight, targets, bias=bias, grad_output=grad_output, **kwargs)
    assert_within_tolerance(ours.loss, ref.loss, None if base is None else base.loss, tol, "loss")
    if check_grads:
        for name in _DIFFERENTIABLE:
            g_ours, g_ref = ours.grads[name], ref.grads[name]
            if g_ref is None:
                continue
            assert g_ours is not None, f"d{name}: missing gradient"
            want = {"hidden": hidden, "weight": weight, "bias": bias}[name]
            assert g_ours.dtype == want.dtype, f"d{name}: dtype {g_ours.dtype} != input dtype {want.dtype}"
            g_base = None if base is None else base.grads[name]
            assert_within_tolerance(g_ours, g_ref, g_base, tol, f"d{name}")
    return ours


# ---- whole models: patched vs stock, both against the stock model in float64 ---------------------------------

# A gradient is compared relative to max(its norm, GRAD_FLOOR x the largest gradient norm of the model): a
# gradient that is zero in exact arithmetic (a key-projection bias under softmax) is ~1e-10 float noise on both
# sides, and its relative error to itself means nothing.
GRAD_FLOOR = 1e-3
# Below ZERO_GRAD x the largest norm in float64 a gradient is zero in exact arithmetic: the patched one must be
# noise too (below the same threshold), whatever stock's noise is.
ZERO_GRAD = 1e-7


@dataclass
class ModelRun:
    """Loss and every parameter gradient (None: the parameter got none) of one forward/backward."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]


def inputs_in(inputs: dict, dtype: torch.dtype) -> dict:
    """The batch with its floating tensors (pixel values, audio features, inputs_embeds) cast to ``dtype``."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def model_loss_and_grads(model, inputs: dict, *, seed: int = 0) -> ModelRun:
    """``model(**inputs).loss`` and its backward, the random stream seeded (same dropout for every run), floating
    inputs cast to the model's dtype (so the float64 twin sees the same batch)."""
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**inputs_in(inputs, dtype)).loss
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad}
    return ModelRun(loss.detach(), grads)


def float64_twin(model):
    """A float64 copy of the (stock) model: the exact-arithmetic reference on the same weights. Mixture-of-experts
    layers run their eager loop (transformers' default grouped_mm has no float64 kernel; the same function)."""
    twin = copy.deepcopy(model, _detached_state(model)).double()
    if getattr(twin.config, "_experts_implementation", None) not in (None, "eager") and \
            hasattr(twin, "set_experts_implementation"):
        twin.set_experts_implementation("eager")
    return twin


def _detached_state(model) -> dict:
    """A deepcopy memo that copies tensors a forward left on the modules (recurrent states, caches) detached:
    deepcopy refuses a tensor that is not a graph leaf."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if torch.is_tensor(t) and not t.is_leaf:
                    memo[id(t)] = t.detach().clone()
    return memo


def _anchored_err(name: str, ours, stock, exact, floor: float, c: float, eps: float) -> float:
    err, base = rel_err(ours, exact, floor=floor), rel_err(stock, exact, floor=floor)
    bound = c * base + eps
    assert err <= bound, (f"{name}: rel err vs float64 {err:.3e} > bound {bound:.3e} (stock float32's: {base:.3e}, "
                          f"c={c}, eps={eps:.1e}; patched vs stock {rel_err(ours, stock, floor=floor):.3e})")
    return rel_err(ours, stock, floor=floor)


# The "few ulps" of the model-level bound: 32 float32 ulps (3.8e-6). The patched head may form a gradient
# through one more float32 reduction than stock: LoRA on lm_head gets dB = (dW of the merged weight) A^T, a sum
# over the hidden size, where stock sums dlogits^T (x A^T) over tokens; measured 2.0e-6 from float64 while
# stock's was 1.7e-7 (rank 4, hidden 32). A 1e-4 error stays 25x above it.
MODEL_EPS = 32 * _ULP[torch.float32]


def assert_model_as_accurate_as_stock(ours: ModelRun, stock: ModelRun, exact: ModelRun, *, c: float = 4.0,
                                      eps: float = MODEL_EPS, loss_floor: float = 0.0) -> float:
    """The patched model's loss and every gradient as close to the float64 run as ``c`` times stock float32's
    error, plus ``eps`` (relative, norm-wise; gradients against GRAD_FLOOR x the largest gradient). Why not a
    fixed bound: the float32 difference of patched vs stock is rounding whose size depends on which GEMM kernels
    the BLAS picks for the CPU (1.6e-5 on one machine, 5e-6 on another); stock's distance to float64 on the same
    machine moves with it. c = 4: the body is the same code, only the head sums in another order, so the
    patched error is another draw of stock's size. A wrong gradient (1e-4 relative, a dropped term, a chunk
    counted twice) is well beyond it (tests/hf/test_model_accuracy.py). Returns the largest patched-vs-stock
    relative error (the figure the proof records)."""
    bad = [n for n, t in (("loss", exact.loss), *exact.grads.items()) if t is not None and not torch.isfinite(t).all()]
    assert not bad, f"the float64 run is not finite ({bad[:3]}): no reference to compare with"
    worst = _anchored_err("loss", ours.loss, stock.loss, exact.loss, loss_floor, c, eps)
    assert ours.grads.keys() == stock.grads.keys() == exact.grads.keys(), "parameters differ between the runs"
    norms = {n: float(g.double().norm()) for n, g in exact.grads.items() if g is not None}
    top = max(norms.values(), default=0.0)
    for name, g in exact.grads.items():
        assert (g is None) == (ours.grads[name] is None) == (stock.grads[name] is None), \
            f"gradient presence differs for {name}"
        if g is None:
            continue
        if norms[name] <= ZERO_GRAD * top:  # zero in exact arithmetic: the patched gradient must be noise too
            got = float(ours.grads[name].double().norm())
            assert got <= ZERO_GRAD * top, f"grad {name}: norm {got:.1e}, zero in float64"
            continue
        err = _anchored_err(f"grad {name}", ours.grads[name], stock.grads[name], g, GRAD_FLOOR * top, c, eps)
        worst = max(worst, err)
    return worst


def make_inputs(n: int, vocab: int, dim: int, dtype=torch.float32, *, seed: int = 0, ignore_ratio: float = 0.0,
                ignore_index: int = -100, scale: float = 1.0, device="cpu", requires_grad: bool = True):
    """hidden (n, dim), weight (vocab, dim), targets (n,) with about ``ignore_ratio`` ignored; logits have a
    standard deviation of about ``scale``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * (scale / math.sqrt(max(dim, 1)))
    targets = torch.randint(0, vocab, (n,), generator=g)
    if ignore_ratio:
        drop = torch.rand(n, generator=g) < ignore_ratio
        targets = torch.where(drop, torch.full_like(targets, ignore_index), targets)
    hidden = hidden.to(dtype).to(device).requires_grad_(requires_grad)
    weight = weight.to(dtype).to(device).requires_grad_(requires_grad)
    return hidden, weight, targets.to(device)


def triton_backend_status() -> tuple[bool, str]:
    """(usable, why not): the triton backend needs triton and a CUDA device or TRITON_INTERPRET=1 (CPU tensors
    through the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable: {exc}"
    from .ops.ce.api import triton_available

    if not triton_available(device_under_test()):
        return False, "no CUDA device and TRITON_INTERPRET is not 1"
    return True, ""


def device_under_test() -> torch.device:
    """Where op tests put their tensors: CUDA when there is one (compiled kernels), else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def tiny_llama(vocab_size: int = 97, hidden_size: int = 32, tie: bool = False, seed: int = 0, **config):
    """A 2-layer `LlamaForCausalLM` (4 heads, 2 kv heads, MLP 2x hidden) in train mode, seeded with
    `torch.manual_seed(seed)`; `config` overrides `LlamaConfig` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).train()


def tiny_batch(vocab_size: int = 97, batch: int = 2, seq: int = 10, seed: int = 0, prompt: int = 4):
    """(input_ids, labels) of random tokens; labels = input_ids with the first `prompt` of row 0 ignored (-100)."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :prompt] = -100
    return ids, labels
