"""Encoder-decoder training (T5 / mT5 / BART / Marian / Pegasus...) with the fused loss head: `Seq2SeqTrainer` +
`DataCollatorForSeq2Seq`, the decoder's unshifted token cross-entropy computed without [tokens x vocab] logits.

Tiny and offline by default (a 2+2-layer T5-shaped model with the shipped tokenizer; the shipped question ->
answer pairs):

    python examples/seq2seq.py            # fused
    python examples/seq2seq.py --stock    # stock head, same data: same losses

Real use: `--model_name_or_path google/mt5-small` (AutoModelForSeq2SeqLM; its tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                          Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration)

import hf_fusedce
from hf_fusedce.callback import FusedCEMemoryCallback


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="hub id or local dir; default: a tiny random T5")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--output_dir", default="out/seq2seq")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stock", action="store_true", help="stock loss head (same logging), for comparison")
    return p.parse_args(argv)


def model_and_tokenizer(args):
    if args.model_name_or_path:
        return (AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path),
                AutoTokenizer.from_pretrained(args.model_name_or_path))
    from hf_fusedce.demo import load_demo_tokenizer
    tok = load_demo_tokenizer()
    torch.manual_seed(args.seed)
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    return T5ForConditionalGeneration(config), tok


def pairs_dataset(tok, max_length):
    """(question -> answer) pairs of the shipped SFT records."""
    from hf_fusedce.demo.data import load_sft_dataset

    def encode(example):
        user, answer = example["messages"][0]["content"], example["messages"][-1]["content"]
        return tok(user, text_target=answer, truncation=True, max_length=max_length)

    ds = load_sft_dataset()
    return ds.map(encode, remove_columns=ds.column_names)


def main(argv=None):
    args = parse_args(argv)
    model, tok = model_and_tokenizer(args)
    if not args.stock:
        hf_fusedce.patch(model)
    targs = Seq2SeqTrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, logging_steps=1,
                                     per_device_train_batch_size=args.per_device_train_batch_size, seed=args.seed,
                                     learning_rate=args.learning_rate, report_to="none", save_strategy="no",
                                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                                     disable_tqdm=True)
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=pairs_dataset(tok, args.max_length),
                             data_collator=DataCollatorForSeq2Seq(tok, model=model))
    callback = FusedCEMemoryCallback().attach(trainer)
    out = trainer.train()
    result = {"train_loss": out.training_loss, "patched": hf_fusedce.is_patched(model),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "memory": callback.summary}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result[k] for k in ("train_loss", "patched", "losses")}))
    return result


if __name__ == "__main__":
    main()
