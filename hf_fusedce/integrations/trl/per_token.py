"""Per-token head outputs for TRL trainers that do not speak its fused-LM-head protocol (ORPO, CPO, GKD...).

A hook asks a patched model for exactly what its trainer reads, by one keyword on the call:
`model(input_ids, attention_mask=..., shift_labels=targets, hf_fusedce_token_stats=TokenStatsRequest(...))`
returns `hf.token_head.TokenHeadResult` (per-token log-prob of each target, mean logit, ... of shape
`targets.shape`), computed by the family's proven head without materializing the logits. The request travels
in the call: no per-call state is kept on the model or here. `targets` are already aligned with the positions
(`shift_labels` semantics), so position t scores targets[:, t].
"""
from __future__ import annotations

import hashlib
import inspect
import warnings
from dataclasses import dataclass

from ...hf import forward
from ...hf.token_head import token_outputs

KEYWORD = "hf_fusedce_token_stats"
_NOTED: set = set()  # (trainer, reason) pairs already reported: each message is given once per process


@dataclass(frozen=True)
class TokenStatsRequest:
    outputs: tuple = ("log_probs",)
    temperature: float = 1.0


def activate() -> None:
    forward.PROTOCOLS[KEYWORD] = serve


def serve(model, original, spec, options, call, request: TokenStatsRequest):
    """forward.PROTOCOLS handler for `KEYWORD`."""
    if not spec.shift:  # a family whose loss takes labels aligned with its positions reads the targets as labels
        call = dict(call)
        call["labels"] = call.pop("shift_labels")
    return token_outputs(model, original, spec, options, call, outputs=request.outputs,
                         temperature=request.temperature)


def per_token(model, input_ids, attention_mask, targets, outputs=("log_probs",), temperature=1.0, **kwargs):
    """The patched `model`'s per-token `outputs` for `targets` (aligned with `input_ids`), a dict of tensors."""
    result = model(input_ids, attention_mask=attention_mask, use_cache=False, shift_labels=targets,
                   **{KEYWORD: TokenStatsRequest(tuple(outputs), float(temperature))}, **kwargs)
    return result.per_token


def source_digest(*functions) -> str:
    """A digest of the functions' source: what a hook was proven against ("unavailable" without their source,
    which then never counts as proven)."""
    try:
        text = "\n".join(inspect.getsource(f) for f in functions)
    except (OSError, TypeError):
        return "unavailable"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def note_once(trainer: str, reason: str) -> None:
    """One warning per (trainer, reason) and process: why a patched model runs a trainer's stock (logits) path."""
    if (trainer, reason) in _NOTED:
        return
    _NOTED.add((trainer, reason))
    warnings.warn(f"hf_fusedce: {trainer} runs TRL's own loss on full logits (stock memory), not hf_fusedce's "
                  f"head: {reason}", stacklevel=3)
