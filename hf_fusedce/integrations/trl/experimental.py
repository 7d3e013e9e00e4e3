"""trl.experimental's trainers and hf_fusedce's head: fused where a hook is wired, a one-time warning where not.

Fused (each hook wraps the one method that turns logits into what the trainer uses, and serves only the TRL
source it was proven on): ORPO and CPO (`preference.py`), GKD (`gkd.py`), online DPO (`_forward` here: the
per-token log-prob of each completion token). The trainers that speak TRL's fused-LM-head protocol already
(GMPO through GRPO, BEMA's DPO, async GRPO / distillation) are served by `trl/__init__.py`.

The others read the model's full logits in their own loss code (GOLD, TPO, SDPO, SDFT, A2PO, IW-OPD, server
distillation): a patched model trained by one of them gets a one-time warning naming the trainer, so the patch
is never a silent no-op there.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...hf.patching import is_patched
from ..imports import after_import
from . import gkd, per_token, preference
from .per_token import note_once, source_digest

UNFUSED = {  # module: trainer class whose compute_loss reads the model's full logits (trl 1.16.0)
    "trl.experimental.gold.gold_trainer": "GOLDTrainer",
    "trl.experimental.tpo.tpo_trainer": "TPOTrainer",
    "trl.experimental.sdpo.sdpo_trainer": "SDPOTrainer",
    "trl.experimental.sdft.sdft_trainer": "SDFTTrainer",
    "trl.experimental.a2po.a2po_trainer": "A2POTrainer",
    "trl.experimental.iw_opd.iw_opd_trainer": "IWOPDTrainer",
    "trl.experimental.server_distillation.server_distillation_trainer": "ServerDistillationTrainer",
}
ONLINE_DPO = ("trl.experimental.online_dpo.online_dpo_trainer", "OnlineDPOTrainer", "556b6dce447a4aae")


def activate() -> None:
    per_token.activate()
    preference.activate()
    gkd.activate()
    after_import(ONLINE_DPO[0], _install_online_dpo)
    for module, trainer in UNFUSED.items():
        after_import(module, functools.partial(_install_note, trainer))


def _install_note(trainer: str, module) -> None:
    cls = getattr(module, trainer)
    stock = cls.compute_loss
    if getattr(stock, "__hf_fusedce__", False):
        return

    @functools.wraps(stock)
    def compute_loss(self, model, *args, **kwargs):
        if is_patched(model):
            note_once(trainer, "its loss reads the model's full logits and hf_fusedce has no hook for this "
                               "trainer yet")
        return stock(self, model, *args, **kwargs)

    compute_loss.__hf_fusedce__ = True
    cls.compute_loss = compute_loss


# ---- online DPO ---------------------------------------------------------------------------------------------

def _install_online_dpo(module) -> None:
    cls = getattr(module, ONLINE_DPO[1])
    stock = cls._forward
    if getattr(stock, "__hf_fusedce__", False):
        return
    proven = source_digest(stock) == ONLINE_DPO[2]

    @functools.wraps(stock)
    def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        args = (self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
        if not is_patched(model):
            if is_patched(self.model):
                note_once(ONLINE_DPO[1], "the reference model is not patched (call hf_fusedce.patch(ref_model))")
            return stock(*args)
        reason = _online_dpo_reason(proven, vision_inputs)
        if reason:
            note_once(ONLINE_DPO[1], reason)
            return stock(*args)
        logps = _online_dpo_logprobs(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        if logps is not None:
            return logps
        note_once(ONLINE_DPO[1], "an empty prompt after truncation to max_length (TRL then scores each "
                                 "completion token at its own position)")
        return stock(*args)

    _forward.__hf_fusedce__ = True
    cls._forward = _forward


def _online_dpo_reason(proven, vision_inputs) -> str | None:
    if not proven:
        return ("this TRL's OnlineDPOTrainer._forward differs from the one hf_fusedce was proven on (trl 1.16.0); "
                "pin trl==1.16.0 or update hf_fusedce")
    if vision_inputs is not None:
        return "image inputs are not wired through this hook"
    return None


def _online_dpo_logprobs(trainer, model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Per-token log-probs of the completion tokens: TRL's left truncation to max_length, then the next-token
    log-prob at every completion position (None: no prompt token is left to predict the first one)."""
    cut = max(prompt_ids.size(1) + completion_ids.size(1) - trainer.max_length, 0)
    prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
    if prompt_ids.size(1) == 0:
        return None
    ids, mask = torch.cat((prompt_ids, completion_ids), 1), torch.cat((prompt_mask, completion_mask), 1)
    targets = F.pad(ids[:, 1:], (0, 1), value=0)  # the last position has no next token and is not read
    logps = per_token.per_token(model, ids, mask, targets)["log_probs"]
    return logps[:, prompt_ids.size(1) - 1:-1]
