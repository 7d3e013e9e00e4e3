"""How the patched forward calls the output-embeddings module: a switch installed ONCE on the module.

`HeadSwitch` replaces the module's `_call_impl` (an instance attribute, so `module(x)` reaches it first, before
any hook) and `_InnerForward` sits at the innermost `forward` (below accelerate's hook wrapper, if any). What a
call does depends on the calls in flight in the CALLING thread (`_calls`), never on state stored on the module,
so any number of threads (a training thread beside a generating one, nn.DataParallel's replicas) share a model:

- stock (nothing in flight for this head): the module's own call, hooks and all.
- capture (`capture`): the stock model forward calls its head; the switch records the head's input and returns
  an empty placeholder `[..., 0]` in place of the logits, without running any hook: no sharded weight is
  gathered and no `[tokens x vocab]` tensor is built. The model's own code after the head (soft cap, scaling,
  slicing) runs on the empty placeholder; the stock forward returns normally (no exception to swallow).
- fuse (`call_through`, *forward redirection*): `module(hidden)` runs WITH its hooks (FSDP1 wrapper, FSDP2 /
  ZeRO-3 pre/post hooks, accelerate's offload / dispatch hooks: the weight is gathered or loaded once, not once
  per chunk, and the gradient flows back into the sharded parameter), but the innermost forward runs the fused
  loss instead.

Per thread is per call: a forward runs in one thread from its capture to its fused call. The backward, which
autograd may run on another thread, reads nothing from here (the op keeps what it needs in autograd's ctx).
Per-thread state is a `threading.local`, which torch.compile(fullgraph=True) traces (a ContextVar it cannot);
the switch itself is installed at patch time: no hook registration and no exception per call.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from . import adapters, replicas


class _InFlight(threading.local):
    """This thread's calls in flight, innermost last: captures ((switch, [head input]), ...) and fused jobs
    ((inner module, job), ...)."""
    captures: tuple = ()
    jobs: tuple = ()


_calls = _InFlight()


def _inner(module: nn.Module) -> nn.Module:
    """The module whose `forward` computes the head: FSDP1 wraps it (`_fsdp_wrapped_module`)."""
    while hasattr(module, "_fsdp_wrapped_module"):
        module = module._fsdp_wrapped_module
    return module


def _capture_box(switch) -> list | None:
    for sw, box in reversed(_calls.captures):
        if sw is switch:
            return box
    return None


def _job_for(module: nn.Module):
    for inner, job in reversed(_calls.jobs):
        if inner is module:
            return job
    return None


def _first_arg(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


class HeadSwitch:
    """The instance `_call_impl` of a head module, installed by `install`; see the module doc."""

    def __init__(self, head: nn.Module):
        self.head = head

    def __call__(self, *args, **kwargs):
        box = _capture_box(self)
        if box is not None:
            hidden = _first_arg(args, kwargs)
            if not box:  # the first call is the causal-LM head
                box.append(hidden)
            return hidden.new_empty(*hidden.shape[:-1], 0)
        return type(self.head)._call_impl(self.head, *args, **kwargs)

    def for_replica(self, replica: nn.Module) -> "HeadSwitch":
        return HeadSwitch(replica)


class _InnerForward:
    """The innermost forward: the fused job when this thread's call_through entered the module, else what was
    there before (`below`: an instance forward we sit on top of, if any)."""

    def __init__(self, module: nn.Module, below):
        self.module, self.below = module, below

    def __call__(self, *args, **kwargs):
        job = _job_for(self.module)
        if job is not None:
            return job(self.module, _first_arg(args, kwargs))
        if self.below is not None:
            return self.below(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def for_replica(self, replica: nn.Module) -> "_InnerForward":
        return _InnerForward(replica, self.below)


_SLOTS = ("forward", "_old_forward")


def _seated(inner: nn.Module) -> bool:
    return any(isinstance(inner.__dict__.get(slot), _InnerForward) for slot in _SLOTS)


def _seat(inner: nn.Module) -> None:
    """Sit at the innermost forward: accelerate's hook wrapper calls `_old_forward`, so sit there when it is
    present (its pre/post hooks then run around us). A forward assigned since (TRL's `cast_lm_head_to_fp32`
    assigns `lm_head.forward`) becomes the one stock mode calls."""
    if _seated(inner):
        return
    slot = "_old_forward" if ("_hf_hook" in inner.__dict__ and "_old_forward" in inner.__dict__) else "forward"
    inner.__dict__[slot] = _InnerForward(inner, inner.__dict__.get(slot))
    replicas.bind(inner)


def _unseat(inner: nn.Module) -> None:
    # accelerate may have wrapped us since (we then sit in `_old_forward`): restore wherever we are
    for slot in _SLOTS:
        ours = inner.__dict__.get(slot)
        if isinstance(ours, _InnerForward):
            if ours.below is not None:
                inner.__dict__[slot] = ours.below
            elif slot == "forward":
                del inner.__dict__[slot]
            else:
                inner.__dict__[slot] = type(inner).forward.__get__(inner)
    replicas.unbind(inner)


def switch_of(head: nn.Module) -> HeadSwitch | None:
    sw = head.__dict__.get("_call_impl")
    return sw if isinstance(sw, HeadSwitch) else None


def install(head: nn.Module) -> HeadSwitch:
    """The head's switch (installed now if absent: e.g. `resize_token_embeddings` built a new head), seated on
    top of the module's current forward."""
    sw = switch_of(head)
    if sw is None:
        sw = head.__dict__["_call_impl"] = HeadSwitch(head)
        replicas.bind(head)
    _seat(_inner(head))
    return sw


def uninstall(head: nn.Module | None) -> None:
    """Remove the switches of the head and of the modules below it (entered by call_through)."""
    for module in () if head is None else head.modules():
        if switch_of(module) is not None:
            _unseat(_inner(module))
            module.__dict__.pop("_call_impl")
            replicas.unbind(module)


def capture(switch: HeadSwitch, run_model):
    """(head input, model output) of `run_model()`, the stock forward, with the head call short-circuited in
    this thread only."""
    box, outer = [], _calls.captures
    _calls.captures = outer + ((switch, box),)
    try:
        out = run_model()
    finally:
        _calls.captures = outer
    return (box[0] if box else None), out


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
    install(modules[0])
    outer = _calls.jobs
    _calls.jobs = outer + ((_inner(modules[0]), lambda inner, h: _through(modules[1:], job, h)),)
    try:  # Module.__call__, not modules[0](...): ParameterDict (trainable tokens' deltas) forbids being called
        return nn.Module.__call__(modules[0], hidden)
    finally:
        _calls.jobs = outer


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
