"""Helpers for testing a fused linear cross-entropy against the materialized float64 definition.

The accuracy rule follows Apple's Cut Cross-Entropy tests: compute the loss and gradients three ways,

* ``ref``  - the materialized definition (`reference_linear_cross_entropy`) in float64 on the same (rounded)
  inputs: the truth;
* ``base`` - what a user gets without this package: logits materialized in the input dtype by ``F.linear``,
  upcast to float32 for the loss (what transformers' ``ForCausalLMLoss`` does), gradients back in the dtype;
* ``ours`` - the op under test;

and require, elementwise, ``|ref - ours| <= k * |ref - base| + rtol * |ref| + atol * max|ref|``: we may be as
wrong as stock PyTorch in the same dtype (times ``k``), plus a few units in the last place of that dtype.

Nothing here imports transformers; tests of the HF layer may reuse it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .ops.reference import reference_linear_cross_entropy

__all__ = [
    "Tolerance",
    "tolerance_for",
    "rel_err",
    "max_abs_err",
    "LossAndGrads",
    "run_with_grads",
    "reference_loss_and_grads",
    "stock_loss_and_grads",
    "assert_within_tolerance",
    "compare_to_reference",
    "make_inputs",
    "triton_backend_status",
    "available_backends",
    "backend_device",
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


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are 0; inf when only expected is 0)."""
    a, e = actual.detach().double(), expected.detach().double()
    num = (a - e).norm().item()
    den = e.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0


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
    """(usable, why not): the triton backend needs hf_fusedce/ops/triton_impl.py, triton, and a CUDA device or
    TRITON_INTERPRET=1 (CPU tensors through the interpreter)."""
    impl = Path(__file__).resolve().parent / "ops" / "triton_impl.py"
    if not impl.exists():
        return False, "hf_fusedce/ops/triton_impl.py does not exist yet"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable: {exc}"
    from .ops.api import triton_available

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not triton_available(dev):
        return False, "no CUDA device and TRITON_INTERPRET is not 1"
    return True, ""  # an import error in triton_impl is a failure, not a skip: the tests will show it


def backend_device(backend: str) -> torch.device:
    """Where to put the tensors for ``backend``: CUDA when there is one, else CPU (triton then interprets)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends() -> list[str]:
    return ["torch"] + (["triton"] if triton_backend_status()[0] else [])
