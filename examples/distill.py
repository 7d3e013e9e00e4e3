"""Distillation with the fused head, both ways, on CPU in about a minute (tiny Llamas from configs, the shipped 32k
tokenizer and SFT data; the teacher is random but sharper than the student, which is enough to watch the student
move towards it):

    python examples/distill.py

* online:  teacher hidden states from a frozen teacher forward (no_grad), the student's through
           `hf_fusedce.fused_linear_distillation` (generalized JSD, `--beta`, `--temperature`, `--hard_label_weight`);
           neither model's [tokens x vocab] logits exist. (TRL's DistillationTrainer does the same for a student
           patched with `hf_fusedce.patch`.)
* offline: the teacher's top-k log-probs stored once with `hf_fusedce.teacher_cache.build_topk_cache` (a `datasets`
           dataset; `hf-fusedce distill-cache` from the shell), then a fresh student trains on those sparse targets
           through the CE op's `target_probs`: no teacher at training time.

Both students start from the same weights and see the same batches; result.json holds their loss curves, the full
KL(teacher || student) of each on held-out batches, and the top-k truncation effect measured on one batch.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from hf_fusedce import fused_linear_distillation
from hf_fusedce.demo import build_tiny_llama, load_demo_tokenizer
from hf_fusedce.demo.data import load_sft_dataset, tokenize_chat
from hf_fusedce.teacher_cache import build_topk_cache, topk_distillation_loss, truncation_effect


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="out/distill")
    p.add_argument("--mode", choices=("both", "online", "offline"), default="both")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--max_train_samples", type=int, default=160)
    p.add_argument("--eval_batches", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.0, help="online: 0 KL(t||s), 1 KL(s||t), between: JSD")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hard_label_weight", type=float, default=0.0, help="online: + this x CE on the data's labels")
    p.add_argument("--top_k", type=int, default=32, help="offline: teacher log-probs kept per token")
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_data(args, tok):
    records = load_sft_dataset()
    n = min(args.max_train_samples + args.eval_batches * args.batch_size, len(records))
    data = records.select(range(n)).map(tokenize_chat, fn_kwargs={"tokenizer": tok, "max_length": args.max_length},
                                        remove_columns=records.column_names)
    return data.select_columns(["input_ids", "labels"])


def collate(rows, pad_id):
    """Right-padded input_ids, attention mask, and next-token targets aligned with every position (-100: untrained)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    batch = {"input_ids": ids, "attention_mask": (ids != pad_id) | (labels != -100), "labels": labels,
             "targets": targets}
    for key in ("topk_ids", "topk_logprobs"):
        if key in rows[0]:
            k = len(rows[0][key][0])
            out = torch.zeros(len(rows), width, k, dtype=torch.long if key == "topk_ids" else torch.float32)
            for i, r in enumerate(rows):
                out[i, :len(r[key])] = torch.tensor(r[key])
            batch[key] = out
    return batch


def batches(data, args, pad_id, start=0, count=None):
    count = count if count is not None else len(data) // args.batch_size
    for b in range(start, start + count):
        yield collate([data[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)], pad_id)


def hidden(model, batch):
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def online_loss(student, teacher, batch, args):
    with torch.no_grad():
        t_hidden = hidden(teacher, batch)
    return fused_linear_distillation(hidden(student, batch), student.lm_head.weight, t_hidden,
                                     teacher.lm_head.weight.detach(), batch["targets"], beta=args.beta,
                                     temperature=args.temperature, hard_label_weight=args.hard_label_weight)


def offline_loss(student, batch, args):
    topk_ids = torch.where(batch["targets"][..., None] == -100, -100, batch["topk_ids"])  # untrained positions
    return topk_distillation_loss(hidden(student, batch), student.lm_head.weight, topk_ids, batch["topk_logprobs"],
                                  temperature=args.temperature)


def train(student, loss_fn, data, args, pad_id):
    opt = torch.optim.AdamW(student.parameters(), lr=args.learning_rate)
    losses, steps = [], 0
    while steps < args.max_steps:
        for batch in batches(data, args, pad_id):
            loss = loss_fn(student, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 5))
            steps += 1
            if steps == args.max_steps:
                break
    return losses


@torch.no_grad()
def eval_kl(student, teacher, eval_data, args, pad_id):
    """Full forward KL(teacher || student) at the temperature on held-out batches (trained positions only)."""
    kls = [fused_linear_distillation(hidden(student, b), student.lm_head.weight, hidden(teacher, b),
                                     teacher.lm_head.weight, b["targets"], temperature=args.temperature).item()
           for b in batches(eval_data, args, pad_id)]
    return sum(kls) / len(kls)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    tok = load_demo_tokenizer()
    pad_id = tok.pad_token_id
    shape = dict(vocab_size=len(tok), num_heads=4, num_kv_heads=2, max_position=256)
    teacher = build_tiny_llama(seed=args.seed + 1, hidden_size=96, num_layers=2, intermediate_size=192, **shape)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)  # a peaked teacher: random init alone is nearly uniform over 32k tokens
    teacher.requires_grad_(False).eval()
    new_student = lambda: build_tiny_llama(seed=args.seed, hidden_size=64, num_layers=2, intermediate_size=128,  # noqa: E731
                                           **shape)
    data = load_data(args, tok)
    n_eval = args.eval_batches * args.batch_size
    train_data, eval_data = data.select(range(len(data) - n_eval)), data.select(range(len(data) - n_eval, len(data)))
    result = {"args": vars(args), "kl_before": eval_kl(new_student(), teacher, eval_data, args, pad_id)}

    if args.mode in ("both", "online"):
        t0, student = time.perf_counter(), new_student()
        result["online_losses"] = train(student, lambda s, b: online_loss(s, teacher, b, args), train_data, args,
                                        pad_id)
        result["online_seconds"] = round(time.perf_counter() - t0, 2)
        result["online_kl_after"] = eval_kl(student, teacher, eval_data, args, pad_id)

    if args.mode in ("both", "offline"):
        t0 = time.perf_counter()
        cache = build_topk_cache(teacher, train_data, os.path.join(args.output_dir, f"topk{args.top_k}"),
                                 k=args.top_k, temperature=args.temperature, batch_size=args.batch_size,
                                 pad_token_id=pad_id)
        result["cache_seconds"] = round(time.perf_counter() - t0, 2)
        t0, student = time.perf_counter(), new_student()
        result["offline_losses"] = train(student, lambda s, b: offline_loss(s, b, args), cache, args, pad_id)
        result["offline_seconds"] = round(time.perf_counter() - t0, 2)
        result["offline_kl_after"] = eval_kl(student, teacher, eval_data, args, pad_id)
        batch = next(batches(eval_data, args, pad_id, count=1))
        keep = batch["targets"] != -100
        with torch.no_grad():
            s_h, t_h = new_student().model(batch["input_ids"]).last_hidden_state, hidden(teacher, batch)
        result["truncation_effect"] = truncation_effect(
            s_h[keep], new_student().lm_head.weight, t_h[keep], teacher.lm_head.weight,
            ks=sorted({8, args.top_k, 128}), temperature=args.temperature)

    with open(os.path.join(args.output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("losses")}, indent=1))
    return result


if __name__ == "__main__":
    main()
