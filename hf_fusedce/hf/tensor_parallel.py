"""A vocabulary-sharded lm_head under tensor parallelism, used where it lies: no rank gathers the full weight.

transformers' `tp_plan` (from_pretrained(..., tp_plan="auto") or a DistributedConfig) shards the lm_head with
`colwise_gather_output`: weight (and bias) become DTensors Shard(0) on the mesh dimension named "tp", tied or not
(a tied embedding is the same parameter), and stock gathers the logits. `vocab_shard` recognises that layout and hands the head to the vocab-parallel op on the tp dimension's process
group; gradients flow to the local slice of the DTensor (to_local is differentiable). Anything else sharded (an
FSDP2 DTensor seen outside its unshard window, other placements) keeps the full-tensor path (gather.py).
FSDP2 x TP (DistributedConfig(tp_size=2, fsdp_size=2) builds a (fsdp, tp) mesh): FSDP2 unshards the "fsdp"
dimension before the head runs, so the head sees the same "tp" layout and takes the same path; FSDP2 then
reduce-scatters the slice's gradient over "fsdp" as for stock.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.vocab_parallel import shard_range, vocab_parallel_linear_cross_entropy

TP_DIM = "tp"  # the mesh dimension name transformers (and torch's TP recipes) give tensor parallelism


@dataclass
class VocabShard:
    """This rank's rows [start, start + rows) of a (vocab_size, D) head, and the group holding the others."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    start: int
    vocab_size: int
    group: object
    per_rank: int  # ceil(vocab_size / world) before any vocab_limit: the slot each rank's logits fill

    @property
    def loss_fn(self):
        """`fused_linear_cross_entropy`-compatible callable on this shard."""
        return functools.partial(vocab_parallel_linear_cross_entropy, vocab_start=self.start,
                                 vocab_size=self.vocab_size, group=self.group)

    @torch.no_grad()
    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """All ranks' (n, rows) logits side by side: (n, vocab_size). Only for callers that asked for logits."""
        pad = self.per_rank - local_logits.shape[-1]
        mine = torch.nn.functional.pad(local_logits, (0, pad)).contiguous()
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def _tp_dim(t) -> int | None:
    """The mesh dimension along which `t` is split by vocabulary rows, if it is a TP-sharded DTensor."""
    placements = getattr(t, "placements", None)
    mesh = getattr(t, "device_mesh", None)
    if placements is None or mesh is None or t.dim() != 2:
        return None
    names = mesh.mesh_dim_names or ()
    if TP_DIM not in names:
        return None
    dim = names.index(TP_DIM)
    others_replicated = all(p.is_replicate() for i, p in enumerate(placements) if i != dim)
    split_rows = placements[dim].is_shard() and placements[dim].dim == 0
    return dim if split_rows and others_replicated else None


def is_vocab_sharded(weight) -> bool:
    """A head weight split by vocabulary over a "tp" mesh dimension (what `vocab_shard` handles)."""
    return weight is not None and _tp_dim(weight) is not None


def refuse_vocab_sharded(weight: torch.Tensor, what: str) -> None:
    """Paths that still need the full weight say so instead of gathering V x D on every rank."""
    if is_vocab_sharded(weight):
        raise NotImplementedError(
            f"hf_fusedce: {what} need the full lm_head weight, which tensor parallelism shards by vocabulary "
            f"(DTensor {tuple(weight.placements)} on the '{TP_DIM}' mesh dimension); only the training loss runs "
            "vocab-parallel so far. Compute the loss through the patched forward (labels=...), or load the model "
            "without tp_plan.")


def vocab_shard(weight: torch.Tensor, bias: torch.Tensor | None, vocab_limit: int | None = None) -> VocabShard | None:
    """The local slice of a head weight sharded by vocabulary over a "tp" mesh dimension, or None.

    vocab_limit: keep only the first vocab_limit rows of the global vocabulary (a padded head, e.g. Inkling)."""
    dim = _tp_dim(weight)
    if dim is None:
        return None
    mesh = weight.device_mesh
    world, coord = mesh.size(dim), mesh.get_local_rank(dim)
    vocab = weight.shape[0]
    start, stop = shard_range(vocab, world, coord)
    local_w = weight.to_local()
    if local_w.shape[0] != stop - start:
        raise RuntimeError(f"hf_fusedce: lm_head.weight is a DTensor {weight.placements} whose local rows "
                           f"({local_w.shape[0]}) are not torch's Shard(0) split of {vocab} over {world} ranks "
                           f"(expected rows [{start}, {stop})); this layout is not supported: unpatch the model")
    local_b = None
    if bias is not None:  # colwise shards the bias like the weight; a plain (replicated) bias is sliced
        local_b = bias.to_local() if hasattr(bias, "to_local") else bias[start:stop]
        if local_b.shape != (stop - start,):
            raise RuntimeError(f"hf_fusedce: lm_head.bias local shape {tuple(local_b.shape)} does not match the "
                               f"weight's rows [{start}, {stop}); this layout is not supported: unpatch the model")
    per_rank = -(-vocab // world)
    if vocab_limit is not None and vocab_limit < vocab:
        keep = max(0, min(stop, vocab_limit) - start)
        local_w, local_b = local_w[:keep], None if local_b is None else local_b[:keep]
        start, vocab = min(start, vocab_limit), vocab_limit
    return VocabShard(local_w, local_b, start, vocab, mesh.get_group(dim), per_rank)
