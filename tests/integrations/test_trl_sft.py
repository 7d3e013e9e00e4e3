"""SFTTrainer on hf_fusedce's head (patch before or after the trainer) against the same trainer on TRL's own
head: same losses and logged metrics (fp32, 1e-5), our op ran, and no training step created a tensor of
tokens x vocabulary elements (TRL's CPU path and its label smoothing do, which the tracker sees)."""
from __future__ import annotations

import pytest

pytest.importorskip("trl")

import hf_fusedce  # noqa: E402

from integration_helpers import StepTracker, assert_same_metrics, logged, tiny_llama  # noqa: E402

BUDGET = 64 * 1024  # bytes of logits per chunk: a few rows, far below a step's tokens x vocabulary
METRICS = ("loss", "entropy", "mean_token_accuracy", "grad_norm")


def _dataset(records, kind):
    from datasets import Dataset
    if kind == "prompt_completion":
        rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records]
    else:
        rows = [{"messages": r["messages"]} for r in records]
    return Dataset.from_list(rows)


CONFIGS = {
    "plain": ({}, "messages"),
    "completion_only_loss": ({"completion_only_loss": True}, "prompt_completion"),
    "assistant_only_loss": ({"assistant_only_loss": True}, "messages"),
    "packing_padding_free": ({"packing": True}, "messages"),  # bfd packing: padding-free, position_ids
    "grad_accumulation_2": ({"gradient_accumulation_steps": 2}, "messages"),
    "label_smoothing": ({"label_smoothing_factor": 0.1}, "messages"),
    "lora_attention": ({}, "messages"),
}


def _train(tokenizer, records, name, tmp_path, patch_when):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    extra, kind = CONFIGS[name]
    model = tiny_llama(tokenizer)
    if patch_when == "before":
        hf_fusedce.patch(model, chunk_budget_bytes=BUDGET)
    args = SFTConfig(output_dir=str(tmp_path / f"{name}-{patch_when}"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     max_length=48, seed=0, dataset_num_proc=None, disable_tqdm=True, bf16=False,  # TRL defaults to bf16
                     **extra)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if name == "lora_attention" else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(records, kind), processing_class=tokenizer,
                         peft_config=peft_config)
    if patch_when == "after":
        hf_fusedce.patch(trainer.model, chunk_budget_bytes=BUDGET)
    tracker = StepTracker(trainer, len(tokenizer))
    trainer.train()
    return trainer, tracker


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sft_matches_trl_head(tokenizer, records, tmp_path, op_spy, name):
    stock, stock_steps = _train(tokenizer, records, name, tmp_path, patch_when=None)
    assert op_spy.calls == 0
    ours, our_steps = _train(tokenizer, records, name, tmp_path, patch_when="before")
    assert hf_fusedce.is_patched(ours.model)
    assert op_spy.calls >= 2, "hf_fusedce's per-token op did not run"
    _same_logs(ours, stock)
    assert our_steps.ratio < 0.5, f"a training step allocated {our_steps.ratio:.2f} x tokens x vocab"
    assert stock_steps.ratio > 0.9  # TRL's full-vocabulary tiles on CPU: every scored token's logits at once


def test_sft_patch_after_trainer(tokenizer, records, tmp_path, op_spy):
    stock, _ = _train(tokenizer, records, "plain", tmp_path, patch_when=None)
    ours, steps = _train(tokenizer, records, "plain", tmp_path, patch_when="after")
    assert op_spy.calls >= 2 and hf_fusedce.is_patched(ours.model)
    _same_logs(ours, stock)
    assert steps.ratio < 0.5


def _same_logs(ours, stock):
    assert_same_metrics(logged(ours, METRICS), logged(stock, METRICS), rtol=1e-5)
