"""TRL's fused LM head protocol, answered by hf_fusedce's head (proven per family) instead of TRL's own.

TRL 1.16's token-scoring trainers (SFT, DPO, KTO, GRPO, RLOO) call `trl.trainer.utils.add_fused_lm_head(model,
temperature, cast_lm_head_to_fp32, outputs)` in `__init__`, which replaces `model.forward`, and then call
`model(..., labels=..., fused_lm_head=True)`, reading `FusedCausalLMOutput` fields. With hf_fusedce active:

- `fused_lm_head=True` reaching a patched forward is served by `hf.token_head` (PROTOCOLS hook in forward.py);
- patch first, trainer second: `add_fused_lm_head` is wrapped so that on a patched model it records TRL's
  options and leaves hf_fusedce's forward in place (TRL's head is never installed there);
- trainer first, patch second: the patch finds TRL's head under it and reads its options from it;
- SFT label smoothing: TRL computes it on full logits; on a patched model it runs fused (the served
  `log_probs` are then the smoothed per-token log-likelihood, so TRL's `-log_probs.sum() / n` is exactly
  transformers' LabelSmoother loss).

trl.experimental's trainers (ORPO, CPO, GKD, online DPO, and a warning for the others) are hooked in
`experimental.py`; DistillationTrainer in `distillation.py`.

trl is imported only when it is installed and already imported, or when it gets imported later (an import
hook on `trl.trainer.utils`); nothing here runs without it.
"""
from __future__ import annotations

import contextvars
import functools
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass

from ...hf import forward, patching
from ...hf.token_head import token_outputs
from ..imports import after_import

logger = logging.getLogger("hf_fusedce")
UTILS = "trl.trainer.utils"
_SERVED = "_hf_fusedce_trl_head"  # model attribute: the TrlHead options TRL asked for
_LABEL_SMOOTHING = contextvars.ContextVar("hf_fusedce_trl_label_smoothing", default=0.0)
_STATE = {"info_logged": False, "hooked": False}


@dataclass(frozen=True)
class TrlHead:
    """The arguments TRL passed to add_fused_lm_head."""
    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: tuple = ("log_probs",)


def installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def activate(model=None) -> None:
    """Speak the protocol; wrap add_fused_lm_head now or when trl gets imported; adopt a TRL head under `model`."""
    forward.PROTOCOLS["fused_lm_head"] = serve
    if not _STATE["hooked"]:
        _STATE["hooked"] = True
        after_import(UTILS, _wrap_add_fused_lm_head)
    if model is not None:
        _adopt_trl_head(patching.unwrap(model))


def serve(model, original, spec, options, call, _flag=True):
    """forward.PROTOCOLS handler: `model(..., fused_lm_head=True)` -> trl's FusedCausalLMOutput."""
    from trl.trainer.utils import FusedCausalLMOutput

    head = getattr(model, _SERVED, None) or TrlHead()
    wanted = tuple(dict.fromkeys(("log_probs", *head.outputs)))
    result = token_outputs(model, original, spec, options, call, outputs=wanted, temperature=head.temperature,
                           label_smoothing=_LABEL_SMOOTHING.get(), cast_to_fp32=head.cast_lm_head_to_fp32)
    tokens, mask = result.per_token, result.label_mask
    num_items = call.get("num_items_in_batch")
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -tokens["log_probs"].sum() / denom
    if result.aux is not None:
        loss = loss + result.aux_coef * result.aux.to(loss.device)
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=result.aux,
                               **{name: tokens.get(name) for name in
                                  ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")})


# ---- patch first, trainer second --------------------------------------------------------------------------

def _wrap_add_fused_lm_head(utils) -> None:
    stock = utils.add_fused_lm_head
    if getattr(stock, "__hf_fusedce__", False):
        return
    served = _served_add_fused_lm_head(stock)
    for module in list(sys.modules.values()):  # trainer modules bound the name at their import
        if getattr(module, "__name__", "").startswith("trl") and getattr(module, "add_fused_lm_head", None) is stock:
            module.add_fused_lm_head = served


def _served_add_fused_lm_head(stock):
    signature = inspect.signature(stock)

    @functools.wraps(stock)
    def add_fused_lm_head(model, *args, **kwargs):
        if not patching.is_patched(model):
            return stock(model, *args, **kwargs)
        try:
            bound = signature.bind(model, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"hf_fusedce: add_fused_lm_head called with arguments it does not take ({exc})") from exc
        bound.apply_defaults()
        head = _head_from(bound.arguments)
        if head is None:
            return stock(model, *args, **kwargs)  # an unknown TRL: its head displaces ours, the watcher warns
        setattr(model, _SERVED, head)
        _maybe_fuse_sft_label_smoothing()
        _log_once(type(model).__name__)

    add_fused_lm_head.__hf_fusedce__ = True
    return add_fused_lm_head


def _head_from(arguments: dict) -> TrlHead | None:
    known = {"model", "temperature", "cast_lm_head_to_fp32", "outputs"}
    extra = set(arguments) - known
    if extra:
        import warnings
        warnings.warn(f"hf_fusedce: this TRL's add_fused_lm_head takes {sorted(extra)} that hf_fusedce does not "
                      "know; TRL's own head is used for this model", stacklevel=4)
        return None
    return TrlHead(float(arguments["temperature"]), bool(arguments["cast_lm_head_to_fp32"]),
                   tuple(arguments["outputs"]))


def _log_once(name: str) -> None:
    if not _STATE["info_logged"]:
        _STATE["info_logged"] = True
        logger.warning("hf_fusedce: TRL's fused LM head on %s is served by hf_fusedce's head (same protocol, "
                       "the family's proven head transform)", name)


# ---- trainer first, patch second --------------------------------------------------------------------------

def _trl_head_options(fwd) -> TrlHead | None:
    """TRL's options from a forward installed by TRL's add_fused_lm_head (its closure), or None."""
    func = getattr(fwd, "__func__", fwd)
    code = getattr(func, "__code__", None)
    if code is None or func.__globals__.get("__name__") != UTILS or code.co_name != "_fused_forward":
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in func.__closure__ or ())))
    if not {"temperature", "cast_lm_head_to_fp32", "outputs"} <= set(cells):
        raise ValueError("hf_fusedce: this model carries a TRL fused LM head whose options cannot be read (TRL "
                         "version?); call hf_fusedce.patch(model) before building the TRL trainer")
    return TrlHead(float(cells["temperature"]), bool(cells["cast_lm_head_to_fp32"]), tuple(cells["outputs"]))


def _adopt_trl_head(target) -> None:
    fwd = patching._installed(target)
    if fwd is None or fwd.own_forward is None:
        return
    head = _trl_head_options(fwd.own_forward)
    if head is not None:  # TRL's wrapper stays below ours: its non-fused path is the stock forward
        setattr(target, _SERVED, head)
        _maybe_fuse_sft_label_smoothing()
        _log_once(type(target).__name__)


# ---- SFT label smoothing ------------------------------------------------------------------------------------

def _maybe_fuse_sft_label_smoothing() -> None:
    module = sys.modules.get("trl.trainer.sft_trainer")
    cls = getattr(module, "SFTTrainer", None)
    if cls is None or getattr(cls.compute_loss, "__hf_fusedce__", False):
        return
    stock = cls.compute_loss

    @functools.wraps(stock)
    def compute_loss(self, model, inputs, *args, **kwargs):
        smoother = self.label_smoother
        if (smoother is None or self.args.loss_type != "nll" or self.compute_loss_func is not None
                or getattr(patching.unwrap(model), _SERVED, None) is None):
            return stock(self, model, inputs, *args, **kwargs)
        self.label_smoother = None  # TRL's fused branch, with the smoothed per-token log-likelihood served
        token = _LABEL_SMOOTHING.set(float(smoother.epsilon))
        try:
            return stock(self, model, inputs, *args, **kwargs)
        finally:
            _LABEL_SMOOTHING.reset(token)
            self.label_smoother = smoother

    compute_loss.__hf_fusedce__ = True
    cls.compute_loss = compute_loss
