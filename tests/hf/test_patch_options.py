"""`patch(model, dw_accumulation=...)` reaches the op's chunk loop, and a bad value fails at patch time."""
from __future__ import annotations

import pytest
import torch

import hf_fusedce
from hf_fusedce.ops.ce import autograd


@pytest.mark.parametrize("policy", ["auto", "fp32", "native"])
def test_dw_accumulation_reaches_the_chunk_loop(monkeypatch, tiny_llama, tiny_batch, policy):
    seen = []
    real = autograd.dw_accumulator_dtype

    def spy(weight_dtype, n_chunks, policy="auto"):
        seen.append((weight_dtype, n_chunks, policy))
        return real(weight_dtype, n_chunks, policy)

    monkeypatch.setattr(autograd, "dw_accumulator_dtype", spy)
    model = tiny_llama(vocab_size=97).to(torch.bfloat16)
    # 2 rows of 97 bf16 logits per chunk: 8 chunks for the 15 scored tokens, more than MAX_CHUNKS_NATIVE_DW
    hf_fusedce.patch(model, chunk_budget_bytes=2 * 97 * 2, dw_accumulation=policy)
    ids, labels = tiny_batch(vocab_size=97)
    with pytest.warns(UserWarning, match="below"):  # the tiny budget's slowness warning
        model(input_ids=ids, labels=labels).loss.backward()
    assert seen == [(torch.bfloat16, 8, policy)]
    want = {"native": torch.bfloat16}.get(policy, torch.float32)
    assert real(*seen[0]) == want and model.lm_head.weight.grad.dtype == torch.bfloat16


def test_bad_dw_accumulation_fails_at_patch_time(tiny_llama):
    with pytest.raises(ValueError, match="dw_accumulation must be one of"):
        hf_fusedce.patch(tiny_llama(), dw_accumulation="bf16")
