"""One rank of a 2-process CPU (gloo; nccl on GPUs) FSDP2 run (or, --fsdp 1, FSDP1: GPU only) (`torch.distributed.fsdp.fully_shard`) of a patched tiny Llama.

accelerate 1.15 only enables FSDP for GPU-family distributed types (with `use_cpu` the fsdp2.yaml config silently
runs DDP), so on CPU the sharding is applied by hand the way accelerate's FSDP2 does it: one group per decoder
layer, then the root (final norm + lm_head, + the embedding when tied). Launched with torchrun. The loop is what
Trainer does with average_tokens_across_devices and gradient accumulation 2: num_items_in_batch is the global
count of the step's tokens, each micro-batch's loss is multiplied by the world size, FSDP2 averages the gradients.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trainer_worker import GRAD_ACC, PER_DEVICE, build_model, samples  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tied", type=int, default=1)
    p.add_argument("--backend", default="torch")
    p.add_argument("--fsdp", type=int, default=2, help="2: fully_shard; 1: FSDP1 wrapper (flat parameters)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from torch.distributed.fsdp import fully_shard

    import hf_fusedce
    from unittest import mock

    from hf_fusedce.hf import forward
    fused_path = mock.patch.object(forward, "_head_loss", wraps=forward._head_loss).start()  # counts fused calls

    model = build_model(bool(a.tied))
    model.to(device).train()
    hf_fusedce.patch(model, backend=a.backend)
    if a.fsdp == 2:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:  # FSDP1: decoder layers wrapped, lm_head (+ tied embedding) in the root unit's flat parameter
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = FSDP(layer, use_orig_params=False, device_id=device)
        model = FSDP(model, use_orig_params=False, device_id=device)
    w = model.get_output_embeddings().weight if a.fsdp == 2 else model.module.get_output_embeddings().weight
    kind = type(w).__name__ + ("/" + str(w.placements) if hasattr(w, "placements") else "")
    data = samples()
    global_bs = PER_DEVICE * world
    micro = []
    for m in range(GRAD_ACC):  # the first optimizer step: global micro-batches 0 and 1
        chunk = data[m * global_bs:(m + 1) * global_bs]
        mine = chunk[rank * PER_DEVICE:(rank + 1) * PER_DEVICE]
        micro.append({k: torch.stack([s[k] for s in mine]).to(device) for k in mine[0]})
    local = torch.tensor(sum(int(mb["labels"][..., 1:].ne(-100).sum()) for mb in micro), device=device)
    dist.all_reduce(local)
    n_items = int(local)
    records = []
    for mb in micro:
        out = model(**mb, num_items_in_batch=torch.tensor(n_items, device=device))
        loss = out.loss * world
        loss.backward()
        records.append({"input_ids": mb["input_ids"].cpu(), "labels": mb["labels"].cpu(), "loss": loss.item(),
                        "num_items_in_batch": n_items, "step": 0})
    grads = {}
    if a.fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, with_grads=True):
            for name, prm in model.named_parameters():
                name = name.replace("_fsdp_wrapped_module.", "")
                grads[name] = None if prm.grad is None else prm.grad.detach().cpu().clone()
    for name, prm in (model.named_parameters() if a.fsdp == 2 else []):
        g = prm.grad
        grads[name] = None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone()
    w_after = w
    kind_after = type(w_after).__name__
    torch.save({"records": records, "grads": grads, "head_weight_kind": kind, "head_weight_kind_after": kind_after,
                "world_size": world, "fused_calls": fused_path.call_count, "wrapped": type(model).__name__,
                "model_class": type(model).__name__}, os.path.join(a.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
