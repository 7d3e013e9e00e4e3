"""Reducing the callback's measurements over ranks (no-op in a single process)."""
from __future__ import annotations

import torch


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(sums: list[torch.Tensor], maxima: list[float], device) -> tuple[float, ...]:
    """Sum the first values, max the rest, over ranks (no-op in a single process)."""
    sums_t = torch.stack([s.to(device, torch.float64).reshape(()) for s in sums])
    max_t = torch.tensor([float(m) for m in maxima], device=device, dtype=torch.float64)
    if world() > 1:
        import torch.distributed as dist

        dist.all_reduce(sums_t, op=dist.ReduceOp.SUM)
        dist.all_reduce(max_t, op=dist.ReduceOp.MAX)
    return tuple(float(x) for x in torch.cat([sums_t, max_t]).tolist())
