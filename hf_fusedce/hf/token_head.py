"""Per-token head outputs (log-prob of each next-token label, entropy, top-1 hit, ...) of any patched family.

The same capture and head table as the loss (forward.py): the model's own forward runs up to its output
embeddings, the family's transform (softcap, scale, vocabulary slice, shift or not, router aux) comes from
heads.HEADS, and `fused_linear_token_stats` scores every label without materializing the logits. This is
what outside per-token protocols (TRL's `fused_lm_head`) are answered with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import fused_linear_token_stats
from . import gather
from .forward import capture_head_input, head_operands, head_targets, head_transform, router_aux
from .heads import resolve


@dataclass
class TokenHeadResult:
    """per_token: {name: (batch, positions)}; positions are seq_len - 1 for shifted labels, seq_len for
    `shift_labels` and unshifted families. label_mask: labels that are scored. aux: router load balancing."""
    per_token: dict
    label_mask: torch.Tensor
    aux: torch.Tensor | None
    aux_coef: float


def token_outputs(model, original, spec, options, call, *, outputs=("log_probs",), temperature=1.0,
                  label_smoothing=0.0, cast_to_fp32=False) -> TokenHeadResult:
    head = model.get_output_embeddings()
    hidden, base_out = capture_head_input(model, head, original, {**call, "labels": None, "use_cache": False})
    targets, ignore_index = head_targets(model, spec, call, hidden)
    if spec.shift and call.get("shift_labels") is None:  # the padded last position has no next token
        hidden, targets = hidden[..., :-1, :], targets[..., :-1]
    t = head_transform(model, spec)

    def run(inner, h):
        h2, weight, bias = head_operands(inner, h, t.vocab)
        if cast_to_fp32:
            h2, weight = h2.float(), weight.float()
            bias = None if bias is None else bias.float()
        with torch.autocast(h2.device.type, enabled=not cast_to_fp32 and torch.is_autocast_enabled(h2.device.type)):
            return fused_linear_token_stats(
                h2, weight, targets, bias=bias, ignore_index=ignore_index, softcap=t.softcap, logit_scale=t.scale,
                temperature=temperature, label_smoothing=label_smoothing, outputs=outputs, backend=options.backend,
                chunk_budget_bytes=options.chunk_budget_bytes, dw_accumulation=options.dw_accumulation)

    per_token = gather.call_through(head, run, hidden)
    aux = router_aux(model, spec, call, base_out)
    coef = float(resolve(model, spec.router_aux)) if aux is not None else 0.0
    return TokenHeadResult(per_token, targets != ignore_index, aux, coef)
