"""Liger Kernel composed with hf_fusedce, in either order: Liger's layer kernels stay (RoPE here: the one that
runs on CPU under the Triton interpreter), its fused linear cross-entropy forward is taken off, hf_fusedce's
head computes the loss, one info line. FusedCETrainer(use_liger_kernel=True) composes instead of refusing."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("liger_kernel")

import hf_fusedce  # noqa: E402
from integration_helpers import tiny_llama  # noqa: E402

ROPE_ONLY = dict(rope=True, rms_norm=False, swiglu=False)  # rms_norm / swiglu fail in the interpreter anyway


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return 300


@pytest.fixture(autouse=True)
def ce_calls(monkeypatch):
    """Counts calls of hf_fusedce's loss op made by the patched forward."""
    import hf_fusedce.hf.forward as fwd
    calls, real = [], fwd.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fwd, "fused_linear_cross_entropy", spy)
    _CALLS["list"] = calls
    return calls


_CALLS = {}


@pytest.fixture
def llama_rope_restored():
    """Liger swaps module-level functions of modeling_llama: put the stock ones back after the test."""
    from transformers.models.llama import modeling_llama
    saved = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward
    yield modeling_llama
    modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward = saved


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def _stock_loss():
    model = tiny_llama(_Tok())
    ids, labels = _batch()
    return model(input_ids=ids, labels=labels).loss


def _check_composed(model, modeling_llama):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    assert hf_fusedce.is_patched(model)
    assert modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb  # Liger's layer kernel kept
    ids, labels = _batch()
    before = len(_CALLS["list"])
    loss = model(input_ids=ids, labels=labels).loss
    assert len(_CALLS["list"]) == before + 1  # hf_fusedce's head computed it
    return loss


def test_liger_after_patch(llama_rope_restored, caplog):
    import liger_kernel.transformers as lt
    stock = _stock_loss()
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    with caplog.at_level(logging.INFO, logger="hf_fusedce"):
        lt.apply_liger_kernel_to_llama(model=model, **ROPE_ONLY)  # fused_linear_cross_entropy defaults to True
    assert any("Liger Kernel composed" in r.message for r in caplog.records)
    loss = _check_composed(model, llama_rope_restored)
    assert abs(loss.item() - stock.item()) < 1e-5


def test_liger_before_patch(llama_rope_restored):
    import liger_kernel.transformers as lt
    stock = _stock_loss()
    model = tiny_llama(_Tok())
    lt.apply_liger_kernel_to_llama(model=model, **ROPE_ONLY)
    assert model.__dict__["forward"].__func__.__module__.startswith("liger_kernel")
    hf_fusedce.patch(model)
    loss = _check_composed(model, llama_rope_restored)
    assert abs(loss.item() - stock.item()) < 1e-5


def test_displaced_forward_warns_once_and_is_patched_tells(llama_rope_restored):
    """A Liger function bound before hf_fusedce could wrap it (here: the unwrapped original) replaces the
    forward: is_patched is False and the first training forward says who took over."""
    import liger_kernel.transformers.monkey_patch as mp
    original = getattr(mp.apply_liger_kernel_to_llama, "__wrapped__", mp.apply_liger_kernel_to_llama)
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    original(model=model, **ROPE_ONLY)
    assert not hf_fusedce.is_patched(model)
    ids, labels = _batch()
    with pytest.warns(UserWarning, match="replaced by Liger Kernel"):
        model(input_ids=ids, labels=labels)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=labels)  # once
    hf_fusedce.patch(model)  # puts the head back
    _check_composed(model, llama_rope_restored)


def test_fused_ce_trainer_composes_with_use_liger_kernel(llama_rope_restored, tmp_path):
    from transformers import TrainingArguments

    from hf_fusedce import FusedCETrainer
    ids, labels = _batch()
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, use_liger_kernel=True,
                             liger_kernel_config=ROPE_ONLY, remove_unused_columns=False)
    trainer = FusedCETrainer(model=tiny_llama(_Tok()), args=args, train_dataset=rows,
                             data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    trainer.train()  # Trainer applies Liger here
    _check_composed(trainer.model, llama_rope_restored)
