"""TRL's SFTTrainer on hf_fusedce's head: `hf_fusedce.patch(model)` before (or after) building the trainer.

TRL installs its own fused LM head in every token-scoring trainer; with the patch active, its calls are served
by hf_fusedce's head (proven per family, see model_cards/trl_sweep/results.md), prompts masked by TRL
(prompt/completion records), and `label_smoothing_factor` runs fused too. Tiny and offline by default (a
2-layer Llama with the shipped 32k tokenizer, the shipped SFT JSONL), about a minute on a CPU:

    python examples/trl_sft.py

Real use: --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --bf16 --max_steps -1 --num_train_epochs 1.
The other TRL trainers work the same way, e.g. DPO:

    hf_fusedce.patch(model); DPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=pairs).train()
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_model_and_tokenizer  # noqa: E402  (same directory: shared boilerplate)

import hf_fusedce  # noqa: E402
from hf_fusedce.demo.data import load_sft_dataset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="hub id or local dir; default: a tiny random Llama")
    p.add_argument("--train_file", default=None, help="JSON/JSONL with a messages column (default: shipped demo data)")
    p.add_argument("--max_train_samples", type=int, default=256)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--output_dir", default="out/trl_sft")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--label_smoothing_factor", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--stock", action="store_true", help="TRL's own head, for comparison")
    return p.parse_args(argv)


def prompt_completion(example):
    """The last assistant turn is the completion (TRL masks the prompt)."""
    msgs = example["messages"]
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def main(argv=None):
    from trl import SFTConfig, SFTTrainer

    args = parse_args(argv)
    model, tok = load_model_and_tokenizer(args, max_position=max(args.max_length, 64))
    if not args.stock:
        hf_fusedce.patch(model)
    data = load_sft_dataset(args.train_file)
    if args.max_train_samples:
        data = data.select(range(min(args.max_train_samples, len(data))))
    data = data.map(prompt_completion, remove_columns=data.column_names)
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
                       per_device_train_batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate,
                       max_length=args.max_length, label_smoothing_factor=args.label_smoothing_factor,
                       logging_steps=1, seed=args.seed, bf16=args.bf16, report_to=[], save_strategy="no")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    trainer.train()
    print(f"hf_fusedce head: {hf_fusedce.is_patched(trainer.model)}; losses:",
          [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])
    return trainer


if __name__ == "__main__":
    main()
