"""One rank of a 2-process CPU (gloo) training run of a patched tiny Llama through transformers.Trainer.

Launched by tests/distributed/test_distributed.py with `accelerate launch --config_file examples/accelerate/<x>.yaml`
(DDP or FSDP2) or with torchrun. Sequential sampling, gradient accumulation 2, average_tokens_across_devices,
one micro-batch whose rank holds only ignored labels. Each rank writes rank<r>.pt: per micro-step its inputs,
the loss Trainer got back and num_items_in_batch; the full (gathered) gradients at the first optimizer step; and
what the lm_head weight looked like outside the forward (DTensor or not). The test recomputes everything in one
process with the stock model and compares.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import SequentialSampler
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_fusedce.testing import tiny_llama

VOCAB, SEQ, N_SAMPLES = 96, 10, 16
PER_DEVICE, GRAD_ACC, WORLD = 2, 2, 2


def build_model(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """The shared tiny Llama (each rank and the single-process check build the same weights from the seed)."""
    return tiny_llama(VOCAB, tie=tied, seed=seed, max_position_embeddings=64, use_cache=False)


def samples() -> list[dict]:
    """Sequential order: global micro-batch m holds samples 4m..4m+3; under 2 ranks rank 0 gets 4m, 4m+1 and rank 1
    gets 4m+2, 4m+3. Samples 2 and 3 (rank 1, first micro-batch) have every label ignored; the others ignore a
    prompt prefix of varying length, so ranks hold different token counts."""
    g = torch.Generator().manual_seed(123)
    out = []
    for i in range(N_SAMPLES):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: (i * 3) % (SEQ - 2)] = -100
        if i in (2, 3):
            labels[:] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(SEQ, dtype=torch.long)})
    return out


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Recorder(Trainer):
    records: list

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.records.append({
            "input_ids": inputs["input_ids"].detach().cpu(),
            "labels": inputs["labels"].detach().cpu(),
            "loss": float(loss),
            "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
            "step": self.state.global_step,
        })
        return loss


class GradGrab(TrainerCallback):
    def __init__(self):
        self.grads = None
        self.head_weight_kind = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step != 0:
            return
        grads = {}
        for name, p in model.named_parameters():
            grads[name] = None if p.grad is None else full(p.grad).detach().cpu().clone()
        self.grads = grads
        w = model.get_output_embeddings().weight  # outside the forward
        self.head_weight_kind = type(w).__name__ + ("/" + str(w.placements) if hasattr(w, "placements") else "")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tied", type=int, default=1)
    p.add_argument("--backend", default="torch")
    p.add_argument("--stock", action="store_true", help="no patch: the same run with the stock head")
    a = p.parse_args(argv)

    import hf_fusedce
    from unittest import mock

    from hf_fusedce.hf import forward
    fused_path = mock.patch.object(forward, "_head_loss", wraps=forward._head_loss).start()  # counts fused calls

    model = build_model(bool(a.tied))
    if not a.stock:
        hf_fusedce.patch(model, backend=a.backend)
    args = TrainingArguments(
        output_dir=os.path.join(a.out, "trainer"), use_cpu=not torch.cuda.is_available(), per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=GRAD_ACC, max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, average_tokens_across_devices=True, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0, ddp_find_unused_parameters=False,
        remove_unused_columns=False, optim="sgd",
    )
    grab = GradGrab()
    memory = hf_fusedce.FusedCEMemoryCallback()  # its keys and probe, reduced over the ranks
    trainer = Recorder(model=model, args=args, train_dataset=samples(), callbacks=[grab, memory])
    trainer.records = []
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"records": trainer.records, "grads": grab.grads, "head_weight_kind": grab.head_weight_kind,
                "world_size": int(os.environ.get("WORLD_SIZE", "1")), "fused_calls": fused_path.call_count,
                "wrapped": type(trainer.model_wrapped).__name__, "model_class": type(trainer.model).__name__,
                "fusedce_logs": [h for h in trainer.state.log_history if "fusedce/tokens_per_sec" in h],
                "fusedce_probe": memory.probe, "fusedce_tokens": memory.summary["training"]["tokens"]},
               os.path.join(a.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
