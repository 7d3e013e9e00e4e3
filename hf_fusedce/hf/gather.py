"""How the patched forward calls the output-embeddings module: a switch installed ONCE on the module.

`HeadSwitch` replaces the module's `_call_impl` (an instance attribute, so `module(x)` reaches it first, before
any hook) and sits at the innermost `forward` (below accelerate's hook wrapper, if any). It has three modes:

- stock (default): the module's own call, hooks and all; nothing changes for generation, eval, other code.
- capture: the stock model forward calls its head; the switch records the head's input and returns an empty
  placeholder `[..., 0]` in place of the logits, without running any hook: no sharded weight is gathered and
  no `[tokens x vocab]` tensor is built. The model's own code after the head (soft cap, scaling, slicing)
  runs on the empty placeholder; the stock forward returns normally (no exception to swallow).
- fuse (*forward redirection*): `module(hidden)` runs WITH its hooks (FSDP1 wrapper, FSDP2 / ZeRO-3 pre/post
  hooks, accelerate's offload / dispatch hooks: the weight is gathered or loaded once, not once per chunk, and
  the gradient flows back into the sharded parameter), but the innermost forward runs the fused loss instead.

Installed at patch time, the switch is plain attribute state, so torch.compile(fullgraph=True) traces it
with no hook registration and no exception per call.
"""
from __future__ import annotations

import torch
from torch import nn

from . import adapters

_STOCK, _CAPTURE, _FUSE = 0, 1, 2


def _inner(module: nn.Module) -> nn.Module:
    """The module whose `forward` computes the head: FSDP1 wraps it (`_fsdp_wrapped_module`)."""
    while hasattr(module, "_fsdp_wrapped_module"):
        module = module._fsdp_wrapped_module
    return module


class HeadSwitch:
    """Installed on one head module by `install`; see the module doc."""

    def __init__(self, head: nn.Module):
        self.head, self.inner = head, _inner(head)
        self.mode, self.captured, self.job = _STOCK, None, None
        # accelerate's hook wrapper calls `_old_forward`: sit there so its pre/post hooks run around us
        self.slot = "_old_forward" if ("_hf_hook" in self.inner.__dict__ and
                                       "_old_forward" in self.inner.__dict__) else "forward"
        self.below = self.inner.__dict__.get(self.slot)  # an instance forward we sit on top of, if any
        self.inner.__dict__[self.slot] = _InnerForward(self)
        head.__dict__["_call_impl"] = self

    def __call__(self, *args, **kwargs):
        if self.mode == _CAPTURE:
            hidden = args[0] if args else next(iter(kwargs.values()))
            if self.captured is None:  # the first call is the causal-LM head
                self.captured = hidden
            return hidden.new_empty(*hidden.shape[:-1], 0)
        return type(self.head)._call_impl(self.head, *args, **kwargs)

    def reseat(self) -> None:
        """Sit on top again if the module was given a new instance forward since install (TRL's
        `cast_lm_head_to_fp32` assigns `lm_head.forward`): that forward becomes the one stock mode calls."""
        if any(isinstance(self.inner.__dict__.get(slot), _InnerForward) for slot in ("forward", "_old_forward")):
            return
        self.below = self.inner.__dict__.get(self.slot)
        self.inner.__dict__[self.slot] = _InnerForward(self)

    def remove(self) -> None:
        # accelerate may have wrapped us since (we then sit in `_old_forward`): restore wherever we are
        for slot in ("forward", "_old_forward"):
            if isinstance(self.inner.__dict__.get(slot), _InnerForward):
                if self.below is not None:
                    self.inner.__dict__[slot] = self.below
                elif slot == "forward":
                    del self.inner.__dict__[slot]
                else:
                    self.inner.__dict__[slot] = type(self.inner).forward.__get__(self.inner)
        self.head.__dict__.pop("_call_impl", None)


class _InnerForward:
    """The innermost forward: the fused job in fuse mode, else what was there before."""

    def __init__(self, switch: HeadSwitch):
        self.switch = switch

    def __call__(self, *args, **kwargs):
        sw = self.switch
        if sw.mode == _FUSE:
            return sw.job(sw.inner, args[0] if args else next(iter(kwargs.values())))
        if sw.below is not None:
            return sw.below(*args, **kwargs)
        return type(sw.inner).forward(sw.inner, *args, **kwargs)


def switch_of(head: nn.Module) -> HeadSwitch | None:
    sw = head.__dict__.get("_call_impl")
    return sw if isinstance(sw, HeadSwitch) else None


def install(head: nn.Module) -> HeadSwitch:
    """The head's switch (installed now if absent: e.g. `resize_token_embeddings` built a new head), seated on
    top of the module's current forward."""
    sw = switch_of(head)
    if sw is None:
        return HeadSwitch(head)
    sw.reseat()
    return sw


def uninstall(head: nn.Module | None) -> None:
    """Remove the switches of the head and of the modules below it (entered by call_through)."""
    for module in () if head is None else head.modules():
        sw = switch_of(module)
        if sw is not None:
            sw.remove()


def capture(switch: HeadSwitch, run_model):
    """(head input, model output) of `run_model()`, the stock forward, with the head call short-circuited."""
    switch.mode, switch.captured = _CAPTURE, None
    try:
        out = run_model()
    finally:
        switch.mode = _STOCK
    hidden, switch.captured = switch.captured, None
    return hidden, out


def call_through(head: nn.Module, fn, hidden: torch.Tensor):
    """Run `fn(inner_module, hidden)` as if it were `head(hidden)`: the sharding / offload hooks around `head`
    fire, so inside `fn` the inner module's parameters are full tensors on the execution device. Modules below
    the head whose parameters the fused head reads without calling them (PEFT's base layer and lora_B,
    modules_to_save's copy, trainable tokens: adapters.weight_modules) are entered the same way, nested, so
    ZeRO-3's per-module hooks gather them too."""
    inner = _inner(head)
    below = [m for m in adapters.weight_modules(inner) if m is not inner and m is not head]
    return _through([head, *below], lambda h: fn(inner, h), hidden)


def _through(modules, job, hidden):
    if not modules:
        return job(hidden)
    switch = install(modules[0])
    switch.mode, switch.job = _FUSE, (lambda inner, h: _through(modules[1:], job, h))
    try:  # Module.__call__, not modules[0](...): ParameterDict (trainable tokens' deltas) forbids being called
        return nn.Module.__call__(modules[0], hidden)
    finally:
        switch.mode, switch.job = _STOCK, None


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor left sharded (FSDP2 outside its unshard window, or a module not grouped) -> full tensor,
    differentiable back to the shard. Plain tensors pass through."""
    if t is not None and hasattr(t, "full_tensor") and hasattr(t, "placements"):
        return t.full_tensor()
    return t


def check_materialized(weight: torch.Tensor, name: str = "lm_head.weight") -> None:
    """ZeRO-3 leaves numel-0 placeholders outside the module's hooks: fail loudly instead of a shape error."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise RuntimeError(f"{name} is not materialized (shape {tuple(weight.shape)}): it is sharded and was "
                           "read outside its module's forward; call the head through gather.call_through")
