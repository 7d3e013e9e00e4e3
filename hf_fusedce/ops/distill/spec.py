"""Plain data for the distillation op: its options, and the per-row inputs that carry the teacher.

The CE chunk loop (ce/autograd.py) only ever calls `rows.select(index)` and sets `rows.scale`, so the teacher rides
along as extra per-row inputs: each chunk's teacher logits are computed by the row function from the selected
teacher hidden rows, and the loop itself needs no change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ce.spec import RowInputs


@dataclass(frozen=True)
class DistillSpec:
    """beta: 0 = KL(teacher || student), 1 = KL(student || teacher), between = generalized JSD (TRL's).
    temperature divides both models' logits; hard_label_weight adds that times CE(student logits, targets) at
    temperature 1. has_targets: targets were given (their ids feed the hard-label term)."""

    beta: float = 0.0
    temperature: float = 1.0
    hard_label_weight: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    has_targets: bool = False


@dataclass
class TeacherRows(RowInputs):
    """RowInputs (ids (n, 1) hard labels or zeros, probs unused, weight = 1 on counted tokens, scale) plus the
    teacher: hidden rows (n, Dt), and its head (shared by every chunk) in the dtype its GEMM runs in.
    entropy_sum: None, or a float32 scalar shared by every chunk that the row function adds the student's entropy
    (at the temperature) of each counted row into (TRL logs it)."""

    teacher_hidden: torch.Tensor = None
    teacher_weight: torch.Tensor = None
    teacher_bias: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # these rows' teacher logits, once a row function computed them

    def select(self, index) -> "TeacherRows":
        base = RowInputs.select(self, index)
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        return TeacherRows(base.ids, base.probs, base.weight, base.scale, pick(self.teacher_hidden),
                           self.teacher_weight, self.teacher_bias, self.entropy_sum,
                           None if self.logits is None else pick(self.logits))

    def teacher_logits(self) -> torch.Tensor:
        """These rows' teacher logits z_t = h_t W_t^T + b_t, (n, V), in the teacher head's dtype."""
        if self.logits is not None:
            return self.logits
        h = self.teacher_hidden.to(self.teacher_weight.dtype)
        if self.teacher_bias is not None:
            return torch.addmm(self.teacher_bias, h, self.teacher_weight.t())
        return h @ self.teacher_weight.t()
