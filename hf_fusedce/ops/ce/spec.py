"""Plain data passed from the API to the backends: the loss options and one chunk's per-row inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSpec:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0


@dataclass
class RowInputs:
    """Per-row targets for a chunk of logits rows, already sanitized by the API.

    ids:    (n, K) int64 class ids; ignored entries replaced by 0 (their tau is 0)
    probs:  (n, K) float32 target probabilities tau (1.0 for hard targets)
    weight: (n,)   float32 token weight, 0 for ignored tokens
    scale:  (n,)   float32 upstream gradient factor (may be an expanded scalar)
    """

    ids: torch.Tensor
    probs: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor

    def select(self, index) -> "RowInputs":
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        return RowInputs(pick(self.ids), pick(self.probs), pick(self.weight), pick(self.scale))
