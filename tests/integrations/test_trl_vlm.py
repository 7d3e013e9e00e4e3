"""TRL on vision-language models (tiny Qwen2-VL and LLaVA, image + text rows, processors built offline): TRL's
fused_lm_head protocol, SFTTrainer and one GRPO step on hf_fusedce's head against the same on TRL's own head:
same per-token outputs, gradients, logged metrics and updated parameters (vision tower included, fp32), the
images reached the vision tower, and no step created a tokens x vocabulary tensor."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("PIL")

import hf_fusedce  # noqa: E402
from hf_fusedce.hf.recorded import ProofOutdatedWarning  # noqa: E402
from hf_fusedce.testing import rel_err  # noqa: E402
from integration_helpers import StepTracker, assert_same_metrics, logged  # noqa: E402
from vlm_helpers import FAMILIES, image_batch, images, vision_records, vision_tower  # noqa: E402

BUDGET = 1 << 20  # bytes of logits per chunk: 8 rows of the 32k vocabulary, far below a step's tokens
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
HEAD = dict(temperature=0.7, outputs=FIELDS)
SFT_METRICS = ("loss", "entropy", "mean_token_accuracy", "grad_norm")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(processor, build(processor) -> a fresh seeded tiny model)."""
    make_processor, build = FAMILIES[request.param]
    return make_processor(), build


def _is_vision(name):
    return ".visual." in name or ".vision_tower." in name or ".multi_modal_projector." in name


def _patch(model):
    with warnings.catch_warnings():  # accepted by class, image inputs proven: no force, no warning
        warnings.simplefilter("error")
        # expected on the newest-release CI leg (tests/hf/test_fingerprint.py tests it)
        warnings.filterwarnings("ignore", category=ProofOutdatedWarning)
        return hf_fusedce.patch(model, chunk_budget_bytes=BUDGET)


class _VisionCalls:
    """Counts calls of the model's vision tower (the images reached the model)."""

    def __init__(self, model):
        self.calls = 0
        vision_tower(model).register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


# ---- the protocol, without a trainer ------------------------------------------------------------------------

def _outputs_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    weights = torch.linspace(-1, 1, out.log_probs.numel()).reshape(out.log_probs.shape)
    ((weights * out.log_probs).sum() + (0.3 * out.entropy).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trl_head(model):
    import trl.trainer.utils as tu
    getattr(tu.add_fused_lm_head, "__wrapped__", tu.add_fused_lm_head)(model, **HEAD)  # TRL's own head
    return model


@pytest.mark.parametrize("order", ["patch-then-trl", "trl-then-patch"])
def test_protocol_on_vlm_matches_trl_head(family, records, op_spy, order):
    import trl.trainer.utils as tu
    processor, build = family
    batch = image_batch(processor, records[:3])
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all()
    reference = _outputs_and_grads(_trl_head(build(processor)), batch)
    model = build(processor)
    if order == "patch-then-trl":
        _patch(model)
        tu.add_fused_lm_head(model, **HEAD)  # what every TRL trainer's __init__ calls
    else:
        _patch(_trl_head(model))  # finds TRL's head and reads its options
    assert hf_fusedce.is_patched(model)
    (o, og), (t, tg) = _outputs_and_grads(model, batch), reference
    assert op_spy.calls == 1
    for name in (*FIELDS, "label_mask", "loss"):
        a, b = getattr(o, name), getattr(t, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # Fixed: our head vs TRL's own head, both fused float32 heads on the same logits path; the anchored
        # version of this comparison is tests/integrations/test_trl_protocol.py (TRL's head on the float64 model).
        assert torch.equal(a, b) if a.dtype == torch.bool else rel_err(a, b) < 1e-5, name
    assert og.keys() == tg.keys() and any(_is_vision(n) for n in tg)
    floor = 1e-3 * max(g.abs().max() for g in tg.values())  # a gradient that is zero in exact arithmetic (the
    for name, g in tg.items():  # key bias under softmax) is rounding noise in both: compare it to a floor
        assert (og[name] - g).abs().max() <= 1e-5 * max(g.abs().max(), floor), name


# ---- SFTTrainer ---------------------------------------------------------------------------------------------

SFT_CONFIGS = {
    "plain": {},  # TRL's VLM collator trains on every non-pad token, image tokens included
    "assistant_only_loss": {"assistant_only_loss": True},  # image and prompt tokens ignored
    "prompt_completion": {},  # prompt / completion rows: TRL scores the completion only
}


def _sft(family, records, tmp_path, name, patch_when):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    processor, build = family
    model = build(processor)
    vision = _VisionCalls(model)
    if patch_when == "before":
        _patch(model)
    args = SFTConfig(output_dir=str(tmp_path / f"{name}-{patch_when}"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, max_length=None, seed=0, disable_tqdm=True, bf16=False, **SFT_CONFIGS[name])
    rows = vision_records(records[:8])
    if name == "prompt_completion":
        rows = [{"images": r["images"], "prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    if patch_when == "after":
        _patch(trainer.model)
    tracker = StepTracker(trainer, len(processor.tokenizer))
    trainer.train()
    assert vision.calls >= 2
    return trainer, tracker


def _same_updates(ours, stock, initial):
    """SGD updates equal per tensor, relative to a floor of 1e-3 of the largest update: a gradient that is zero in
    exact arithmetic (the key bias under softmax) is rounding noise in both runs (AdamW would blow it up to lr)."""
    start = dict(initial.named_parameters())
    mine = {n: (p - start[n]).detach() for n, p in ours.named_parameters()}
    theirs = {n: (p - start[n]).detach() for n, p in stock.named_parameters()}
    floor = 1e-3 * max(d.abs().max() for d in theirs.values())
    assert floor > 0 and any(_is_vision(n) and d.abs().max() > floor for n, d in theirs.items())
    for name, d in theirs.items():
        # Parameters after SGD steps: no float64 run of the trainer; the rounding of p - p0 is added explicitly.
        rounding = 4 * torch.finfo(d.dtype).eps * start[name].detach().abs().max()  # of p - p0, in float32
        assert (mine[name] - d).abs().max() <= 1e-5 * max(d.abs().max(), floor) + rounding, name


@pytest.mark.parametrize("family,name,patch_when", [
    ("qwen2_vl", "plain", "before"), ("qwen2_vl", "assistant_only_loss", "before"), ("qwen2_vl", "plain", "after"),
    ("qwen2_vl", "prompt_completion", "before"), ("llava", "assistant_only_loss", "before")], indirect=["family"])
def test_sft_on_vlm_matches_trl_head(family, records, tmp_path, op_spy, name, patch_when):
    stock, stock_steps = _sft(family, records, tmp_path, name, patch_when=None)
    assert op_spy.calls == 0
    ours, our_steps = _sft(family, records, tmp_path, name, patch_when=patch_when)
    assert hf_fusedce.is_patched(ours.model) and op_spy.calls >= 2
    assert_same_metrics(logged(ours, SFT_METRICS), logged(stock, SFT_METRICS), rtol=1e-5)
    _same_updates(ours.model, stock.model, family[1](family[0]))
    assert our_steps.ratio < 0.5, f"a training step allocated {our_steps.ratio:.2f} x tokens x vocab"
    assert stock_steps.ratio > 0.5  # TRL's CPU tiles: the scored tokens' logits at once


# ---- GRPO ---------------------------------------------------------------------------------------------------

def _reward(completions, **kwargs):
    return [len(c[-1]["content"] if isinstance(c, list) else c) / 10.0 for c in completions]


def _grpo(family, records, tmp_path, patch):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    processor, build = family
    rows = [{"prompt": [{"role": "user", "content": r["messages"][0]["content"]}], "image": p}
            for r, p in zip(records[:4], images(4))]
    model = build(processor)
    vision = _VisionCalls(model)
    if patch:
        _patch(model)
    args = GRPOConfig(output_dir=str(tmp_path / f"grpo-{patch}"), max_steps=1, per_device_train_batch_size=2,
                      learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[], save_strategy="no",
                      use_cpu=True, seed=0,
                      disable_tqdm=True, bf16=False, num_generations=2, max_completion_length=16, temperature=0.7,
                      beta=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processor)
    tracker = StepTracker(trainer, len(processor.tokenizer), tokens=lambda inputs: inputs["completion_ids"].numel(),
                          method="compute_loss")
    trainer.train()
    assert vision.calls >= 2  # generation and the loss
    return trainer, tracker


def test_grpo_step_on_vlm_matches_trl_head(family, records, tmp_path, op_spy):
    """One step: sampled (seeded) generation from image prompts, a reward function, temperature 0.7."""
    skip = {"learning_rate", "epoch", "step_time", "train_runtime", "train_samples_per_second",
            "train_steps_per_second", "total_flos", "train_loss"}

    def logs(trainer):
        rows = [h for h in trainer.state.log_history if "loss" in h]
        return {k: [r[k] for r in rows if k in r] for k in sorted({k for r in rows for k in r} - skip)}

    stock, _ = _grpo(family, records, tmp_path, patch=False)
    ours, steps = _grpo(family, records, tmp_path, patch=True)
    assert hf_fusedce.is_patched(ours.model) and op_spy.calls >= 1
    mine, theirs = logs(ours), logs(stock)
    assert set(mine) == set(theirs) and {"entropy", "grad_norm", "reward"} <= set(mine)
    assert_same_metrics(mine, theirs, rtol=1e-5)
    _same_updates(ours.model, stock.model, family[1](family[0]))
    assert steps.ratio < 0.5
