"""TRL's DistillationTrainer on the fused distillation op.

TRL 1.16 computes the trainer's loss in `trl.trainer.distillation_trainer._chunked_divergence_loss` (looked up as a
module global on every step). `install()` wraps `DistillationTrainer._compute_loss` so that, while the student is
patched by `hf_fusedce.patch`, that global is our `fused_divergence_loss` for the step: same arguments, same
(loss, entropy_sum, n_valid) result, same numbers (generalized JSD, temperature, mean over the completion mask or
sum / num_items_in_batch). A student that is not patched runs TRL's own code untouched.
`activate()` (called by `hf_fusedce.patch`) installs the wrapper now, or when TRL's module gets imported.

What ours does not cover is handed back to TRL's own function, with a warning that says why: logit scaling or
final-logit softcapping (Gemma-2/3, Cohere, Granite heads). trl is never imported here: the wrapper is applied
when TRL imports its own module.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from ...hf.tensor_parallel import is_vocab_sharded
from ...ops.distill.api import distillation_loss_and_entropy
from ..imports import after_import

# "hooked": activate() ran; "compute_loss" / "loss": TRL's DistillationTrainer._compute_loss and its
# _chunked_divergence_loss, as they were before the wrapper
_STOCK: dict = {}


def fused_divergence_loss(
    student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight, completion_mask,
    beta, num_items_in_batch=None, student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
    teacher_logit_scale=1.0, student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
    temperature=1.0,
):
    """Drop-in for TRL's `_chunked_divergence_loss` (same signature and returns) on `fused_linear_distillation`."""
    quirks = _unsupported(student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
                          teacher_final_logit_softcapping)
    if is_vocab_sharded(student_lm_head_weight) or is_vocab_sharded(teacher_lm_head_weight):
        quirks = ", ".join(filter(None, [quirks, "a tensor-parallel (vocabulary-sharded) lm_head, which the fused "
                                                 "distillation op does not split yet"]))
    if quirks:
        warnings.warn(f"hf_fusedce: {quirks}: the fused distillation op does not apply it, so this step uses TRL's "
                      "own chunked divergence (same loss, TRL's speed and memory)", stacklevel=2)
        return _stock_loss()(
            student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
            completion_mask, beta, num_items_in_batch, student_lm_head_bias, teacher_lm_head_bias,
            student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
            teacher_final_logit_softcapping, temperature)
    s_w, s_b = _full(student_lm_head_weight, student_hidden_states.dtype), _full(student_lm_head_bias)
    t_w, t_b = _full(teacher_lm_head_weight, teacher_hidden_states.dtype), _full(teacher_lm_head_bias)
    valid = completion_mask.reshape(-1) != 0
    targets = torch.where(valid, 0, -100).reshape(completion_mask.shape)  # a mask: no hard-label term
    loss_sum, entropy_sum = distillation_loss_and_entropy(
        student_hidden_states, s_w, teacher_hidden_states.detach(), t_w.detach(), targets, beta=beta,
        temperature=temperature, reduction="sum", student_bias=s_b,
        teacher_bias=None if t_b is None else t_b.detach())
    n_valid = valid.sum()
    if num_items_in_batch is None:
        return loss_sum / n_valid.clamp(min=1), entropy_sum, n_valid
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch, entropy_sum, n_valid


def _unsupported(s_scale, t_scale, s_cap, t_cap) -> str:
    found = [f"{who} logit scale {v}" for who, v in (("student", s_scale), ("teacher", t_scale)) if v != 1.0]
    found += [f"{who} logit softcapping {v}" for who, v in (("student", s_cap), ("teacher", t_cap)) if v is not None]
    return ", ".join(found)


def _full(t, dtype=None):
    """An FSDP2 / TP DTensor head gathered once (as TRL does), cast to the hidden states' dtype."""
    if t is None or not isinstance(t, torch.distributed.tensor.DTensor):
        return t
    t = t.full_tensor()
    return t if dtype is None else t.to(dtype)


def _stock_loss():
    if "loss" in _STOCK:
        return _STOCK["loss"]
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _chunked_divergence_loss


@contextlib.contextmanager
def _fused_loss_in(module):
    module._chunked_divergence_loss = fused_divergence_loss
    try:
        yield
    finally:
        module._chunked_divergence_loss = _STOCK["loss"]


def activate() -> None:
    """Wrap DistillationTrainer._compute_loss now, or when TRL's distillation module gets imported (idempotent;
    called by `hf_fusedce.patch`)."""
    if not _STOCK.get("hooked"):
        _STOCK["hooked"] = True
        after_import("trl.trainer.distillation_trainer", _install)


def _install(module) -> None:
    """Patched students use the fused op; others run TRL's code untouched."""
    from ...hf.patching import is_patched

    if "compute_loss" in _STOCK:
        return
    stock = module.DistillationTrainer._compute_loss
    _STOCK.update(compute_loss=stock, loss=module._chunked_divergence_loss)

    @functools.wraps(stock)
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if not is_patched(unwrapped_student):
            return stock(self, unwrapped_student, inputs, num_items_in_batch)
        with _fused_loss_in(module):
            return stock(self, unwrapped_student, inputs, num_items_in_batch)

    module.DistillationTrainer._compute_loss = _compute_loss
