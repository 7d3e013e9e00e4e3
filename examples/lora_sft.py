"""LoRA supervised fine-tuning (peft) with the fused loss head; optionally LoRA on lm_head too.

Tiny and offline by default:

    python examples/lora_sft.py                  # LoRA on attention + MLP projections
    python examples/lora_sft.py --lora_on_lm_head  # ... and on lm_head (the fused head keeps the adapter exact)

Real use:

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/lora_sft.py \
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --train_file data/train.jsonl --bf16 \
        --lora_r 16 --max_length 2048 --max_steps -1 --num_train_epochs 1 --output_dir out/lora
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft  # noqa: E402  (same directory: chat tokenization with masked prompts)
from _common import load_model_and_tokenizer, write_result  # noqa: E402  (same directory: shared boilerplate)

from hf_fusedce import FusedCEConfig, FusedCETrainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--target_modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--lora_on_lm_head", action="store_true", help="also put a LoRA adapter on lm_head")
    lora, rest = p.parse_known_args(argv)
    args = sft.parse_args(rest)
    if "--learning_rate" not in (rest or sys.argv[1:]):
        args.learning_rate = 5e-3
    if "--output_dir" not in (rest or sys.argv[1:]):
        args.output_dir = "out/lora_sft"
    return lora, args


def main(argv=None):
    lora, args = parse_args(argv)
    model, tok = load_model_and_tokenizer(args, max_position=max(args.max_length, 256))
    targets = [m for m in lora.target_modules.split(",") if m] + (["lm_head"] if lora.lora_on_lm_head else [])
    set_seed(args.seed)  # LoRA's A matrices are drawn here, before Trainer seeds: make runs repeatable
    model = get_peft_model(model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    train = sft.load_split(args.train_file, tok, args)
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps, logging_steps=args.logging_steps, seed=args.seed, bf16=args.bf16, report_to=args.report_to,
        save_strategy="no", ddp_find_unused_parameters=False, use_cpu=args.cpu or not torch.cuda.is_available(),
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}))
    trainer = FusedCETrainer(model=model, args=targs, train_dataset=train, processing_class=tok,
                             data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                             fusedce_config=FusedCEConfig(enabled=not args.stock))
    out = trainer.train()
    trainer.save_model()  # the adapter
    write_result(trainer, out, args.output_dir, lora_on_lm_head=lora.lora_on_lm_head)
    return trainer


if __name__ == "__main__":
    main()
