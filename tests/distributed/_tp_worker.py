"""One rank of a CPU (gloo) tensor-parallel run, launched by tests/distributed/test_tp.py with torchrun.

Many checks per launch (process start-up dominates the cost). Each rank writes rank<r>.pt with what it measured;
the test asserts.

* op: `vocab_parallel_linear_cross_entropy` on this rank's slice (torch's Shard(0) split, uneven vocabularies,
  empty slices) against the single-device op on the full weight and the float64 reference, every option:
  loss, dh (summed over ranks), dW and db of the slice.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from hf_fusedce.ops import fused_linear_cross_entropy
from hf_fusedce.ops.vocab_parallel import shard_range, vocab_parallel_linear_cross_entropy
from hf_fusedce.testing import reference_loss_and_grads, rel_err, run_with_grads

N, D = 37, 16
BUDGET = 16 * 40 * 4  # a few rows per chunk: several chunks, each with its own all-reduces


def _targets(vocab, g, ignore=True):
    t = torch.randint(0, vocab, (N,), generator=g)
    if ignore:
        t[::5] = -100
    return t


def op_cases(vocab):
    """(name, kwargs for both ops, grad_output or None). Same random draws on every rank."""
    g = torch.Generator().manual_seed(7)
    soft_ids = torch.randint(0, vocab, (N, 3), generator=g)
    soft_ids[::4, 1] = -100
    soft_ids[::7] = -100  # whole rows ignored
    soft_p = torch.rand(N, 3, generator=g).softmax(-1)
    return [
        ("plain", dict(targets=_targets(vocab, g, ignore=False)), None),
        ("bias_ignore", dict(targets=_targets(vocab, g), bias=torch.randn(vocab, generator=g)), None),
        ("smoothing", dict(targets=_targets(vocab, g), label_smoothing=0.1), None),
        ("z_loss", dict(targets=_targets(vocab, g), z_loss=1e-2), None),
        ("softcap_scale", dict(targets=_targets(vocab, g), softcap=3.0, logit_scale=0.7), None),
        ("token_weights", dict(targets=_targets(vocab, g), token_weights=torch.rand(N, generator=g)), None),
        ("soft_targets", dict(targets=soft_ids, target_probs=soft_p, label_smoothing=0.05), None),
        ("sum", dict(targets=_targets(vocab, g), reduction="sum"), None),
        ("num_items", dict(targets=_targets(vocab, g), num_items_in_batch=torch.tensor(55)), None),
        ("none", dict(targets=_targets(vocab, g), reduction="none", bias=torch.randn(vocab, generator=g),
                      softcap=4.0, z_loss=1e-3, label_smoothing=0.2), torch.randn(N, generator=g)),
        ("all_ignored", dict(targets=torch.full((N,), -100)), None),
        ("everything", dict(targets=_targets(vocab, g), bias=torch.randn(vocab, generator=g), label_smoothing=0.1,
                            z_loss=1e-3, softcap=5.0, logit_scale=1.3, token_weights=torch.rand(N, generator=g),
                            num_items_in_batch=40), None),
    ]


def _slice(t, lo, hi):
    return None if t is None else t[lo:hi]


def check_op(vocab, dtype, rank, world):
    """rel errs per case vs the single-device op and vs float64: {case: {quantity: (vs_single, vs_f64)}}."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, D, generator=g) * 0.5).to(dtype).requires_grad_()
    lo, hi = shard_range(vocab, world, rank)
    out = {}
    for name, kw, grad_out in op_cases(vocab):
        targets, bias = kw.pop("targets"), kw.pop("bias", None)
        if bias is not None:
            bias = bias.to(dtype).requires_grad_()
        single = run_with_grads(fused_linear_cross_entropy, hidden, weight, targets, bias=bias,
                                grad_output=grad_out, backend="torch", chunk_budget_bytes=BUDGET, **kw)
        ref = reference_loss_and_grads(hidden, weight, targets, bias=bias, grad_output=grad_out, **kw)
        shard_w = weight.detach()[lo:hi].clone().requires_grad_()
        shard_b = None if bias is None else bias.detach()[lo:hi].clone().requires_grad_()
        ours = run_with_grads(vocab_parallel_linear_cross_entropy, hidden, shard_w, targets, bias=shard_b,
                              grad_output=grad_out, vocab_start=lo, vocab_size=vocab, chunk_budget_bytes=BUDGET, **kw)
        errs = {"loss": (rel_err(ours.loss, single.loss), rel_err(ours.loss, ref.loss)),
                "hidden": (rel_err(ours.grads["hidden"], single.grads["hidden"]),
                           rel_err(ours.grads["hidden"], ref.grads["hidden"]))}
        for key in ("weight", "bias"):
            if ours.grads[key] is not None:
                assert ours.grads[key].shape == (hi - lo, D)[: 2 if key == "weight" else 1]
                errs[key] = (rel_err(ours.grads[key], _slice(single.grads[key], lo, hi)),
                             rel_err(ours.grads[key], _slice(ref.grads[key], lo, hi)))
        out[name] = errs
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    result = {"world": world, "rank": rank}
    result["op_f32_uneven"] = check_op(101, torch.float32, rank, world)
    result["op_f64_tiny_vocab"] = check_op(world - 1 if world > 2 else 3, torch.float64, rank, world)
    torch.save(result, os.path.join(a.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
