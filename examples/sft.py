"""Supervised fine-tuning with the fused loss head: chat-formatted instruction data, labels only on responses.

Tiny and offline by default (a 2-layer Llama with the shipped 32k tokenizer, the shipped SFT JSONL):

    python examples/sft.py

Real use (any causal LM with a chat template; JSONL/JSON records with a "messages" list of {role, content}):

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/sft.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --train_file data/train.jsonl \
        --max_length 2048 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --bf16 \
        --max_steps -1 --num_train_epochs 1 --output_dir out/sft
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_model_and_tokenizer, write_result  # noqa: E402  (same directory: shared boilerplate)

from hf_fusedce import FusedCEConfig, FusedCETrainer  # noqa: E402
from hf_fusedce.demo.data import load_sft_dataset, tokenize_chat  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="hub id or local dir; default: a tiny random Llama")
    p.add_argument("--train_file", default=None, help="JSON/JSONL with a messages column (default: shipped demo data)")
    p.add_argument("--eval_file", default=None)
    p.add_argument("--messages_field", default="messages")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--output_dir", default="out/sft")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_scheduler_type", default="constant", help="e.g. cosine for real runs")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=1)
    p.add_argument("--eval_steps", type=int, default=None, help="default: half of max_steps, else 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ...")
    p.add_argument("--stock", action="store_true", help="stock loss head (same logging), for comparison")
    p.add_argument("--cpu", action="store_true", help="force CPU (default: CPU when no GPU)")
    return p.parse_args(argv)


def load_split(path, tok, args):
    """The chat records at `path` (the shipped demo SFT data by default), tokenized with labels on the
    assistant turns only (hf_fusedce.demo.data.tokenize_chat)."""
    ds = load_sft_dataset(path)
    if args.max_train_samples:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    ds = ds.map(tokenize_chat, fn_kwargs={"tokenizer": tok, "max_length": args.max_length,
                                          "messages_field": args.messages_field}, remove_columns=ds.column_names)
    return ds.filter(lambda e: any(x != -100 for x in e["labels"]))  # a truncated-away response teaches nothing


def main(argv=None):
    args = parse_args(argv)
    model, tok = load_model_and_tokenizer(args, max_position=max(args.max_length, 256))
    train = load_split(args.train_file, tok, args)
    evald = load_split(args.eval_file, tok, args) if args.eval_file else None
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps, seed=args.seed, bf16=args.bf16,
        report_to=args.report_to, save_strategy="no", ddp_find_unused_parameters=False,
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
        eval_strategy="steps" if evald is not None else "no", eval_steps=args.eval_steps or (max(args.max_steps // 2, 1) if args.max_steps > 0 else 500),
        use_cpu=args.cpu or not torch.cuda.is_available(), remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = FusedCETrainer(
        model=model, args=targs, train_dataset=train, eval_dataset=evald, processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        fusedce_config=FusedCEConfig(enabled=not args.stock))
    out = trainer.train()
    write_result(trainer, out, args.output_dir, world_size=trainer.accelerator.num_processes)
    return trainer


if __name__ == "__main__":
    main()
