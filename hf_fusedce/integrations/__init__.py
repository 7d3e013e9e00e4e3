"""The public `patch`: hf_fusedce's HF patch plus the outside libraries it composes with, when installed.

`hf.patching.patch` knows transformers only. This layer adds, each imported only if its library is installed:
TRL's fused LM head protocol (trl.py) and Liger Kernel composition (liger.py); and it watches a patched
model so that a forward replaced by someone else afterwards (an older TRL, Unsloth, ...) is reported once, by
name, at the first training forward (`is_patched` is then False); Liger's is taken off again (liger.py).
"""
from __future__ import annotations

import warnings

import torch

from ..hf import patching
from . import liger, trl
from .trl import distillation as trl_distillation
from .trl import experimental as trl_experimental

_WARNED = "_hf_fusedce_displaced_warned"


def patch(model=None, **options):
    """`hf_fusedce.hf.patching.patch` (same arguments), composed with TRL and Liger when they are installed."""
    result = patching.patch(model, **options)
    if trl.installed():
        trl.activate(model)
        trl_distillation.activate()  # DistillationTrainer: the fused distillation op for patched students
        trl_experimental.activate()  # trl.experimental's trainers: fused where wired, a warning where not
    if liger.installed():
        liger.activate(model, **options)
    if model is not None:
        _watch(patching.unwrap(model))
    return result


def unpatch(model=None):
    if model is not None:
        _unwatch(patching.unwrap(model))
    return patching.unpatch(model)


def patched(model, **options):
    """`with patched(model): ...` patches for the block only (a model already patched stays patched)."""
    return patching.patched(model, _patch=patch, _unpatch=unpatch, **options)


def defining_module(fwd) -> str:
    """Where a forward was written (functools.wraps copies `__module__` from the function it wraps)."""
    func = getattr(fwd, "__func__", fwd)
    name = getattr(func, "__globals__", {}).get("__name__") or getattr(func, "__module__", None)
    return name or type(fwd).__module__


def displacer(model) -> str:
    """Who owns the model's forward now, for messages."""
    target = patching.unwrap(model)
    fwd = target.__dict__.get("forward") or type(target).forward
    module = defining_module(fwd)
    for prefix, name in (("trl", "TRL's fused LM head (trl.trainer.utils.add_fused_lm_head)"),
                         ("liger_kernel", "Liger Kernel's fused linear cross-entropy forward"),
                         ("unsloth", "Unsloth's forward")):
        if module.startswith(prefix):
            return name
    return f"a forward from {module}"


def _check_displaced(module, args):
    """Forward pre-hook on a patched model: one warning when its forward is no longer ours in training."""
    if not (module.training and torch.is_grad_enabled()) or module.__dict__.get(_WARNED):
        return
    if not patching.is_patched(module):
        module.__dict__[_WARNED] = True
        who = displacer(module)
        warnings.warn(f"hf_fusedce: {type(module).__name__}.forward was replaced by {who} after "
                      f"hf_fusedce.patch(): this training step runs its loss, not hf_fusedce's head "
                      f"(is_patched() is False). Call hf_fusedce.patch(model) after it to put the head back.",
                      stacklevel=3)


def _watch(target) -> None:
    if _check_displaced not in target._forward_pre_hooks.values():
        target.register_forward_pre_hook(_check_displaced)
        target.__dict__.pop(_WARNED, None)


def _unwatch(target) -> None:
    for key, hook in list(target._forward_pre_hooks.items()):
        if hook is _check_displaced:
            del target._forward_pre_hooks[key]
