"""One rank of a CPU (gloo) tensor-parallel run, launched by tests/distributed/test_tp.py with torchrun.

Many checks per launch (process start-up dominates the cost). Each rank writes rank<r>.pt with what it measured;
the test asserts.

* op: `vocab_parallel_linear_cross_entropy` on this rank's slice (torch's Shard(0) split, uneven vocabularies,
  empty slices) against the single-device op on the full weight and the float64 reference, every option:
  loss, dh (summed over ranks), dW and db of the slice; FLOPs of the op per rank vs the single-device op.
* hf: tiny Llamas (untied and tied) and a Gemma2 (tied, softcap; a vocabulary that does not split evenly) loaded with
  `from_pretrained(dir, tp_plan="auto")`, stock vs `hf_fusedce.patch`: loss and every parameter's local gradient
  shard, the largest tensor allocated per rank during the patched step (hf_fusedce.memory's live-tensor tracker),
  that the fused path ran, and return_logits.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from torch.utils.flop_counter import FlopCounterMode

from hf_fusedce.memory import LiveTensorTracker
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


def op_flops(rank, world, vocab=1024):
    """Matmul FLOPs of forward + backward: the vocab-parallel op on this rank's slice, the single-device op."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = torch.randn(vocab, D, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (N,), generator=g)
    lo, hi = shard_range(vocab, world, rank)
    counts = {}
    for name, fn, w, kw in (("single", fused_linear_cross_entropy, weight, {}),
                            ("shard", vocab_parallel_linear_cross_entropy, weight.detach()[lo:hi].requires_grad_(),
                             dict(vocab_start=lo, vocab_size=vocab))):
        with flop_counter() as fc:
            fn(hidden, w, targets, backend="torch", **kw).backward()
        counts[name] = fc.get_total_flops()
    return counts


def flop_counter():
    """FlopCounterMode that also counts the in-place dW accumulation (aten.addmm_ has no formula of its own)."""
    def addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_})


class LargestTensor(LiveTensorTracker):
    """The live-tensor tracker, also remembering the largest single storage allocated."""

    largest = 0

    def _track(self, t):
        self.largest = max(self.largest, t.untyped_storage().nbytes())
        super()._track(t)


def _watch_head(head):
    """Memory tracker and FLOP counter active exactly while the head module runs (the fused op computes the
    loss and all of its gradients there; the backward only scales them and sums dh over the group)."""
    tracker, flops = LargestTensor(), flop_counter()
    handles = [head.register_forward_pre_hook(lambda *_: (flops.__enter__(), tracker.__enter__()) and None),
               head.register_forward_hook(lambda *_: (tracker.__exit__(None, None, None),
                                                      flops.__exit__(None, None, None)) and None)]
    return tracker, flops, handles


HF_VOCAB, HF_DIM = 1001, 32


def save_tiny_models(root, rank) -> dict:
    """Untied and tied Llamas, and a Gemma2 (tied, final-logit softcap 5: a head quirk under TP)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=HF_VOCAB, hidden_size=HF_DIM, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    builders = {"llama_untied": lambda: LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common)),
                "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common)),
                "gemma2_softcap": lambda: Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=5.0,
                                                                         **common))}
    dirs = {name: os.path.join(root, name) for name in builders}
    if rank == 0:
        for i, (name, build) in enumerate(builders.items()):
            torch.manual_seed(i)
            build().save_pretrained(dirs[name])
    dist.barrier()
    return dirs


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _step(model, batch):
    out = model(**batch)
    out.loss.backward()
    return out, {n: None if p.grad is None else _local(p.grad).detach().clone() for n, p in model.named_parameters()}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, HF_VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return dict(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(13))


def check_hf(path, world):
    """Stock and patched TP models from the same checkpoint, same batch (identical on every rank)."""
    from transformers import AutoModelForCausalLM

    import hf_fusedce
    from unittest import mock

    from hf_fusedce.hf import forward
    from hf_fusedce.hf.forward import head_operands

    batch = _batch(5)
    labels = batch["labels"]
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).train()  # fused: training mode
    head_w = model.get_output_embeddings().weight
    layout = f"{type(head_w).__name__}{tuple(getattr(head_w, 'placements', ()))}"
    s_out, s_grads = _step(model, batch)  # stock first, then the same model patched
    model.zero_grad(set_to_none=True)
    patched = hf_fusedce.patch(model, backend="torch")
    tracker, flops, handles = _watch_head(patched.get_output_embeddings())
    with mock.patch.object(forward, "_head_loss", wraps=forward._head_loss) as fused_path:
        p_out, p_grads = _step(patched, batch)
    for h in handles:
        h.remove()
    n_active = int(labels[:, 1:].ne(-100).sum())
    res = {"layout": layout, "fused_ran": fused_path.call_count,
           "loss": (p_out.loss.item(), s_out.loss.item()), "largest_bytes": tracker.largest,
           "peak_bytes": tracker.peak_bytes, "head_bytes": HF_VOCAB * HF_DIM * 4,
           "head_flops": flops.get_total_flops(), "local_rows": _local(head_w).shape[0],
           "single_device_flops": 6 * n_active * HF_DIM * HF_VOCAB,
           "tied": patched.get_output_embeddings().weight is patched.get_input_embeddings().weight,
           "grad_errs": {}}
    for name, want in s_grads.items():
        got = p_grads[name]
        res["grad_errs"][name] = None if (got is None or want is None) else (
            rel_err(got, want) if got.shape == want.shape else float("inf"))
    # return_logits: the full logits, gathered, equal to stock's
    hf_fusedce.unpatch(patched)
    hf_fusedce.patch(patched, backend="torch", return_logits=True)
    out = patched(**batch)
    res["logits_err"] = rel_err(out.logits.reshape(s_out.logits.shape), s_out.logits)
    try:  # per-token outputs (TRL's protocol) do not run vocab-parallel yet: a clear refusal, no V x D gather
        head_operands(patched.get_output_embeddings(), torch.zeros(1, HF_DIM), None)
        res["per_token_refusal"] = "no error"
    except NotImplementedError as e:
        res["per_token_refusal"] = str(e)
    return res


def check_fsdp_x_tp(path, rank):
    """DistributedConfig(tp_size=2, fsdp_size=2) on 4 ranks: transformers builds a (fsdp, tp) mesh and FSDP2 unshards
    the fsdp dimension before the head runs. Each tp pair holds its own batch. Stock then patched, same model: loss
    and every local gradient shard (after FSDP2's reduce-scatter)."""
    from unittest import mock

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import hf_fusedce
    from hf_fusedce.hf import forward, tensor_parallel

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_size=2, fsdp_size=2)).train()
    w = model.get_output_embeddings().weight
    batch = _batch(100 + rank // 2)  # tp pairs (0, 1) and (2, 3) share a batch
    s_out, s_grads = _step(model, batch)
    model.zero_grad(set_to_none=True)
    hf_fusedce.patch(model, backend="torch")
    routed, real = [], tensor_parallel.vocab_shard

    def spy(*args):
        shard = real(*args)
        routed.append(shard is not None)
        return shard

    with mock.patch.object(forward, "_head_loss", wraps=forward._head_loss) as fused_path, \
            mock.patch.object(tensor_parallel, "vocab_shard", spy):
        p_out, p_grads = _step(model, batch)
    errs = {n: None if g is None or p_grads[n] is None else rel_err(p_grads[n], g) for n, g in s_grads.items()}
    return {"mesh": tuple(w.device_mesh.mesh_dim_names), "fused_ran": fused_path.call_count,
            "vocab_parallel": sum(routed),
            "loss": (p_out.loss.item(), s_out.loss.item()), "grad_errs": errs}


def refusals(rank, world):
    """Misuse raises a clear error on every rank (no hang): ranks holding different tokens, a triton backend."""
    hidden, weight = torch.randn(N, D), torch.randn(8, D)
    lo, hi = shard_range(8 * world, world, rank)
    got = {}
    for name, targets, kw in (("different_tokens", torch.full((N,), rank), {}),
                              ("triton", torch.zeros(N, dtype=torch.long), {"backend": "triton"})):
        try:
            vocab_parallel_linear_cross_entropy(hidden, weight, targets, vocab_start=lo, vocab_size=8 * world, **kw)
            got[name] = "no error"
        except ValueError as e:
            got[name] = str(e)
    return got


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
    result["op_flops"] = op_flops(rank, world)
    result["refusals"] = refusals(rank, world)
    dirs = save_tiny_models(a.out, rank)
    for name, path in dirs.items():
        result[f"hf_{name}"] = check_hf(path, world)
    if world == 4:
        result["fsdp_x_tp"] = check_fsdp_x_tp(dirs["llama_untied"], rank)
    torch.save(result, os.path.join(a.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
