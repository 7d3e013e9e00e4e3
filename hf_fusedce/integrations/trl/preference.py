"""TRL's experimental ORPO and CPO (SimPO, IPO, hinge, AlphaPO) trainers on the fused head.

Both compute everything from the model's logits in one method, `concatenated_forward(model, batch)`: the model is
called on chosen + rejected without labels, then log-softmax + gather give each sequence's summed or averaged
log-prob of its labels, a cross-entropy gives the NLL on chosen, and the logits themselves are returned for
`get_batch_loss_metrics`, which reads them only as `logits.detach().mean()` (`logits/chosen`, `logits/rejected`).
That one method is wrapped: for a patched model it returns the same tuple from one pass of per-token outputs
(`per_token.py`): the log-prob of every next input token and the mean logit of every position. The trainer's own
`concatenated_inputs`, loss (odds ratio, SimPO's length-normalised margin, label smoothing...) and metrics run
unchanged; the logits slots carry their mean (a 0-d tensor), the one thing read of them.

The wrapper serves only the source it was proven on (a digest of TRL's `concatenated_forward` and
`get_batch_loss_metrics`); a changed TRL, a subclass that reads the logits elsewhere, an encoder-decoder model,
MoE router aux loss or labels that are not the input ids run TRL's own method with a one-time warning saying why.
An unpatched model runs TRL's method untouched.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...hf.patching import is_patched
from ..imports import after_import
from .per_token import note_once, per_token, source_digest


@dataclass(frozen=True)
class Kind:
    """How one trainer's `concatenated_forward` uses its logits (read in trl 1.16.0)."""
    module: str
    trainer: str
    padding_attr: str  # the trainer attribute passed to concatenated_inputs as padding_value
    nll_on_labels: bool  # CPO: NLL over the labels; ORPO: over the whole attended sequence
    nll_weight_attr: str | None  # CPO: no NLL at all when `cpo_alpha` is 0 (TRL's constant 0.0 instead)
    always_average: bool  # ORPO averages log-probs over the labels; CPO only for its "ipo" and "simpo" losses
    logit_positions_shifted: bool  # ORPO's logits slots drop the last position; CPO's keep it
    digest: str  # of concatenated_forward + get_batch_loss_metrics as proven


KINDS = (
    Kind("trl.experimental.orpo.orpo_trainer", "ORPOTrainer", "padding_value", nll_on_labels=False,
         nll_weight_attr=None, always_average=True, logit_positions_shifted=True, digest="683bb710428324e8"),
    Kind("trl.experimental.cpo.cpo_trainer", "CPOTrainer", "pad_token_id", nll_on_labels=True,
         nll_weight_attr="cpo_alpha", always_average=False, logit_positions_shifted=False,
         digest="3f4b0aa39be280ef"),
)


def activate() -> None:
    for kind in KINDS:
        after_import(kind.module, functools.partial(_install, kind))


def _install(kind: Kind, module) -> None:
    cls = getattr(module, kind.trainer)
    stock = cls.concatenated_forward
    if getattr(stock, "__hf_fusedce__", False):
        return
    proven = source_digest(stock, cls.get_batch_loss_metrics) == kind.digest

    @functools.wraps(stock)
    def concatenated_forward(self, model, batch):
        if not is_patched(model):
            return stock(self, model, batch)
        reason = _stock_reason(self, cls, kind, proven)
        if reason is None:
            result = _fused(self, model, batch, kind)
            if result is not None:
                return result
            reason = "its labels are not the sequences' own next tokens"
        note_once(kind.trainer, reason)
        return stock(self, model, batch)

    concatenated_forward.__hf_fusedce__ = True
    cls.concatenated_forward = concatenated_forward


def _stock_reason(trainer, cls, kind: Kind, proven: bool) -> str | None:
    if not proven:
        return (f"this TRL's {kind.trainer}.concatenated_forward / get_batch_loss_metrics differ from the ones "
                "hf_fusedce was proven on (trl 1.16.0); pin trl==1.16.0 or update hf_fusedce")
    if type(trainer).get_batch_loss_metrics is not cls.get_batch_loss_metrics:
        return "a subclass overrides get_batch_loss_metrics (it may read the logits beyond their mean)"
    if trainer.is_encoder_decoder:
        return "encoder-decoder models are not wired through this hook"
    if trainer.aux_loss_enabled:
        return "the MoE router aux loss (output_router_logits) is not wired through this hook"
    return None


def _fused(trainer, model, batch, kind: Kind):
    """concatenated_forward's tuple from per-token log-probs and mean logits; None if the labels are not the
    input ids (the one target per position the op scores)."""
    cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False,
                                      padding_value=getattr(trainer, kind.padding_attr),
                                      device=trainer.accelerator.device)
    ids, mask, labels = (cat[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    scored = labels[:, 1:] != -100
    if not torch.equal(labels[:, 1:][scored], ids[:, 1:][scored]):
        return None
    targets = F.pad(ids[:, 1:], (0, 1), value=0)  # the last position has no next token: only its mean logit counts
    stats = per_token(model, ids, mask, targets, outputs=("log_probs", "mean_logits"))
    logps_all, mean_logits = stats["log_probs"][:, :-1], stats["mean_logits"]
    n = batch["chosen_labels"].shape[0]

    logps = (logps_all * scored).sum(-1)
    if _averaged(trainer, kind):
        logps = logps / scored.sum(-1)
    nll = _nll(trainer, kind, logps_all[:n], (scored if kind.nll_on_labels else mask[:, 1:] == 1)[:n])
    if kind.logit_positions_shifted:
        mean_logits = mean_logits[:, :-1]
    return logps[:n], logps[n:], mean_logits[:n].mean(), mean_logits[n:].mean(), nll


def _averaged(trainer, kind: Kind) -> bool:
    return kind.always_average or trainer.loss_type in ("ipo", "simpo")


def _nll(trainer, kind: Kind, logps, mask):
    """nn.CrossEntropyLoss (mean over the counted tokens) from their log-probs; CPO skips it at cpo_alpha == 0."""
    if kind.nll_weight_attr and getattr(trainer, kind.nll_weight_attr) == 0:
        return torch.tensor(0.0).to(trainer.accelerator.device)
    return -(logps * mask).sum() / mask.sum()
