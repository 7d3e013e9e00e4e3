"""DPOTrainer, KTOTrainer, GRPOTrainer and RLOOTrainer on hf_fusedce's head against the same trainers on TRL's own head:
same logged metrics (fp32, within 1e-5), our op ran (policy and
reference model), no training step created a tokens x vocabulary tensor."""
from __future__ import annotations

import pytest

pytest.importorskip("trl")

import hf_fusedce  # noqa: E402
from integration_helpers import StepTracker, assert_same_metrics, tiny_llama  # noqa: E402

BUDGET = 16 * 1024  # a few rows of logits per chunk
SKIP = {"learning_rate", "epoch", "num_tokens", "step_time", "total_flos", "train_runtime",
        "train_samples_per_second", "train_steps_per_second", "train_loss"}


def _pairs(records):
    from datasets import Dataset
    rows = []
    for i, r in enumerate(records[:12]):
        other = records[(i + 7) % len(records)]
        rows.append({"prompt": r["messages"][0]["content"], "chosen": " " + r["messages"][1]["content"],
                     "rejected": " " + other["messages"][1]["content"]})
    return Dataset.from_list(rows)


def _unpaired(records):
    from datasets import Dataset
    rows = [{"prompt": r["messages"][0]["content"], "completion": " " + r["messages"][1]["content"],
             "label": i % 2 == 0} for i, r in enumerate(records[:12])]
    return Dataset.from_list(rows)


def _logs(trainer):
    rows = [h for h in trainer.state.log_history if "loss" in h]
    keys = sorted({k for r in rows for k in r} - SKIP)
    return {k: [r[k] for r in rows if k in r] for k in keys}


def _compare(ours, stock):
    mine, theirs = _logs(ours), _logs(stock)
    assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    assert_same_metrics(mine, theirs, rtol=1e-5)


def _run(make, tokenizer, patch, **track):
    model, ref = tiny_llama(tokenizer), tiny_llama(tokenizer)  # the same weights (seeded)
    if patch:
        for m in (model, ref):
            hf_fusedce.patch(m, chunk_budget_bytes=BUDGET)
    trainer = make(model, ref)
    tracker = StepTracker(trainer, len(tokenizer), **track)
    trainer.train()
    return trainer, tracker


def _common(tmp_path, name):
    return dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                bf16=False)  # TRL's configs default to bf16 (CPU autocast): compare in fp32


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_preference_trainer_matches_trl_head(tokenizer, records, tmp_path, op_spy, name):
    import trl
    config_cls, trainer_cls = (trl.DPOConfig, trl.DPOTrainer) if name == "dpo" else (trl.KTOConfig, trl.KTOTrainer)
    data = _pairs(records) if name == "dpo" else _unpaired(records)

    def make(model, ref):
        args = config_cls(max_length=64, **_common(tmp_path, name))
        return trainer_cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)

    stock, _ = _run(make, tokenizer, patch=False)
    ours, steps = _run(make, tokenizer, patch=True)
    assert hf_fusedce.is_patched(ours.model) and hf_fusedce.is_patched(ours.ref_model)
    assert op_spy.calls >= 4  # policy and reference, each step
    _compare(ours, stock)
    assert steps.ratio < 0.5


def _length_reward(completions, **kwargs):
    return [float(len(c)) / 10.0 for c in completions]


def test_grpo_matches_trl_head(tokenizer, records, tmp_path, op_spy):
    """Generation (sampled, seeded), a reward function, temperature 0.7 (TRL's head divides by it), entropy."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_list([{"prompt": r["messages"][0]["content"]} for r in records[:8]])

    def make(model, ref):  # beta=0: no reference model
        args = GRPOConfig(num_generations=2, max_completion_length=24, temperature=0.7, beta=0.0,
                          **_common(tmp_path, "grpo"))
        return GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=prompts,
                           processing_class=tokenizer)

    # generation (stock: one row of vocabulary logits per sequence and new token) happens in the training step;
    # the tracker watches the loss, whose forward and backward run through the head
    track = dict(tokens=lambda inputs: inputs["completion_ids"].numel(), method="compute_loss")
    stock, _ = _run(make, tokenizer, patch=False, **track)
    ours, steps = _run(make, tokenizer, patch=True, **track)
    assert hf_fusedce.is_patched(ours.model)
    assert op_spy.calls >= 2
    _compare(ours, stock)
    assert steps.ratio < 0.5


def test_rloo_matches_trl_head(tokenizer, records, tmp_path, op_spy):
    """RLOO with its default KL term (beta=0.05). RLOO loads its reference model from the policy's path, so both
    come from a saved checkpoint, fused through the class-level `hf_fusedce.patch()` called before the trainer."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    prompts = Dataset.from_list([{"prompt": r["messages"][0]["content"]} for r in records[:8]])
    checkpoint = tmp_path / "policy"
    tiny_llama(tokenizer).save_pretrained(checkpoint)

    def run(name):
        args = RLOOConfig(num_generations=2, max_completion_length=24, temperature=0.7, **_common(tmp_path, name))
        trainer = RLOOTrainer(model=str(checkpoint), reward_funcs=_length_reward, args=args, train_dataset=prompts,
                              processing_class=tokenizer)
        tracker = StepTracker(trainer, len(tokenizer), tokens=lambda inputs: inputs["completion_ids"].numel(),
                              method="compute_loss")
        trainer.train()
        return trainer, tracker

    stock, _ = run("stock")
    assert not hf_fusedce.is_patched(stock.model)
    hf_fusedce.patch(chunk_budget_bytes=BUDGET)
    try:
        ours, steps = run("ours")
        assert ours.args.beta > 0 and ours.ref_model is not None
        assert hf_fusedce.is_patched(ours.model) and hf_fusedce.is_patched(ours.ref_model)
    finally:
        hf_fusedce.unpatch()
    assert op_spy.calls >= 4  # policy and reference
    _compare(ours, stock)
    assert steps.ratio < 0.5


def test_grpo_cast_lm_head_to_fp32_matches_trl_head(tokenizer, records, tmp_path, op_spy):
    """A bf16 policy with GRPO's `cast_lm_head_to_fp32=True` (TRL makes the head float32 and feeds it float32
    hidden states): our head computes in float32 too; metrics agree with TRL's head on the same bf16 model."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_list([{"prompt": r["messages"][0]["content"]} for r in records[:8]])

    def make(model, ref):
        model.to(torch.bfloat16)
        args = GRPOConfig(num_generations=2, max_completion_length=24, temperature=0.7, beta=0.0,
                          cast_lm_head_to_fp32=True, **_common(tmp_path, "grpo-fp32-head"))
        return GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=prompts,
                           processing_class=tokenizer)

    track = dict(tokens=lambda inputs: inputs["completion_ids"].numel(), method="compute_loss")
    stock, _ = _run(make, tokenizer, patch=False, **track)
    ours, steps = _run(make, tokenizer, patch=True, **track)
    assert ours.model.lm_head.weight.dtype == torch.float32 and ours.model.model.norm.weight.dtype == torch.bfloat16
    assert op_spy.calls >= 2
    _compare(ours, stock)
    assert steps.ratio < 0.5
