"""Masked-LM training (BERT / RoBERTa / XLM-R / ModernBERT...) with the fused loss head: `transformers.Trainer` +
`DataCollatorForLanguageModeling(mlm_probability=0.15)`. About 85% of the positions are ignored: the fused head
drops them before its GEMMs, stock computes and stores logits for all of them.

Tiny and offline by default (a 2-layer XLM-RoBERTa-shaped model with the shipped tokenizer, the shipped texts):

    python examples/masked_lm.py            # fused
    python examples/masked_lm.py --stock    # stock head, same data and masks: same losses

Real use: `--model_name_or_path FacebookAI/xlm-roberta-base` (AutoModelForMaskedLM; its tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import (AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments, XLMRobertaConfig, XLMRobertaForMaskedLM)

import hf_fusedce
from hf_fusedce.callback import FusedCEMemoryCallback


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="hub id or local dir; default: a tiny random XLM-R")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--mlm_probability", type=float, default=0.15)
    p.add_argument("--output_dir", default="out/masked_lm")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stock", action="store_true", help="stock loss head (same logging), for comparison")
    return p.parse_args(argv)


def model_and_tokenizer(args):
    if args.model_name_or_path:
        return (AutoModelForMaskedLM.from_pretrained(args.model_name_or_path),
                AutoTokenizer.from_pretrained(args.model_name_or_path))
    from hf_fusedce.demo import load_demo_tokenizer
    tok = load_demo_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})  # the shipped causal-LM tokenizer has none
    torch.manual_seed(args.seed)
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=args.max_length + 2,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
    return XLMRobertaForMaskedLM(config), tok


def texts_dataset(tok, max_length):
    from hf_fusedce.demo.data import chat_to_text, load_sft_dataset
    ds = load_sft_dataset().map(chat_to_text)
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=ds.column_names)


def main(argv=None):
    args = parse_args(argv)
    model, tok = model_and_tokenizer(args)
    if not args.stock:
        hf_fusedce.patch(model)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=args.mlm_probability, seed=args.seed)
    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, logging_steps=1,
                              per_device_train_batch_size=args.per_device_train_batch_size, seed=args.seed,
                              learning_rate=args.learning_rate, report_to="none", save_strategy="no",
                              use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=texts_dataset(tok, args.max_length),
                      data_collator=collator)
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
