"""`fused_linear_cross_entropy`: the public op. Validates input, normalizes options, picks a backend."""
from __future__ import annotations

import os

import torch

from . import torch_impl
from .autograd import FusedLinearCrossEntropyFn, Plan, check_dw_accumulation
from ..planning.chunking import ENV_BUDGET_MB, default_budget_bytes
from .spec import LossSpec, RowInputs

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    token_weights: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_budget_bytes: int | None = None,
    dw_accumulation: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of softmax(z) with z = softcap*tanh(logit_scale*(hidden @ weight.T + bias)/softcap),
    computed chunk by chunk so the [tokens x vocab] logits never exist in full.

    Same numbers as materializing the logits and calling ``F.cross_entropy`` (float32 accumulation).
    ``targets`` are already aligned with ``hidden`` (no shift). ``reduction="none"`` returns per-token losses
    (zeros at ignored tokens). ``num_items_in_batch`` makes the loss sum/num_items_in_batch (HF's gradient
    accumulation rule; 0 is treated as 1, so an all-ignored batch gives 0). ``token_weights`` multiplies each
    token's loss (the mean still divides by the count of non-ignored tokens). Soft targets: ``targets`` of
    shape (..., k) holding class ids and ``target_probs`` (..., k) their probabilities. ``z_loss`` adds
    z_loss * logsumexp(z)^2 per non-ignored token. ``chunk_budget_bytes`` bounds the logits working set
    (default: picked per shape, CPU <= 768 MiB (ops/planning/cpu_plan.py), CUDA by
    ops/planning/cost_model.py; env HF_FUSEDCE_CHUNK_BUDGET_MB). ``dw_accumulation`` ("auto" | "fp32" | "native")
    sets how a bf16/fp16 weight's gradient accumulates over chunks (README, "GPU status"). The loss is float32.

    Deliberate deviations from stock (docs/patching.md lists them all): all tokens ignored -> 0 and zero
    gradients (stock: NaN); a +inf logit -> +inf where stock gives NaN (finite exactly where stock is); targets
    of any integer dtype (stock: int64 or uint8 only); bad labels -> ValueError.
    """
    spec = LossSpec(ignore_index, reduction, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap), float(logit_scale))
    _check_options(spec, backend, num_items_in_batch)
    check_dw_accumulation(dw_accumulation)
    _check_tensors(hidden, weight, targets, bias, token_weights, target_probs)
    lead = targets.shape[:-1] if target_probs is not None else targets.shape
    d, vocab = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, d)
    rows, valid = _row_inputs(targets, target_probs, token_weights, spec, h2.shape[0])
    if torch.compiler.is_compiling():  # no host sync in a graph: every row runs (ignored ones weigh 0)
        _assert_labels_in_range(rows.ids, spec, vocab)
        active, n_valid = None, valid.sum()
    else:
        n_valid = _validate_labels_and_count(rows.ids, valid, spec, vocab)
        active = None if n_valid == h2.shape[0] else valid.nonzero().squeeze(1)
    denom = _denominator(spec, num_items_in_batch, n_valid, h2.device)
    plan = _plan(spec, backend, hidden, weight, chunk_budget_bytes, dw_accumulation)
    out = FusedLinearCrossEntropyFn.apply(h2, weight, bias, rows, denom, active, plan)
    return out.reshape(lead) if reduction == "none" else out


def _check_options(spec: LossSpec, backend, num_items_in_batch):
    if spec.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {spec.reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0.0 <= spec.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {spec.label_smoothing}")
    if spec.z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {spec.z_loss}")
    if spec.softcap is not None and spec.softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {spec.softcap}")
    if num_items_in_batch is not None and spec.reduction == "none":
        raise ValueError("num_items_in_batch cannot be combined with reduction='none'")


def _check_tensors(hidden, weight, targets, bias, token_weights, target_probs, empty_vocab_ok=False):
    """empty_vocab_ok: a (0, D) weight is a legal vocabulary slice (vocab-parallel ranks past the vocabulary)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating tensor, got dtype {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.numel() == 0 and not (empty_vocab_ok and weight.dim() == 2 and weight.shape[1] > 0):
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): a DeepSpeed ZeRO-3 partition read outside "
                         "its module's forward? Gather it first (deepspeed.zero.GatheredParameters) or call the op "
                         "from inside the module's forward")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (vocab, hidden_dim), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim {tuple(hidden.shape)[-1:]} does not match weight's hidden dim "
                         f"{weight.shape[1]} (hidden shape {tuple(hidden.shape)}, weight shape {tuple(weight.shape)})")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"targets must hold integer class ids (int64), got dtype {targets.dtype}")
    expect = tuple(hidden.shape[:-1])
    got = tuple(targets.shape[:-1]) if target_probs is not None else tuple(targets.shape)
    if got != expect:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden's leading shape {expect}")
    devices = {"hidden": hidden.device, "weight": weight.device, "targets": targets.device}
    if bias is not None:
        devices["bias"] = bias.device
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} does not match weight dtype {weight.dtype}")
    if token_weights is not None:
        devices["token_weights"] = token_weights.device
        if tuple(token_weights.shape) != expect:
            raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal {expect}")
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights must be floating, got {token_weights.dtype}")
    if target_probs is not None:
        devices["target_probs"] = target_probs.device
        if target_probs.shape != targets.shape:
            raise ValueError(f"target_probs shape {tuple(target_probs.shape)} must equal targets shape "
                             f"{tuple(targets.shape)} (ids and their probabilities side by side)")
        if not target_probs.is_floating_point():
            raise ValueError(f"target_probs must be floating, got {target_probs.dtype}")
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} does not match weight dtype {weight.dtype} "
                         "(cast one, or run under torch.autocast)")


def _row_inputs(targets, target_probs, token_weights, spec, n_rows):
    if target_probs is not None:
        ids = targets.reshape(n_rows, -1).long()
        keep = ids != spec.ignore_index
        probs = torch.where(keep, target_probs.reshape(ids.shape).float(), 0.0)
        valid = keep.any(1)
    else:
        ids = targets.reshape(n_rows, 1).long()
        valid = ids[:, 0] != spec.ignore_index
        probs = valid[:, None].float()
    weight = valid.float()
    if token_weights is not None:
        weight = weight * token_weights.reshape(n_rows).float()
    ids = torch.where(ids == spec.ignore_index, 0, ids)  # sanitized; range is checked on these
    return RowInputs(ids, probs, weight, torch.ones(1, device=ids.device).expand(n_rows)), valid


def _validate_labels_and_count(ids, valid, spec, vocab) -> int:
    """One host sync: the count of non-ignored tokens and the count of labels out of range."""
    bad = ((ids < 0) | (ids >= vocab)).sum()
    n_bad, n_valid = torch.stack([bad, valid.sum()]).tolist()
    if n_bad:
        raise ValueError(f"{n_bad} target label(s) outside [0, {vocab}) that are not ignore_index "
                         f"({spec.ignore_index}): labels must be class ids below the vocabulary size")
    return int(n_valid)


def _assert_labels_in_range(ids, spec, vocab):
    """Under torch.compile: the range check as an asynchronous device assert (no host sync, no graph break);
    it fails when the graph runs (CPU: RuntimeError; CUDA: device-side assert), as stock cross_entropy does."""
    torch._assert_async(((ids >= 0) & (ids < vocab)).all(),
                        f"target labels outside [0, {vocab}) that are not ignore_index ({spec.ignore_index})")


def _denominator(spec, num_items_in_batch, n_valid, device):
    """n_valid: an int (eager) or a 0-d tensor (under torch.compile)."""
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)
        return denom.clamp(min=1.0)
    if spec.reduction == "sum":
        return torch.ones((), device=device)
    if isinstance(n_valid, torch.Tensor):
        return n_valid.to(torch.float32).clamp(min=1.0)
    return torch.tensor(float(max(n_valid, 1)), device=device)


def _plan(spec, backend, hidden, weight, budget, dw_accumulation="auto") -> Plan:
    device = hidden.device
    if torch.is_autocast_enabled(device.type):
        compute_dtype = torch.get_autocast_dtype(device.type)
    else:
        compute_dtype = weight.dtype
    impl = _resolve_backend(backend, device)
    if budget is None:
        budget = _default_budget(device, hidden, weight, compute_dtype, dw_accumulation)
    return Plan(spec, impl.ce_rows, impl.working_bytes_per_logit, compute_dtype, budget,
                dw_accumulation=dw_accumulation)


def _default_budget(device, hidden, weight, compute_dtype, dw_accumulation) -> int:
    """No env override: CUDA low precision, the roofline model's pick for this shape (ops/planning/cost_model.py);
    CPU, the pick of the CPU cost model (ops/planning/cpu_plan.py); otherwise the per-device default."""
    n = hidden.numel() // max(1, hidden.shape[-1])
    if os.environ.get(ENV_BUDGET_MB):
        return default_budget_bytes(device)
    if device.type == "cpu" and compute_dtype in (torch.float32, torch.bfloat16, torch.float16):
        from ..planning.cpu_plan import default_budget
        return default_budget(n, weight.shape[1], weight.shape[0], compute_dtype, dw_accumulation)
    if device.type != "cuda" or compute_dtype not in (torch.bfloat16, torch.float16):
        return default_budget_bytes(device)
    from ..planning.cost_model import choose_budget
    return choose_budget(n, weight.shape[1], weight.shape[0], compute_dtype, dw_accumulation=dw_accumulation)


def triton_available(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_backend(backend: str, device: torch.device):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "torch":
        return torch_impl
    if not triton_available(device):
        raise ValueError(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU) and triton "
                         f"installed; got a tensor on {device}")
    from . import triton_impl
    return triton_impl
