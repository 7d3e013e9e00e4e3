"""Offline distillation: the teacher's top-k cache (built with datasets, resumable) and the student's loss on it."""
from __future__ import annotations

import os

import pytest
import torch

from hf_fusedce import fused_linear_distillation
from hf_fusedce.teacher_cache import (build_topk_cache, soft_targets, teacher_topk, topk_distillation_loss,
                                      truncation_effect)
from hf_fusedce.testing import rel_err, tiny_llama

V = 97


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(V, seed=1, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def _dataset(n=10):
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (5 + i % 4,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return datasets.Dataset.from_list(rows)


def test_cache_matches_teacher_and_resumes(tmp_path, teacher):
    data, out = _dataset(), str(tmp_path / "cache")
    cache = build_topk_cache(teacher, data, out, k=5, temperature=1.5, batch_size=3, shard_size=4, progress=False)
    assert len(cache) == len(data) and set(cache.column_names) == {"input_ids", "labels", "topk_ids", "topk_logprobs"}
    row = cache[7]
    ids, lp = teacher_topk(teacher, torch.tensor([row["input_ids"]]), k=5, temperature=1.5)
    assert row["input_ids"] == data[7]["input_ids"] and row["labels"] == data[7]["labels"]
    assert torch.equal(torch.tensor(row["topk_ids"]), ids[0].long())
    assert torch.allclose(torch.tensor(row["topk_logprobs"]), lp[0], atol=1e-6)  # padding in the batch: same numbers

    shard0, shard1 = (os.path.join(out, f"shard-{i:05d}.parquet") for i in (0, 1))
    before = os.stat(shard0).st_mtime_ns
    os.remove(shard1)  # an interrupted build: one shard never written
    again = build_topk_cache(teacher, data, out, k=5, temperature=1.5, batch_size=3, shard_size=4, progress=False)
    assert os.stat(shard0).st_mtime_ns == before, "a finished shard was recomputed"
    assert again[:] == cache[:]
    with pytest.raises(ValueError, match="same settings"):
        build_topk_cache(teacher, data, out, k=6, temperature=1.5, shard_size=4, progress=False)


def test_soft_targets_renormalize_and_mask_untrained_positions():
    lp = torch.log_softmax(torch.randn(2, 4, V), -1).topk(3, -1)
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    targets, probs = soft_targets(lp.indices, lp.values, labels)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4))
    kept = (targets != -100).all(-1)
    assert kept.tolist() == [[True, True, True, False], [False, True, False, False]]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_k_equals_full_distillation_plus_teacher_entropy(temperature):
    """k = V keeps the whole teacher: CE(p_t, p_s) = KL(p_t || p_s) + H(p_t), same gradient as beta=0."""
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(9, 16, generator=g, requires_grad=True), torch.randn(V, 16, generator=g) / 3
    ht, wt = torch.randn(9, 24, generator=g), torch.randn(V, 24, generator=g) / 2
    logp = torch.log_softmax(ht @ wt.t() / temperature, -1)
    values, ids = logp.topk(V, -1)
    topk = topk_distillation_loss(hs, ws, ids, values, temperature=temperature)
    full = fused_linear_distillation(hs, ws, ht, wt, beta=0.0, temperature=temperature)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    assert rel_err(topk - entropy, full) <= 1e-5
    g_topk, g_full = (torch.autograd.grad(x, hs)[0] for x in (topk, full))
    assert rel_err(g_topk, g_full) <= 1e-5
    report = truncation_effect(hs, ws, ht, wt, ks=(4, V), temperature=temperature)
    assert report[1]["grad_rel_err"] <= 1e-5 and report[0]["grad_rel_err"] > report[1]["grad_rel_err"]
    assert report[0]["teacher_mass_kept"] < report[1]["teacher_mass_kept"]


def test_cli_builds_and_resumes_a_cache(tmp_path):
    from hf_fusedce.cli.main import main
    from hf_fusedce.demo.model import build_tiny_llama

    teacher_dir, out = str(tmp_path / "teacher"), str(tmp_path / "cache")
    build_tiny_llama(seed=3, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=64).save_pretrained(teacher_dir)
    argv = ["distill-cache", "--teacher", teacher_dir, "--out", out, "--k", "4", "--max-samples", "5",
            "--max-length", "48", "--shard-size", "2", "--quiet"]
    assert main(argv) == 0
    os.remove(os.path.join(out, "shard-00001.parquet"))
    assert main(argv) == 0  # resumes: the missing shard is rebuilt
    from hf_fusedce.teacher_cache import load_topk_cache

    cache = load_topk_cache(out)
    assert len(cache) == 5 and all(len(r["topk_ids"]) == len(r["input_ids"]) for r in cache)
    assert all(len(t) == 4 for t in cache[0]["topk_ids"])
