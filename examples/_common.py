"""Boilerplate shared by the example scripts: model/tokenizer loading and writing `<output_dir>/result.json`.

The scripts import it as `from _common import ...` (their own directory is on sys.path when run as
`python examples/x.py` or through `accelerate launch`; they also put it there themselves for in-process imports).
"""
from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def load_model_and_tokenizer(args, max_position, from_scratch=False, pad_to_eos=True):
    """`args.model_name_or_path` (bf16 with `args.bf16`), else the tiny offline demo Llama with the shipped tokenizer.

    max_position: the demo model's max_position_embeddings. from_scratch: build the hub model from its config only
    (random weights). pad_to_eos: give a hub tokenizer without a pad token `pad_token = eos_token`.
    """
    if args.model_name_or_path:
        tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
        if pad_to_eos and tok.pad_token is None:
            tok.pad_token = tok.eos_token
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        if from_scratch:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_name_or_path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
        return model, tok
    from hf_fusedce.demo import build_tiny_llama, load_demo_tokenizer

    tok = load_demo_tokenizer()
    model = build_tiny_llama(seed=args.seed, vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=128, max_position=max_position)
    return model, tok


def write_result(trainer, train_output, output_dir, **extra):
    """On the main process: write and print {train_loss, losses, **extra, head_saved_mib} as result.json."""
    if not trainer.is_world_process_zero():
        return None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"train_loss": train_output.training_loss, "losses": losses, **extra,
              "head_saved_mib": trainer.fusedce_summary["loss_head_probe"].get("saved_mib")}
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return result
