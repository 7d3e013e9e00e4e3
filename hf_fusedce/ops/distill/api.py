"""`fused_linear_distillation`: the public distillation op. Validates like the CE op (it reuses its checks),
then runs the CE op's chunk loop with a distillation row function: the teacher's logits for a chunk are computed
inside the row function from that chunk's teacher hidden rows, so neither model's [tokens x vocab] logits exist
in full."""
from __future__ import annotations

import torch

from ..ce import api
from . import torch_impl
from ..ce.autograd import FusedLinearCrossEntropyFn, Plan
from ..planning.chunking import default_budget_bytes
from .spec import DistillSpec, TeacherRows


def fused_linear_distillation(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    hard_label_weight: float = 0.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_budget_bytes: int | None = None,
) -> torch.Tensor:
    """TRL's generalized JSD between the student's and the teacher's next-token distributions, from both models'
    hidden states and heads, chunk by chunk (same chunk budget as the CE op).

    Both models' logits are divided by ``temperature`` (no T^2 factor). ``beta=0``: KL(teacher || student);
    ``beta=1``: KL(student || teacher); in between beta KL(p_t || m) + (1-beta) KL(p_s || m) with
    m = (1-beta) p_s + beta p_t. Summed over the vocabulary per token; positions whose ``targets`` equal
    ``ignore_index`` are excluded (no targets: every position counts). ``reduction`` / ``num_items_in_batch`` as in
    ``fused_linear_cross_entropy``. ``hard_label_weight`` adds that times the CE of the student's logits at
    temperature 1 against ``targets``. Gradients flow to the student hidden, weight (tied or not) and bias.

    The teacher is a constant: this op computes no gradient for it. Teacher tensors that require grad while grad
    mode is on are refused (pass ``.detach()``, compute them under ``torch.no_grad()``, or freeze the teacher), so
    a gradient is never dropped silently. ``teacher_hidden`` (..., Dt) may have a different width than the student.
    """
    return _run(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature,
                ignore_index, reduction, num_items_in_batch, hard_label_weight, student_bias, teacher_bias, backend,
                chunk_budget_bytes, None)


def distillation_loss_and_entropy(
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None, *, beta=0.0, temperature=1.0,
    ignore_index=-100, reduction="mean", num_items_in_batch=None, hard_label_weight=0.0, student_bias=None,
    teacher_bias=None, backend="auto", chunk_budget_bytes=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_linear_distillation` plus the sum over counted tokens of the student's entropy at the temperature
    (a detached float32 scalar, for logging: TRL's DistillationTrainer reports it), from the same pass."""
    if reduction == "none":
        raise ValueError("distillation_loss_and_entropy needs reduction 'mean' or 'sum' (the entropy is summed in "
                         "the forward, which reduction='none' recomputes in the backward)")
    device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else None
    entropy_sum = torch.zeros((), dtype=torch.float32, device=device)
    loss = _run(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature,
                ignore_index, reduction, num_items_in_batch, hard_label_weight, student_bias, teacher_bias, backend,
                chunk_budget_bytes, entropy_sum)
    return loss, entropy_sum


def _run(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature, ignore_index,
         reduction, num_items_in_batch, hard_label_weight, student_bias, teacher_bias, backend, chunk_budget_bytes,
         entropy_sum):
    spec = DistillSpec(float(beta), float(temperature), float(hard_label_weight), ignore_index, reduction,
                       targets is not None)
    _check_options(spec, backend, num_items_in_batch)
    lead = tuple(student_hidden.shape[:-1]) if isinstance(student_hidden, torch.Tensor) else ()
    labels = targets if targets is not None else _all_counted(student_hidden)
    api._check_tensors(student_hidden, student_weight, labels, student_bias, None, None)
    _check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_bias, labels)
    s2 = student_hidden.reshape(-1, student_hidden.shape[-1])
    t2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    loss_spec = _label_spec(spec)
    rows, valid = api._row_inputs(labels, None, None, loss_spec, s2.shape[0])
    n_valid = api._validate_labels_and_count(rows.ids, valid, loss_spec, student_weight.shape[0])
    active = None if n_valid == s2.shape[0] else valid.nonzero().squeeze(1)
    teacher = _teacher_rows(rows, t2, teacher_weight, teacher_bias, entropy_sum)
    denom = api._denominator(loss_spec, num_items_in_batch, n_valid, s2.device)
    plan = _plan(spec, backend, student_hidden, student_weight, chunk_budget_bytes)
    out = FusedLinearCrossEntropyFn.apply(s2, student_weight, student_bias, teacher, denom, active, plan)
    return out.reshape(lead) if reduction == "none" else out


def _check_options(spec: DistillSpec, backend, num_items_in_batch):
    api._check_options(_label_spec(spec), backend, num_items_in_batch)
    if not 0.0 <= spec.beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: KL(teacher||student), 1: KL(student||teacher)), got {spec.beta}")
    if not spec.temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {spec.temperature}")
    if spec.hard_label_weight < 0.0:
        raise ValueError(f"hard_label_weight must be >= 0, got {spec.hard_label_weight}")
    if spec.hard_label_weight and not spec.has_targets:
        raise ValueError("hard_label_weight > 0 needs targets (the hard labels); pass targets or set it to 0")


def _label_spec(spec: DistillSpec):
    """The CE op's LossSpec for the parts shared with it (ignore_index, reduction)."""
    from ..ce.spec import LossSpec

    return LossSpec(spec.ignore_index, spec.reduction)


def _all_counted(student_hidden):
    """Targets when none are given: every position counts (ids 0 are only read by the hard-label term, off)."""
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() < 1:
        return student_hidden  # let the CE checks name the problem
    return torch.zeros(student_hidden.shape[:-1], dtype=torch.long, device=student_hidden.device)


def _check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_bias, labels):
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        api._check_tensors(teacher_hidden, teacher_weight, labels, teacher_bias, None, None)
    except ValueError as err:  # same rules as the student's pair; say which pair broke them
        raise ValueError(f"teacher: {err}".replace("hidden", "teacher_hidden").replace("weight", "teacher_weight")
                         .replace("bias", "teacher_bias")) from None
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher_weight.shape[0]} != student vocabulary "
                         f"{student_weight.shape[0]}: both heads must score the same token ids")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher tensors on {teacher_hidden.device}, student tensors on {student_hidden.device}: "
                         "put both models' hidden states and heads on one device")
    if torch.is_grad_enabled():
        grads = [n for n, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                                ("teacher_bias", teacher_bias)) if t is not None and t.requires_grad]
        if grads:
            raise ValueError(f"{', '.join(grads)} require(s) grad, but the teacher is a constant here (no gradient "
                             "is computed for it): pass .detach(), run the teacher under torch.no_grad(), or freeze "
                             "it with teacher.requires_grad_(False)")


def _teacher_rows(rows, teacher_hidden, teacher_weight, teacher_bias, entropy_sum) -> TeacherRows:
    """The teacher head runs in its autocast dtype if autocast is on (as its forward would), else its own."""
    device_type = teacher_hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else teacher_weight.dtype
    weight = teacher_weight.detach().to(dtype)
    bias = None if teacher_bias is None else teacher_bias.detach().to(dtype)
    return TeacherRows(rows.ids, rows.probs, rows.weight, rows.scale, teacher_hidden.detach(), weight, bias,
                       entropy_sum)


def _plan(spec, backend, hidden, weight, budget) -> Plan:
    device = hidden.device
    compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
    impl = _resolve_backend(backend, device)
    return Plan(spec, impl.distill_rows, impl.working_bytes_per_logit, compute_dtype,
                budget if budget is not None else default_budget_bytes(device))


def _resolve_backend(backend, device):
    if api._resolve_backend(backend, device).__name__.endswith("triton_impl"):
        from . import triton_impl

        return triton_impl
    return torch_impl
