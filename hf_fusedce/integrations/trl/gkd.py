"""TRL's experimental GKDTrainer on the fused distillation op.

GKD's `compute_loss(model, inputs)` calls the student and the teacher for their full logits, drops the last
position and hands both to `generalized_jsd_loss(student, teacher, labels[:, 1:], beta=self.beta,
num_items_in_batch=...)` (temperature left at its default 1.0: GKD's `temperature` is the sampling one). That
method is wrapped: for a patched student and a patched teacher it computes the same loss with
`fused_linear_distillation` from the teacher's head input and weight (asked of the teacher's patched forward) and
the student's (inside the student's patched forward): sum over the counted positions divided by
`num_items_in_batch` or their count (at least 1), as TRL does; no tokens x vocabulary tensor of either model.

Stock, with a one-time warning saying why: a TRL whose `compute_loss` / `generalized_jsd_loss` differ from the
proven source, an unpatched teacher, `return_outputs=True` (evaluation reads the student's logits), an
encoder-decoder model, a head with logit scaling or softcapping (the distillation op does not apply them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...hf import forward, gather
from ...hf.forward import capture_head_input, head_operands, head_targets, head_transform
from ...hf.patching import is_patched
from ...ops import fused_linear_distillation
from ..imports import after_import
from .per_token import note_once, source_digest

MODULE, TRAINER = "trl.experimental.gkd.gkd_trainer", "GKDTrainer"
DIGEST = "5cfb7de9f3727fb5"  # compute_loss + generalized_jsd_loss, trl 1.16.0
HEAD_INPUT = "hf_fusedce_head_input"  # keyword: the teacher's (head input, weight, bias), nothing else
DISTILL = "hf_fusedce_distill"  # keyword: the student's summed divergence against a DistillRequest's teacher


@dataclass(frozen=True)
class HeadOperands:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    plain: bool  # no logit scaling, softcapping: what the distillation op computes


@dataclass(frozen=True)
class DistillRequest:
    teacher: HeadOperands
    beta: float
    temperature: float = 1.0


def activate() -> None:
    forward.PROTOCOLS[HEAD_INPUT] = serve_head_input
    forward.PROTOCOLS[DISTILL] = serve_distill
    after_import(MODULE, _install)


def _plain(model, spec) -> bool:
    t = head_transform(model, spec)
    return t.softcap is None and t.scale == 1.0 and t.z_coef == 0.0


def serve_head_input(model, original, spec, options, call, _flag=True) -> HeadOperands:
    """The detached operands of the head (adapters included, cut to the vocabulary), never its logits."""
    head = model.get_output_embeddings()
    hidden, _ = capture_head_input(model, head, original, {**call, "labels": None, "use_cache": False})
    vocab = head_transform(model, spec).vocab

    def run(inner, h):
        h2, weight, bias = head_operands(inner, h, vocab)
        return h2.detach(), weight.detach(), None if bias is None else bias.detach()

    return HeadOperands(*gather.call_through(head, run, hidden), _plain(model, spec))


def serve_distill(model, original, spec, options, call, request: DistillRequest):
    """The generalized JSD summed over the positions whose shifted label is counted (None: the head transform is
    not one the op applies)."""
    if not (_plain(model, spec) and request.teacher.plain):
        return None
    head = model.get_output_embeddings()
    hidden, _ = capture_head_input(model, head, original, {**call, "labels": None, "use_cache": False})
    targets, ignore_index = head_targets(model, spec, call, hidden)
    vocab, teacher = head_transform(model, spec).vocab, request.teacher

    def run(inner, h):
        h2, weight, bias = head_operands(inner, h, vocab)
        return fused_linear_distillation(
            h2, weight, teacher.hidden, teacher.weight, targets, beta=request.beta, temperature=request.temperature,
            ignore_index=ignore_index, reduction="sum", student_bias=bias, teacher_bias=teacher.bias,
            backend=options.backend, chunk_budget_bytes=options.chunk_budget_bytes)

    return gather.call_through(head, run, hidden)


def _install(module) -> None:
    cls = getattr(module, TRAINER)
    stock = cls.compute_loss
    if getattr(stock, "__hf_fusedce__", False):
        return
    proven = source_digest(stock, cls.generalized_jsd_loss) == DIGEST

    @functools.wraps(stock)
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not is_patched(model):
            return stock(self, model, inputs, return_outputs, num_items_in_batch)
        reason = _stock_reason(self, cls, proven, return_outputs)
        loss = None if reason else _fused_loss(self, model, inputs, num_items_in_batch)
        if loss is not None:
            return loss
        note_once(TRAINER, reason or "the student's or the teacher's head scales or softcaps its logits, which "
                                     "the fused distillation op does not apply")
        return stock(self, model, inputs, return_outputs, num_items_in_batch)

    compute_loss.__hf_fusedce__ = True
    cls.compute_loss = compute_loss


def _stock_reason(trainer, cls, proven, return_outputs) -> str | None:
    if not proven:
        return (f"this TRL's {TRAINER}.compute_loss / generalized_jsd_loss differ from the ones hf_fusedce was "
                "proven on (trl 1.16.0); pin trl==1.16.0 or update hf_fusedce")
    if type(trainer).generalized_jsd_loss is not cls.generalized_jsd_loss:
        return "a subclass overrides generalized_jsd_loss"
    if not is_patched(trainer.teacher_model):
        return "the teacher model is not patched (call hf_fusedce.patch(teacher_model) too)"
    if return_outputs:
        return "compute_loss(return_outputs=True) (evaluation) returns the student's logits"
    if getattr(trainer.model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not wired through this hook"
    return None


def _fused_loss(trainer, model, inputs, num_items_in_batch):
    trainer.teacher_model.eval()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        teacher = trainer.teacher_model(input_ids=ids, attention_mask=mask, **{HEAD_INPUT: True})
    loss_sum = model(input_ids=ids, attention_mask=mask, labels=inputs["labels"],
                     **{DISTILL: DistillRequest(teacher, float(trainer.beta))})
    if loss_sum is None:
        return None
    if num_items_in_batch is None:
        return loss_sum / (inputs["labels"][:, 1:] != -100).sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch
