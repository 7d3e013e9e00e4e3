"""Full lm_head weight under FSDP1, FSDP2 and DeepSpeed ZeRO-3, by *forward redirection*.

Sharding wrappers gather a module's parameters in hooks around that module's call (FSDP1: the wrapper's
forward; FSDP2 and ZeRO-3: forward pre/post hooks on the module) and register the backward hooks that
reduce-scatter its gradients on the call's outputs. So we do not read `head.weight` directly (a flat shard,
a DTensor or an empty ZeRO-3 placeholder outside the call): we temporarily swap the head's `forward` for a
function that runs the whole fused loss, then call the head *module*. Its hooks gather the weight once (not
once per chunk), the loss is the call's output, and dW flows back into the sharded parameter (tied embedding
included, since the tied parameter is the same object).
"""
from __future__ import annotations

import torch
from torch import nn


def _inner(module: nn.Module) -> nn.Module:
    """The module whose `forward` computes the head: FSDP1 wraps it (`_fsdp_wrapped_module`)."""
    while hasattr(module, "_fsdp_wrapped_module"):
        module = module._fsdp_wrapped_module
    return module


def call_through(head: nn.Module, fn, hidden: torch.Tensor):
    """Run `fn(inner_module, hidden)` as if it were `head(hidden)`: the sharding hooks around `head` fire, so
    inside `fn` the inner module's parameters are full tensors. Returns fn's result."""
    inner = _inner(head)
    had_own = "forward" in inner.__dict__
    saved = inner.__dict__.get("forward")
    inner.forward = lambda h, *a, **k: fn(inner, h)  # instance attribute shadows the class forward
    try:
        return head(hidden)
    finally:
        if had_own:
            inner.forward = saved
        else:
            del inner.forward


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
