"""Offline distillation: a teacher's top-k next-token (ids, log-probs) computed once and stored as a `datasets`
dataset, then turned into sparse soft targets for the CE op (`target_probs`): no teacher at training time.

Truncation: the k kept log-probs (at the cache's temperature) are renormalized over the k ids, tau_i =
softmax(logprob)_i, so each token's target is a distribution. CE(tau, p_s) = KL(tau || p_s) + H(tau): the loss differs
from a KL by a constant per token and its gradient is the forward KL's (beta=0) towards the truncated teacher.
`truncation_effect` measures how far that is from full distillation on given hidden states.

The cache is written shard by shard (parquet, atomically renamed); a rerun skips the shards already written, so an
interrupted build resumes where it stopped.
"""
from __future__ import annotations

import json
import os

import torch

from .ops import fused_linear_cross_entropy, fused_linear_distillation

META_NAME = "topk_cache.json"


def _shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"shard-{index:05d}.parquet")


@torch.no_grad()
def teacher_topk(teacher, input_ids, attention_mask=None, *, k: int = 32, temperature: float = 1.0):
    """(ids int32, log-probs float32), each (B, S, k): the teacher's top-k next-token log-probs at every position,
    from its stock forward (any head quirk applied), at `temperature`."""
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids.to(torch.int32), values


def build_topk_cache(teacher, dataset, out_dir: str, *, k: int = 32, temperature: float = 1.0, batch_size: int = 8,
                     shard_size: int = 256, pad_token_id: int = 0, progress: bool = True):
    """Write `dataset` (rows with `input_ids`, optionally `labels`) plus the teacher's `topk_ids` / `topk_logprobs`
    per position into `out_dir`; resumable. Returns the cache as a `datasets.Dataset` (see `load_topk_cache`)."""
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    meta = {"k": k, "temperature": temperature, "rows": len(dataset), "shard_size": shard_size}
    _check_meta(out_dir, meta)
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    n_shards = -(-len(dataset) // shard_size)
    bar = tqdm(total=len(dataset), desc="teacher top-k", unit="seq", disable=not progress)
    try:
        for shard in range(n_shards):
            rows = dataset.select(range(shard * shard_size, min((shard + 1) * shard_size, len(dataset))))
            if not os.path.exists(_shard_path(out_dir, shard)):
                _write_shard(teacher, rows, _shard_path(out_dir, shard), k, temperature, batch_size, pad_token_id,
                             device)
            bar.update(len(rows))
    finally:
        bar.close()
        teacher.train(was_training)
    return load_topk_cache(out_dir)


def _check_meta(out_dir, meta):
    path = os.path.join(out_dir, META_NAME)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != meta:
            raise ValueError(f"{out_dir} holds a top-k cache built with {old}, not {meta}: resume with the same "
                             "settings, or use another directory")
    else:
        with open(path, "w") as f:
            json.dump(meta, f)


def _write_shard(teacher, rows, path, k, temperature, batch_size, pad_token_id, device):
    import datasets

    out = {"input_ids": [], "topk_ids": [], "topk_logprobs": []}
    has_labels = "labels" in rows.column_names
    if has_labels:
        out["labels"] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        lengths = [len(x) for x in batch["input_ids"]]
        ids = torch.full((len(lengths), max(lengths)), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(batch["input_ids"]):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        top_ids, top_lp = teacher_topk(teacher, ids.to(device), mask.to(device), k=k, temperature=temperature)
        for i, n in enumerate(lengths):
            out["input_ids"].append(batch["input_ids"][i])
            out["topk_ids"].append(top_ids[i, :n].tolist())
            out["topk_logprobs"].append(top_lp[i, :n].cpu().tolist())
            if has_labels:
                out["labels"].append(batch["labels"][i])
    tmp = path + ".tmp"
    datasets.Dataset.from_dict(out).to_parquet(tmp)
    os.replace(tmp, path)  # a shard exists only once complete: the resume test


def load_topk_cache(out_dir: str):
    """The cache as one `datasets.Dataset` (columns input_ids, topk_ids, topk_logprobs[, labels])."""
    import datasets

    with open(os.path.join(out_dir, META_NAME)) as f:
        meta = json.load(f)
    files = [_shard_path(out_dir, i) for i in range(-(-meta["rows"] // meta["shard_size"]))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} shard(s) missing ({missing[0]} ...): rerun build_topk_cache "
                         "with the same settings to finish it")
    return datasets.load_dataset("parquet", data_files=files, split="train")


def soft_targets(topk_ids, topk_logprobs, labels=None, ignore_index: int = -100):
    """(targets (..., k) int64, target_probs (..., k) float32) for the CE op: the top-k renormalized over k.
    labels (optional, unshifted like HF's): a position counts only if the next token is trained, and the last one
    never does (it predicts nothing in the sequence)."""
    probs = torch.softmax(topk_logprobs.float(), dim=-1)
    targets = topk_ids.long()
    if labels is not None:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[..., :-1] = labels[..., 1:] != ignore_index
        targets = torch.where(keep[..., None], targets, ignore_index)
    return targets, probs


def topk_distillation_loss(hidden, weight, topk_ids, topk_logprobs, labels=None, *, temperature: float = 1.0,
                           bias=None, **op_kwargs):
    """The student's loss on cached top-k targets: CE(tau, softmax(z_s / T)) through the fused CE op
    (`logit_scale = 1/T`), tau the renormalized top-k. Equals KL(tau || p_s) + H(tau) per token."""
    targets, probs = soft_targets(topk_ids, topk_logprobs, labels)
    return fused_linear_cross_entropy(hidden, weight, targets, target_probs=probs, bias=bias,
                                      logit_scale=1.0 / temperature, **op_kwargs)


def truncation_effect(student_hidden, student_weight, teacher_hidden, teacher_weight, ks=(8, 32, 128), *,
                      temperature: float = 1.0) -> list[dict]:
    """For each k: the top-k loss minus the targets' entropy (a KL to the truncated teacher) vs the full forward KL
    (fused_linear_distillation, beta=0), and the relative error / cosine of the student-hidden gradient."""
    h = student_hidden.detach().requires_grad_()
    full = fused_linear_distillation(h, student_weight.detach(), teacher_hidden.detach(), teacher_weight.detach(),
                                     beta=0.0, temperature=temperature)
    (g_full,) = torch.autograd.grad(full, h)
    with torch.no_grad():
        logp = torch.log_softmax((teacher_hidden @ teacher_weight.t()).float() / temperature, -1)
    report = []
    for k in ks:
        values, ids = logp.topk(k, dim=-1)
        tau = torch.softmax(values, -1)
        entropy = -(tau * tau.log()).sum(-1).mean()
        loss = topk_distillation_loss(h, student_weight.detach(), ids, values, temperature=temperature)
        (g_k,) = torch.autograd.grad(loss, h)
        report.append({
            "k": k, "teacher_mass_kept": float(values.exp().sum(-1).mean()),
            "kl_full": float(full.detach()), "kl_topk": float(loss.detach() - entropy),
            "grad_rel_err": float((g_k - g_full).norm() / g_full.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g_k.flatten(), g_full.flatten(), dim=0)),
        })
    return report
