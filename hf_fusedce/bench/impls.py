"""One entry per implementation of the loss head that the bench times.

Every implementation is a forward `fn(hidden, weight, targets) -> scalar loss` (mean over tokens) whose
backward autograd runs; the runner calls it under the dtype mode's autocast and then `loss.backward()`,
so all are timed and measured the same way. `resolve(device)` returns the forward or a reason it is
skipped ("skipped: not installed", ...), so a missing peer is a record, not a crash.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Impl:
    name: str
    kind: str  # "ours" | "stock" | "peer" | "floor"
    strategy: "str | Callable[[torch.device], str]"  # free text recorded with each measurement
    exact: bool  # exact gradients (as opposed to skipping small ones)
    _resolve: Callable[[torch.device], "Forward | str"] = field(repr=False)
    default: bool = True  # part of the default matrix
    cpu_opt_in: bool = False  # on CPU, measured only when named in --impls (interpreter-only there)
    softcap: bool = False  # the forward takes softcap=... (final-logit softcapping, Gemma 2)

    def describe(self, device: torch.device) -> str:
        return self.strategy(device) if callable(self.strategy) else self.strategy

    def resolve(self, device: torch.device, explicit: bool = False) -> "Forward | str":
        """The forward, or a string "skipped: reason"."""
        if self.cpu_opt_in and device.type != "cuda" and not explicit:
            return ("skipped: on CPU only the Triton interpreter runs it (far too slow to time); "
                    "name it in --impls with TRITON_INTERPRET=1 to time it anyway")
        try:
            out = self._resolve(device)
        except ImportError as err:
            return f"skipped: not installed ({err})"
        return out


def _needs_cuda(device, what):
    if device.type != "cuda":
        return (f"skipped: {what} runs on CUDA only (on CPU only under TRITON_INTERPRET=1, the Triton interpreter: "
                "far too slow to time)")
    return None


# ---------------------------------------------------------------- ours
def _ours(backend: str):
    def resolve(device):
        from hf_fusedce.ops import fused_linear_cross_entropy
        from hf_fusedce.ops.ce.api import triton_available

        if backend == "triton" and not triton_available(device):
            return "skipped: triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU)"

        def fwd(h, w, y, softcap=None):
            return fused_linear_cross_entropy(h, w, y, backend=backend, softcap=softcap)

        return fwd

    return resolve


def _ours_strategy(backend: str):
    def describe(device) -> str:
        from hf_fusedce.ops.planning.chunking import ENV_BUDGET_MB, default_budget_bytes

        src = f"env {ENV_BUDGET_MB}" if os.environ.get(ENV_BUDGET_MB) else "default"
        if device.type == "cuda" and src == "default":
            return f"chunked, grads in forward, backend={backend}, chunk budget: roofline pick per shape"
        if device.type == "cpu" and src == "default":
            from hf_fusedce.ops.planning.cpu_plan import plan_mode

            return (f"chunked, grads in forward, backend={backend}, chunk budget: CPU cost-model pick per shape "
                    f"(ops/planning/cpu_plan.py, {plan_mode()})")
        return (f"chunked, grads in forward, backend={backend}, "
                f"chunk budget {default_budget_bytes(device) / 2**20:g} MiB ({src})")

    return describe


# ---------------------------------------------------------------- stock (what transformers does)
def _stock(device):
    def fwd(h, w, y, softcap=None):
        logits = F.linear(h, w)  # bf16 under autocast, like lm_head
        if softcap is not None:  # Gemma 2's final_logit_softcapping, as its forward does it
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.float()  # ForCausalLMLoss upcasts the logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100, reduction="mean")

    return fwd


def _stock_compiled(device):
    """The stock loss under torch.compile (inductor may fuse or chunk it; TORCHINDUCTOR_AUTO_CHUNKER=1 asks it to
    chunk the logits). The first call compiles: the bench's warm-up calls absorb it."""
    return torch.compile(_stock(device), dynamic=False)


# ---------------------------------------------------------------- torch.nn.functional.linear_cross_entropy
def _torch_lce(device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"skipped: not in this torch ({torch.__version__}; needs >= 2.13)"
    options_cls = torch.nn.LinearCrossEntropyOptions

    def fwd(h, w, y):
        return F.linear_cross_entropy(h, w, y, reduction="mean", ignore_index=-100, options=options_cls())

    return fwd


# ---------------------------------------------------------------- Liger-Kernel
def _liger(accum_fp32: bool):
    def resolve(device):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        skip = _needs_cuda(device, "Liger-Kernel (Triton GPU kernels)")
        if skip:
            return skip
        kwargs = {"accum_dtype": torch.float32} if accum_fp32 else {}

        def fwd(h, w, y):
            return liger_fused_linear_cross_entropy(h, w, y, ignore_index=-100, reduction="mean", **kwargs)

        return fwd

    return resolve


# ---------------------------------------------------------------- Apple cut-cross-entropy
def _cce(exact: bool):
    def resolve(device):
        from cut_cross_entropy import linear_cross_entropy

        skip = _needs_cuda(device, "cut-cross-entropy (Triton GPU kernels)")
        if skip:
            return skip
        try:  # newer releases name presets; 25.1.x exposes filter_eps (None = no gradient filtering)
            importlib.import_module("cut_cross_entropy.cce_utils")
            kwargs = {"impl": "cce_exact"} if exact else {"impl": "cce"}
        except ImportError:
            kwargs = {"filter_eps": None} if exact else {}

        def fwd(h, w, y):
            if torch.is_autocast_enabled(h.device.type):  # CCE's kernels take the dtype they are given
                dt = torch.get_autocast_dtype(h.device.type)
                h, w = h.to(dt), w.to(dt)
            return linear_cross_entropy(h, w, y, ignore_index=-100, reduction="mean", **kwargs)

        return fwd

    return resolve


# ---------------------------------------------------------------- TRL's fused head (trl.kernels)
def _trl(device):
    from trl.kernels import ChunkedLogProbFunction

    def fwd(h, w, y, softcap=None):
        keep = y != -100  # TRL's trainers drop ignored rows before calling it
        logprobs = ChunkedLogProbFunction.apply(h[keep], w, None, y[keep], 1.0, TRL_VOCAB_CHUNK, softcap, 1.0, ())[0]
        return -logprobs.sum() / keep.sum().clamp(min=1)

    return fwd


TRL_VOCAB_CHUNK = 32768  # the vocabulary tile of TRL 1.16's CPU path (4096 tokens x 32768)


# ---------------------------------------------------------------- the floor: three GEMMs, nothing else
class _ThreeGemms(torch.autograd.Function):
    """z = h W^T (forward); dh = z W and dW = z^T h (backward), with z standing in for dL/dz.

    The same three GEMMs every exact fused head must do (6*N*D*V FLOPs), no softmax, no chunking.
    The "loss" is a zero scalar so no reduction over z is timed."""

    @staticmethod
    def forward(ctx, h, w):
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else w.dtype
        hc, wc = h.to(dt), w.to(dt)
        z = hc @ wc.t()
        ctx.save_for_backward(hc, wc, z)
        ctx.dtypes = (h.dtype, w.dtype)
        return torch.zeros((), device=h.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        hc, wc, z = ctx.saved_tensors
        dh = z @ wc
        dw = z.t() @ hc
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


class _ThreeGemmsBlocked(torch.autograd.Function):
    """The same three GEMMs in row blocks of FLOOR_BLOCK_ROWS (z_b kept only for its block): memory independent
    of N (V x 1024 logits), and on a CPU blocked GEMMs run at least as fast as one N x V GEMM streaming its
    output through memory. dW accumulates over blocks (N / 1024 read-modify-writes of V x D)."""

    @staticmethod
    def forward(ctx, h, w):
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else w.dtype
        ctx.save_for_backward(h.to(dt), w.to(dt))
        ctx.dtypes = (h.dtype, w.dtype)
        return torch.zeros((), device=h.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        hc, wc = ctx.saved_tensors
        dh, dw = torch.empty_like(hc), None
        for start in range(0, hc.shape[0], FLOOR_BLOCK_ROWS):
            hb = hc[start:start + FLOOR_BLOCK_ROWS]
            z = hb @ wc.t()  # GEMM 1 (timed in backward so z lives one block at a time)
            torch.mm(z, wc, out=dh[start:start + FLOOR_BLOCK_ROWS])
            dw = z.t() @ hb if dw is None else dw.addmm_(z.t(), hb)
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1])


FLOOR_BLOCK_ROWS = 1024


def _floor_blocked(device):
    def fwd(h, w, y, softcap=None):
        return _ThreeGemmsBlocked.apply(h, w)

    return fwd


def _floor(device):
    def fwd(h, w, y, softcap=None):  # softcapping adds no GEMM: the floor is the same
        return _ThreeGemms.apply(h, w)

    return fwd


def _registry() -> dict[str, Impl]:
    impls = [
        Impl("ours-torch", "ours", _ours_strategy("torch"), True, _ours("torch"), softcap=True),
        Impl("ours-triton", "ours", _ours_strategy("triton"), True, _ours("triton"), cpu_opt_in=True, softcap=True),
        Impl("stock", "stock", "logits materialized, .float(), F.cross_entropy (transformers ForCausalLMLoss)",
             True, _stock, softcap=True),
        Impl("stock-compiled", "peer", "torch.compile of the stock loss (logits, .float(), F.cross_entropy)",
             True, _stock_compiled, default=False),
        Impl("torch-lce", "peer", "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions())",
             True, _torch_lce),
        Impl("liger", "peer", "Liger-Kernel fused linear cross-entropy, default (dW accumulated in input dtype)",
             True, _liger(False)),
        Impl("liger-fp32acc", "peer", "Liger-Kernel fused linear cross-entropy, accum_dtype=float32",
             True, _liger(True)),
        Impl("cce", "peer", "Apple cut-cross-entropy, default (gradient filtering: approximate)", False, _cce(False)),
        Impl("cce-exact", "peer", "Apple cut-cross-entropy, no gradient filtering (exact)", True, _cce(True)),
        Impl("trl-chunked", "peer", f"TRL trl.kernels.ChunkedLogProbFunction (vocab tiles of {TRL_VOCAB_CHUNK}; "
             "recompute in backward, fp32 dW)", True, _trl, softcap=True),
        Impl("floor", "floor", "the three GEMMs alone: z=hW^T, dh=zW, dW=z^T h (timing floor; no loss)",
             True, _floor, softcap=True),
        Impl("floor-blocked", "floor", f"the three GEMMs in row blocks of {FLOOR_BLOCK_ROWS}: z_b=h_b W^T, dh_b=z_b W, "
             "dW+=z_b^T h_b (timing floor with N-independent memory; no loss)", True, _floor_blocked,
             default=False, softcap=True),
    ]
    return {i.name: i for i in impls}


IMPLS = _registry()


def parse_impls(text: str | None) -> list[Impl]:
    if not text:
        return [i for i in IMPLS.values() if i.default]
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name not in IMPLS:
            raise ValueError(f"unknown impl {name!r}; choose from {', '.join(IMPLS)}")
        out.append(IMPLS[name])
    return out
