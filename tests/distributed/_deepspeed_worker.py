"""One rank of 2-process CPU DeepSpeed runs (DS_ACCELERATOR=cpu, gloo): stock vs patched under the same ZeRO run.

Launched by tests/distributed/test_deepspeed.py with torchrun; one launch runs several cases in a row (a DeepSpeed
start costs seconds, the first one on a machine minutes: its shared-memory op is compiled). Per case, the same
seeded tiny Llama is trained twice in this process, once stock and once patched (hf_fusedce.patch or
FusedCETrainer): 2 optimizer steps of SGD (AdamW would amplify op-level rounding into the parameters), gradient
accumulation 2, one micro-batch whose rank holds only ignored labels. Recorded per run: every micro-step's loss,
the parameters before and after training gathered with `deepspeed.zero.GatheredParameters` (under ZeRO-3 `.grad`
stays empty: DeepSpeed keeps the partitioned gradients itself), how many lm_head elements this rank holds, and
how often the fused head ran. The test compares the two runs.

Trainer + DeepSpeed on CPU needs the process group made first (ACCELERATE_USE_DEEPSPEED=true, as accelerate launch
sets it, then PartialState(backend="gloo")) and `accelerator_config={"use_configured_state": True}`: otherwise accelerate counts one process and DeepSpeed two
("train_batch_size is not equal to ...").
"""
from __future__ import annotations

import argparse
import gc
import os
from unittest import mock

import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_fusedce.testing import tiny_llama
from _trainer_worker import VOCAB, samples  # the same data as the DDP/FSDP runs (this folder is on sys.path)

PER_DEVICE, GRAD_ACC, STEPS = 2, 2, 2

# case -> (trainer, tied, built under zero.Init, adapter, ZeRO stage, parameter offload)
CASES = {
    "trainer-untied": ("trainer", False, False, None, 3, False),
    "trainer-tied": ("trainer", True, False, None, 3, False),
    "fusedce-untied-zero-init": ("fusedce", False, True, None, 3, False),
    "fusedce-tied-zero-init": ("fusedce", True, True, None, 3, False),
    "trainer-lora-lm_head": ("trainer", False, False, "lora", 3, False),
    "trainer-modules_to_save": ("trainer", False, False, "save", 3, False),
    "trainer-zero2": ("trainer", True, False, None, 2, False),
    "trainer-zero3-offload": ("trainer", False, False, None, 3, True),
}


def ds_config(stage: int, offload: bool) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # partition even tiny parameters (the default keeps those under 1e5 elements whole)
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


class Recorder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(float(loss))
        return loss


def _fused_recorder():
    from hf_fusedce import FusedCETrainer

    class FusedRecorder(FusedCETrainer, Recorder):
        pass

    return FusedRecorder


def _gathered(model) -> dict[str, torch.Tensor]:
    import deepspeed
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone().float().cpu() for n, p in params.items()}


def _build(tied: bool, zero_init: bool, adapter: str | None):
    torch.manual_seed(0)
    if zero_init:  # as from_pretrained does under a ZeRO-3 TrainingArguments: built partitioned under zero.Init
        config = tiny_llama(VOCAB, tie=tied, max_position_embeddings=64, use_cache=False).config
        model = AutoModelForCausalLM.from_config(config).train()
    else:
        model = tiny_llama(VOCAB, tie=tied, max_position_embeddings=64, use_cache=False)
    if adapter:
        from peft import LoraConfig, get_peft_model
        kw = {"target_modules": ["q_proj", "v_proj", "lm_head"]} if adapter == "lora" else {
            "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kw))
    return model


def run(case: str, fused: bool, out: str) -> dict:
    import hf_fusedce
    from hf_fusedce.hf import forward
    kind, tied, zero_init, adapter, stage, offload = CASES[case]
    args = TrainingArguments(  # before the model: it switches on zero.Init for from_config
        output_dir=os.path.join(out, case), deepspeed=ds_config(stage, offload),
        accelerator_config={"use_configured_state": True}, per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=GRAD_ACC, max_steps=STEPS, learning_rate=0.5, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, average_tokens_across_devices=True, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0, remove_unused_columns=False,
        optim="sgd")
    from hf_fusedce.hf.patching import unwrap
    model = _build(tied, zero_init, adapter)
    built = unwrap(model).get_output_embeddings().weight
    built_partitioned = built.numel() == 0 and hasattr(built, "ds_id")
    before = _gathered(model)
    with mock.patch.object(forward, "_head_loss", wraps=forward._head_loss) as fused_path:
        if kind == "fusedce" and fused:
            trainer = _fused_recorder()(model=model, args=args, train_dataset=samples())
        else:
            if fused:
                hf_fusedce.patch(model, backend="torch")
            trainer = Recorder(model=model, args=args, train_dataset=samples())
        trainer.losses = []
        trainer.train()
        calls = fused_path.call_count
    head = unwrap(model).get_output_embeddings()
    result = {"losses": trainer.losses, "before": before, "after": _gathered(trainer.model), "fused_calls": calls,
              "head_local_numel": head.weight.numel(), "head_ds_numel": getattr(head.weight, "ds_numel", None),
              "built_partitioned": built_partitioned,
              "tied": unwrap(model).get_input_embeddings().weight is head.weight}
    trainer.accelerator.free_memory()
    del trainer, model
    gc.collect()
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # the next Trainer brings its own DeepSpeed plugin; the process group stays
    return result


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    a = p.parse_args(argv)
    from accelerate import PartialState
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` with a DeepSpeed config sets
    PartialState(backend="gloo")  # the process group first: accelerate then counts the 2 ranks DeepSpeed sees
    results = {}
    for case in a.cases.split(","):
        results[case] = {"stock": run(case, False, a.out), "fused": run(case, True, a.out)}
        torch.save(results, os.path.join(a.out, f"rank{os.environ.get('RANK', '0')}.pt"))  # what ran so far


if __name__ == "__main__":
    main()
