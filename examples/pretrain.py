"""Causal-LM pretraining (or continued pretraining) on packed sequences with the fused loss head.

Tiny and offline by default (a 2-layer Llama with the shipped 32k tokenizer; the shipped demo texts packed into
blocks):

    python examples/pretrain.py

Real use (a .txt file with one document a line, or JSON/JSONL with a text column):

    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/pretrain.py \
        --model_name_or_path meta-llama/Llama-3.2-1B --train_file data/corpus.jsonl --text_field text \
        --block_size 4096 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --bf16 \
        --max_steps 1000 --output_dir out/pretrain
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import TrainingArguments, default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_model_and_tokenizer, write_result  # noqa: E402  (same directory: shared boilerplate)

from hf_fusedce import FusedCEConfig, FusedCETrainer  # noqa: E402
from hf_fusedce.demo.data import build_packed_dataset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="hub id or local dir; default: a tiny random Llama")
    p.add_argument("--from_scratch", action="store_true", help="use only the config of --model_name_or_path")
    p.add_argument("--train_file", default=None, help=".txt, or JSON/JSONL with --text_field (default: shipped data)")
    p.add_argument("--text_field", default="text")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--output_dir", default="out/pretrain")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--report_to", default="none")
    p.add_argument("--stock", action="store_true", help="stock loss head (same logging), for comparison")
    p.add_argument("--cpu", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tok = load_model_and_tokenizer(args, max_position=max(args.block_size, 256),
                                          from_scratch=args.from_scratch, pad_to_eos=False)
    train = build_packed_dataset(tok, args.block_size, args.train_file, args.text_field)
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, logging_steps=args.logging_steps, seed=args.seed, bf16=args.bf16,
        report_to=args.report_to, save_strategy="no", ddp_find_unused_parameters=False,
        use_cpu=args.cpu or not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}))
    trainer = FusedCETrainer(model=model, args=targs, train_dataset=train, data_collator=default_data_collator,
                             processing_class=tok, fusedce_config=FusedCEConfig(enabled=not args.stock))
    out = trainer.train()
    write_result(trainer, out, args.output_dir, blocks=len(train))
    return trainer


if __name__ == "__main__":
    main()
