"""Liger Kernel next to hf_fusedce: Liger's layer kernels (RMSNorm, RoPE, SwiGLU, ...) stay, the head is ours.

Liger's fused linear-CE (and CE) replace the model's forward / loss; next to a patched model they are turned
off, in either order, with one info line:
- Liger applied after the patch: its `apply_liger_kernel_to_*` functions (also what Trainer's and TRL's
  `use_liger_kernel=True` call) are wrapped to pass `fused_linear_cross_entropy=False, cross_entropy=False`
  for a patched model (or any model while the global patch is on);
- Liger applied before the patch: `compose(model)` drops Liger's forward from under (or over) ours, back to the
  model class's own forward;
- Liger applied after the patch by a function bound before it was wrapped (`from liger_kernel.transformers import
  apply_liger_kernel_to_llama` at the top of a script): the patched model takes Liger's forward off again at its
  next call or `is_patched` (hf.patching.COMPOSE_OVER; instance and class patches alike).
liger_kernel is imported only when installed and imported by someone (an import hook waits for it).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import sys

from ..hf import patching
from .imports import after_import

logger = logging.getLogger("hf_fusedce")
MONKEY_PATCH = "liger_kernel.transformers.monkey_patch"
HEAD_KERNELS = ("fused_linear_cross_entropy", "cross_entropy")
_STATE = {"info_logged": False, "hooked": False}


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def activate(model=None, **patch_options) -> None:
    if not _STATE["hooked"]:
        _STATE["hooked"] = True
        after_import(MONKEY_PATCH, _wrap_apply_functions)
        patching.COMPOSE_OVER.append(_taken_off)
    if model is not None:
        compose(model, **patch_options)


def is_liger_forward(fwd) -> bool:
    func = fwd.func if isinstance(fwd, functools.partial) else getattr(fwd, "__func__", fwd)
    return (getattr(func, "__globals__", {}).get("__name__") or "").startswith("liger_kernel")


def compose(model, **patch_options) -> bool:
    """Take Liger's fused linear-CE forward off a model hf_fusedce patches (True if there was one)."""
    target = patching.unwrap(model)
    stock_is_liger = is_liger_forward(type(target).forward)
    current = target.__dict__.get("forward")
    if is_liger_forward(current):  # Liger replaced our forward (or was there before any patch)
        if not stock_is_liger:
            del target.__dict__["forward"]
        patching.patch(target, **patch_options)
        _info(type(target).__name__)
        return True
    fwd = patching._installed(target)
    if fwd is not None and is_liger_forward(fwd.own_forward):  # Liger's forward under ours
        if not stock_is_liger:
            fwd.own_forward = None  # the class's own forward: eval and generation are stock again
        _info(type(target).__name__)
        return True
    return False


def _taken_off(fwd) -> bool:
    """patching.COMPOSE_OVER: Liger's forward assigned over a patched model's (by an apply function bound
    before it was wrapped) is taken off again: its layer kernels are module-level and stay."""
    if not is_liger_forward(fwd):
        return False
    _info("a patched model")
    return True


def compose_trainer(trainer) -> None:
    """FusedCETrainer with `use_liger_kernel=True`: Trainer applies Liger when training starts, through the
    `apply_liger_kernel_to_*` functions wrapped here (head kernels off for the patched model)."""
    config = trainer.fusedce_config
    if config.enabled and getattr(trainer.args, "use_liger_kernel", False):
        activate(trainer.model, **config.patch_options)


def _info(name: str) -> None:
    if not _STATE["info_logged"]:
        _STATE["info_logged"] = True
        logger.warning("hf_fusedce: Liger Kernel composed with hf_fusedce on %s: Liger's layer kernels kept, its "
                       "fused linear cross-entropy / cross-entropy turned off for hf_fusedce's head", name)


def _wrap_apply_functions(module) -> None:
    table = getattr(module, "MODEL_TYPE_TO_APPLY_LIGER_FN", {})
    wrapped = {}  # id(original) -> wrapper
    for name, fn in list(vars(module).items()):
        if name.startswith("apply_liger_kernel_to_") and callable(fn) and not getattr(fn, "__hf_fusedce__", False):
            wrapped[id(fn)] = _composing(fn)
            setattr(module, name, wrapped[id(fn)])
    for key, fn in list(table.items()):
        table[key] = wrapped.get(id(fn), fn)
    package = sys.modules.get("liger_kernel.transformers")  # already bound the names when imported first
    for name, fn in list(vars(package).items()) if package is not None else ():
        if id(fn) in wrapped:
            setattr(package, name, wrapped[id(fn)])


def _composing(apply_fn):
    signature = inspect.signature(apply_fn)
    head_params = [k for k in HEAD_KERNELS if k in signature.parameters]

    @functools.wraps(apply_fn)
    def apply(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        model = bound.arguments.get("model")
        ours = patching.is_patched(model) if model is not None else patching.globally_patched()
        if ours and head_params:
            for key in head_params:
                bound.arguments[key] = False
            _info(type(model).__name__ if model is not None else "every patched class")
        return apply_fn(*bound.args, **bound.kwargs)

    apply.__hf_fusedce__ = True
    return apply
