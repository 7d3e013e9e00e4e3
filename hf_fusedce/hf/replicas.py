"""nn.DataParallel replicas of a patched model: every object of ours on a replica serves that replica.

DataParallel (HF Trainer uses it when it sees several GPUs and no distributed launcher) builds each replica per
forward with `Module._replicate_for_data_parallel()`: a shallow copy of the module's `__dict__`, run in its own
thread. An object of ours stored in a module's `__dict__` (the patched forward, the head switch) would then still
serve the ORIGINAL module: replica i would run the original's weights, on the original's device. `bind(module)`
gives the module an instance `_replicate_for_data_parallel` that makes the stock replica, then swaps each object
of ours in the replica's `__dict__` for its twin bound to the replica (the object's `for_replica(replica)`).
Per-call state is not here: it never lives on a module (gather.py keeps it per thread).
"""
from __future__ import annotations

from torch import nn

_REPLICATE = "_replicate_for_data_parallel"


class _Replicate:
    """The instance `_replicate_for_data_parallel` of a module carrying objects of ours."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self) -> nn.Module:
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        twins: dict[int, object] = {}  # one object held under two names (forward and its saved copy) stays one
        for key, value in list(replica.__dict__.items()):
            if getattr(type(value), "for_replica", None) is not None:
                if id(value) not in twins:
                    twins[id(value)] = value.for_replica(replica)
                replica.__dict__[key] = twins[id(value)]
        return replica

    def for_replica(self, replica: nn.Module) -> "_Replicate":
        return _Replicate(replica)


def bind(module: nn.Module) -> None:
    if not isinstance(module.__dict__.get(_REPLICATE), _Replicate):
        module.__dict__[_REPLICATE] = _Replicate(module)


def unbind(module: nn.Module) -> None:
    if isinstance(module.__dict__.get(_REPLICATE), _Replicate):
        del module.__dict__[_REPLICATE]
