"""Public API: `patch`, `unpatch`, `patched`, `is_patched`, `supported_model_types`.

`patch(model)` replaces the forward of one instance (a PeftModel's base model is reached); `patch()` with no
model patches the classes of heads.LOSS_MAPPINGS: those already imported at once, the rest when their first
instance is built (a hook on `PreTrainedModel.post_init`), so importing ~280 modeling modules is not paid up front. Each patched
forward is `functools.wraps` of the stock one, so `inspect.signature` (used by `generate` and Trainer) still
sees `logits_to_keep` and `**kwargs`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import sys
import warnings

import torch

from ..ops.ce.autograd import check_dw_accumulation
from ..ops.planning.chunking import check_budget
from . import gather, replicas
from .encoder import heads as encoder_heads
from .forward import FusedOptions, generic_forward, positional_names
from .heads import HEADS, LOSS_MAPPINGS, PLAIN, REFUSED, HeadSpec, fused_classes, model_type_of
from .recorded import recorded_result, status_text, warn_if_changed

_CLASS_PATCHES: dict[type, object] = {}  # class -> its own stock `forward` function
_CLASS_OURS: dict[type, object] = {}  # class -> the forward patch() gave it
_GLOBAL: dict = {}  # while patch() is active: {"options":..., "post_init": stock post_init}


def supported_model_types(status: bool = False, kind: str = "causal_lm") -> list[str] | dict[str, str]:
    """Model types whose head the table describes (proven by hf_fusedce.hf.proof). status=True: {model type:
    its recorded proof status}, e.g. "proven exact on an image batch", "proven on text only (reason)"; the
    refused types of the installed transformers are included with their reason. kind "seq2seq",
    "speech_seq2seq" or "masked_lm": the types of that auto mapping (hf.encoder.heads, hf.encoder.proof)."""
    if kind != "causal_lm":
        return encoder_heads.supported(kind, status)
    if not status:
        return sorted(HEADS)
    out = {}
    for model_type in sorted({*HEADS, *REFUSED}):
        rec = recorded_result(model_type)
        out[model_type] = status_text(rec) if rec else ("refused (" + REFUSED[model_type] + ")"
                                                        if model_type in REFUSED else "not proven yet")
    return out


def unwrap(model):
    """The transformers model inside a peft.PeftModel and DDP / FSDP / DeepSpeed wrappers (or the model)."""
    for _ in range(8):
        if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            break
    return model


def _forward_class(cls) -> type:
    """The class whose `forward` the instance runs (a subclass that only adds methods keeps its parent's)."""
    return next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)


def class_refusal(model) -> str | None:
    """Why the class of `model` is not a causal LM whose loss we reproduce, or None. Decided by the class that
    defines the forward, not by model_type: BertForMaskedLM shares model_type "bert" with BertLMHeadModel."""
    cls = _forward_class(type(model))
    if cls.__name__ in fused_classes() and cls.__module__.startswith("transformers."):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    sibling = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(model.config, "model_type", None))
    hint = f" (for this model type the causal-LM class is {sibling})" if sibling else ""
    mappings = ", ".join(m.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", "") for m in LOSS_MAPPINGS)
    return (f"its forward is {cls.__module__}.{cls.__name__}.forward, not a class of transformers' causal-LM "
            f"mapping (AutoModelForCausalLM) nor of the other mappings fused ({mappings}){hint}, so its loss is "
            "not known to be the token cross-entropy over its head. Load the model with AutoModelForCausalLM, "
            "or keep it unpatched")


def _spec(model, force: bool) -> HeadSpec:
    model_type = model_type_of(model)
    if model.get_output_embeddings() is None:
        raise ValueError(f"hf_fusedce: {type(model).__name__} has no output embeddings: not a causal LM head")
    encoder = _encoder_spec(model, force)
    if encoder is not None:
        return encoder
    spec = HEADS.get(model_type)
    why_class = class_refusal(model)
    if why_class is not None:
        if not force:
            raise ValueError(f"hf_fusedce: refusing to patch {type(model).__name__}: {why_class}. If you know its "
                             "loss is the causal-LM loss, pass force=True and check it against stock.")
        warnings.warn(f"hf_fusedce: {type(model).__name__} forced ({why_class})", stacklevel=3)
        return spec or PLAIN
    if spec is not None:
        _warn_if_unproven(model_type)
        return loss_kind_spec(model, spec)
    why = REFUSED.get(model_type, "its head is not in hf_fusedce's quirk table (unproven)")
    if not force:
        raise ValueError(f"hf_fusedce: refusing to patch model_type {model_type!r}: {why}. Its training loss could "
                         "differ from stock. Pass force=True to treat it as a plain `lm_head` + "
                         "ForCausalLMLoss model, and check it with `hf-fusedce check --model-type`.")
    warnings.warn(f"hf_fusedce: model_type {model_type!r} forced as a plain head ({why})", stacklevel=3)
    return PLAIN


def loss_kind_spec(model, spec: HeadSpec) -> HeadSpec:
    """The table entry with its mapping's loss kind applied (heads.LOSS_MAPPINGS: "unshifted" aligns labels)."""
    entry = fused_classes().get(_forward_class(type(model)).__name__)
    if entry is not None and entry[1] == "unshifted" and spec.shift:
        return dataclasses.replace(spec, shift=False)
    return spec


def _encoder_spec(model, force: bool):
    """A class of the seq2seq / speech-seq2seq / masked-LM mappings: its encoder_heads spec, or refused with the
    reason (None: not such a class, the causal-LM rules apply)."""
    found = encoder_heads.spec_or_reason(_forward_class(type(model)), model)
    if found is None or isinstance(found, HeadSpec):
        return found
    name = type(model).__name__
    if not force:
        raise ValueError(f"hf_fusedce: refusing to patch {name}: {found}. Its training loss could differ from "
                         "stock. Pass force=True to treat it as a plain unshifted head (decoder inputs built from "
                         "the labels when it has a decoder) and check it against stock.")
    warnings.warn(f"hf_fusedce: {name} forced as a plain unshifted head ({found})", stacklevel=4)
    return encoder_heads.EncoderHeadSpec(decoder_inputs=hasattr(model, "get_decoder") and
                                         getattr(model.config, "is_encoder_decoder", False))


def _warn_if_unproven(model_type: str) -> None:
    rec = recorded_result(model_type)
    if rec is not None and rec["status"] in ("failed", "skipped"):
        warnings.warn(f"hf_fusedce: model_type {model_type!r} is in the quirk table but its proof {rec['status']} "
                      f"(transformers {rec['transformers']}): {rec['reason'][:200]}. Check your model against stock "
                      f"with `hf-fusedce check --model PATH` before training.", stacklevel=4)


def _check_model(target):
    """Clear errors for what is not a loaded causal LM: any other object, or weights still on the meta device
    (accelerate's offload hooks, which load them per forward, are fine)."""
    if not isinstance(target, torch.nn.Module) or not callable(getattr(target, "get_output_embeddings", None)):
        raise TypeError(f"hf_fusedce.patch expects a transformers causal LM (a PreTrainedModel, or a PeftModel "
                        f"around one), got {type(target).__name__}: {target!r:.80}")
    head = target.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.device.type == "meta" and not hasattr(head, "_hf_hook"):
        raise ValueError("hf_fusedce.patch: the model's weights are on the meta device (built under "
                         "init_empty_weights or device_map='meta'?); load real weights first (from_pretrained, or "
                         "to_empty + load_state_dict), then patch")


def _options(backend, chunk_budget_bytes, z_loss, label_smoothing, return_logits, force=False,
             dw_accumulation="auto") -> FusedOptions:
    # bad values fail at patch time, not at the first training step
    if chunk_budget_bytes is not None:
        check_budget(chunk_budget_bytes, stacklevel=5)
    return FusedOptions(backend, chunk_budget_bytes, float(z_loss), float(label_smoothing), bool(return_logits),
                        bool(force), check_dw_accumulation(dw_accumulation))


class PatchedForward:
    """The instance `forward` of a patched model. A small object rather than a closure so that
    `copy.deepcopy(model)` rebinds it to the copy (deepcopy's memo maps `.model` to the new model) and
    `pickle` / `torch.save` work. `__signature__` is the stock forward's: `generate` and Trainer inspect it
    for `logits_to_keep` and `**kwargs`."""

    __hf_fusedce__ = True

    def __init__(self, model, spec: HeadSpec, options: FusedOptions, own_forward=None):
        self.model, self.spec, self.options = model, spec, options
        self.own_forward = own_forward  # a forward the instance already had (e.g. accelerate's wrapper)
        self.positional = positional_names(self.original())  # bound once, not per call

    def original(self):
        if self.own_forward is not None:
            return self.own_forward
        return functools.partial(type(self.model).forward, self.model)  # torch.compile traces a partial

    def __call__(self, *args, **kwargs):
        return generic_forward(self.model, self.original(), self.spec, self.options, args, kwargs, self.positional)

    def for_replica(self, replica) -> "PatchedForward":
        """The same forward serving a DataParallel replica (replicas.py)."""
        twin = copy.copy(self)
        twin.model = replica
        return twin

    @property
    def __signature__(self):
        return inspect.signature(self.original())

    @property
    def __doc__(self):
        return (self.own_forward or type(self.model).forward).__doc__


# Where an instance forward of ours can sit: `forward`, or `_old_forward` once accelerate's hook wrapper
# (cpu_offload, dispatch_model, device_map=...) was added on top of it.
_SLOTS = ("forward", "_old_forward")


def _slot(target) -> str | None:
    return next((s for s in _SLOTS if isinstance(target.__dict__.get(s), PatchedForward)), None)


def _installed(target) -> PatchedForward | None:
    slot = _slot(target)
    return None if slot is None else target.__dict__[slot]


def _wrapped_patch(target) -> bool:
    """A forward of ours under wrappers that call what they wrap (accelerate's autocast / fp32-output wrappers
    keep it in their `__wrapped__` chain or closure). Other libraries' wrappers (TRL's fused head, Liger) do
    not call it for the loss, so they end the walk."""
    fwd, seen = target.__dict__.get("forward"), 0
    while fwd is not None and seen < 8:
        if getattr(fwd, "__hf_fusedce__", False):
            return True
        func = fwd.func if isinstance(fwd, functools.partial) else getattr(fwd, "__func__", fwd)  # where it was
        # written: wrappers copy `__module__` (accelerate's hook wrapper is a partial of accelerate.hooks.new_forward)
        module = func.__globals__["__name__"] if hasattr(func, "__globals__") else type(func).__module__
        if not module.startswith(("accelerate.", "torch.")):
            return False
        fwd = getattr(fwd, "__wrapped__", None) or getattr(fwd, "__func__", None)
        seen += 1
    return False


def patch(model=None, *, backend: str = "auto", chunk_budget_bytes: int | None = None, z_loss: float = 0.0,
          label_smoothing: float = 0.0, return_logits: bool = False, force: bool = False,
          dw_accumulation: str = "auto"):
    """Make `model`'s training loss use the fused op (returns `model`); no model: every class of heads.LOSS_MAPPINGS.

    backend / chunk_budget_bytes / z_loss / label_smoothing / dw_accumulation are passed to
    `fused_linear_cross_entropy` (z_loss and label_smoothing change the loss from stock: off by default).
    return_logits: also return (detached) logits in training. force: patch a model type the quirk table does
    not know, as a plain head.
    """
    options = _options(backend, chunk_budget_bytes, z_loss, label_smoothing, return_logits, force, dw_accumulation)
    if model is None:
        _patch_classes(options)
        return None
    target = unwrap(model)
    _check_model(target)
    spec = _spec(target, force)
    reseat(target)
    warn_if_changed(target, model_type_of(target))
    current = _installed(target)
    if current is not None:  # patching twice == once: only the options are refreshed
        current.spec, current.options = spec, options
        return model
    target.forward = PatchedForward(target, spec, options, target.__dict__.get("forward"))
    _guard(model, target)
    gather.install(target.get_output_embeddings())
    return model


def unpatch(model=None):
    """Restore exactly the forward that was there before `patch(model)` (no model: undo `patch()`)."""
    if model is None:
        _unpatch_classes()
        return None
    target = unwrap(model)
    slot = _slot(target)
    if slot is not None:
        current = target.__dict__[slot]
        if current.own_forward is not None:
            target.__dict__[slot] = current.own_forward
        elif slot == "forward":
            del target.__dict__["forward"]
        else:  # under accelerate's wrapper: it calls the stock bound forward again
            target.__dict__[slot] = type(target).forward.__get__(target)
        gather.uninstall(target.get_output_embeddings())
    _unguard(model, target)
    return model


def is_patched(model) -> bool:
    """Whether the model's forward is hf_fusedce's (instance or class patch); False once something else (TRL's
    fused head, Unsloth, ...) replaced it. A COMPOSE_OVER forward (Liger's) assigned over ours is taken off first."""
    target = unwrap(model)
    reseat(target)
    if "forward" in target.__dict__:
        return _installed(target) is not None or _wrapped_patch(target)
    owner = next((c for c in type(target).__mro__ if "forward" in c.__dict__), None)
    return owner in _CLASS_PATCHES and getattr(owner.__dict__["forward"], "__hf_fusedce__", False)


def globally_patched() -> bool:
    """patch() without a model is active."""
    return "options" in _GLOBAL


# ---- a forward assigned over ours after patch() --------------------------------------------------------------
# A library can assign its forward over ours after patch() by a path hf_fusedce could not wrap (Liger's apply
# functions bound by `from ... import` before hf_fusedce wrapped them: `model.forward = MethodType(lce_forward,
# model)`, or `Class.forward = lce_forward`). Integrations list in COMPOSE_OVER predicates naming the forwards that
# only duplicate our head (the rest of the model is the stock forward's code): such a forward is taken off again,
# ours put back, when the model is next called, asked `is_patched`, or patched. Any other replacement stays (then
# is_patched is False and hf_fusedce.integrations warns at the first training forward).
COMPOSE_OVER: list = []  # predicate(forward) -> True if ours goes back over it
_SAVED = "_hf_fusedce_forward"  # the instance's PatchedForward, kept to be put back


def _composes_over(fwd) -> bool:
    return fwd is not None and not getattr(fwd, "__hf_fusedce__", False) and any(p(fwd) for p in COMPOSE_OVER)


def reseat(model) -> bool:
    """Put hf_fusedce's forward back over a COMPOSE_OVER forward assigned after patch() (True if it did)."""
    target = unwrap(model)
    if not COMPOSE_OVER or not isinstance(target, torch.nn.Module):
        return False
    done = False
    owner = _forward_class(type(target))
    ours = _CLASS_OURS.get(owner)
    if ours is not None and owner.__dict__["forward"] is not ours and _composes_over(owner.__dict__["forward"]):
        owner.forward, done = ours, True  # class patch (patch() without a model)
    if _composes_over(target.__dict__.get("forward")):
        saved = target.__dict__.get(_SAVED)
        if saved is not None:
            target.__dict__["forward"], done = saved, True
        elif ours is not None:  # a class we patch: its forward is ours again
            del target.__dict__["forward"]
            done = True
    return done


class _ReseatOnCall:
    """Instance `_call_impl` of a patched model (or of the PeftModel around it): Module.__call__ reads `forward`
    before any forward pre-hook runs, so a forward assigned over ours is taken off here, first. A small object
    (deepcopy / pickle); the patched model is found from the module at call time (a replica's is the replica's)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        if COMPOSE_OVER:
            reseat(self.module)
        return type(self.module)._call_impl(self.module, *args, **kwargs)

    def for_replica(self, replica) -> "_ReseatOnCall":
        return _ReseatOnCall(replica)


def _guard(model, target) -> None:
    if isinstance(target.__dict__.get("forward"), PatchedForward):
        target.__dict__[_SAVED] = target.__dict__["forward"]
    for module in (target,) if model is target else (model, target):  # a PeftModel calls its base's `.forward`
        if not isinstance(module.__dict__.get("_call_impl"), _ReseatOnCall):
            module.__dict__["_call_impl"] = _ReseatOnCall(module)
        replicas.bind(module)


def _unguard(model, target) -> None:
    target.__dict__.pop(_SAVED, None)
    for module in (model, target):
        if isinstance(getattr(module, "__dict__", {}).get("_call_impl"), _ReseatOnCall):
            del module.__dict__["_call_impl"]
        if isinstance(module, torch.nn.Module):
            replicas.unbind(module)


@contextlib.contextmanager
def patched(model, _patch=None, _unpatch=None, **options):
    """`with patched(model): ...` patches for the block only (a model already patched stays patched).
    `_patch` / `_unpatch`: the layer above's (hf_fusedce.integrations) patch and unpatch, same contract."""
    was = _installed(unwrap(model)) is not None
    (_patch or patch)(model, **options)
    try:
        yield model
    finally:
        if not was:
            (_unpatch or unpatch)(model)


# ---- class-level patching: patch() with no model ------------------------------------------------------------

def _mapped_classes():
    """(model_type, class name) of the mappings fused (heads.LOSS_MAPPINGS): discovery by mapping, not by name."""
    return [(model_type, name) for name, (model_type, _kind) in fused_classes().items()]


def _patch_class(cls, options):
    cls = next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)  # the class defining forward
    if cls in _CLASS_PATCHES:
        return
    stock = cls.__dict__["forward"]

    positional = positional_names(stock.__get__(object()))

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        spec = HEADS.get(model_type_of(self))
        bound = stock.__get__(self)
        if spec is None or _installed(self) is not None or class_refusal(self) is not None:
            return bound(*args, **kwargs)
        return generic_forward(self, bound, loss_kind_spec(self, spec), _GLOBAL["options"], args, kwargs, positional)

    forward.__hf_fusedce__ = True
    _CLASS_PATCHES[cls] = stock
    _CLASS_OURS[cls] = cls.forward = forward


def _patch_classes(options):
    from transformers import PreTrainedModel
    _GLOBAL["options"] = options
    names = {cls_name for model_type, cls_name in _mapped_classes() if model_type in HEADS}
    for module in list(sys.modules.values()):  # classes already imported: patch now
        if getattr(module, "__name__", "").startswith("transformers.models."):
            for name in names & set(vars(module)):
                _patch_class(vars(module)[name], options)
    if "post_init" not in _GLOBAL:  # the rest: when their first instance is built
        stock_post_init = PreTrainedModel.post_init
        _GLOBAL["post_init"] = stock_post_init

        @functools.wraps(stock_post_init)
        def post_init(self, *args, **kwargs):
            result = stock_post_init(self, *args, **kwargs)
            if type(self).__name__ in names and HEADS.get(model_type_of(self)):
                _patch_class(type(self), _GLOBAL["options"])
                _guard(self, self)
                warn_if_changed(self, model_type_of(self), stacklevel=4)
                if self.get_output_embeddings() is not None:
                    gather.install(self.get_output_embeddings())
            return result

        PreTrainedModel.post_init = post_init


def _unpatch_classes():
    from transformers import PreTrainedModel
    for cls, stock in _CLASS_PATCHES.items():
        cls.forward = stock
    _CLASS_PATCHES.clear()
    _CLASS_OURS.clear()
    if "post_init" in _GLOBAL:
        PreTrainedModel.post_init = _GLOBAL.pop("post_init")
    _GLOBAL.pop("options", None)
