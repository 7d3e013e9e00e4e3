"""TRL's DistillationTrainer on the fused distillation op: the drop-in for `_chunked_divergence_loss` gives TRL's
numbers (loss, entropy sum, token count, gradients), the trainer uses it exactly when the student is patched, and
a real training step runs through it."""
from __future__ import annotations

import pytest
import torch

trl_distill = pytest.importorskip("trl.trainer.distillation_trainer")

import hf_fusedce  # noqa: E402
from hf_fusedce.integrations.trl import distillation as trl_distillation  # noqa: E402
from hf_fusedce.ops import reference_linear_distillation  # noqa: E402
from hf_fusedce.testing import accuracy_bound, rel_err  # noqa: E402


def _heads(seed=0, b=2, s=7, d=24, dt=40, v=97):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, d, generator=g), torch.randn(b, s, dt, generator=g), torch.randn(v, d, generator=g) / 3,
            torch.randn(v, dt, generator=g) / 3, torch.randn(v, generator=g), torch.rand(b, s, generator=g) > 0.3)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, 11])
def test_drop_in_equals_trl_loss_entropy_count_and_grads(beta, num_items):
    hs, ht, ws, wt, bs, mask = _heads()
    results = []
    for fn in (trl_distill._chunked_divergence_loss, trl_distillation.fused_divergence_loss):
        leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        wt_param = wt.clone().requires_grad_()  # a teacher head as TRL passes it: a Parameter requiring grad
        loss, entropy_sum, n_valid = fn(leaves[0], ht, leaves[1], wt_param, mask.long(), beta, num_items,
                                        student_lm_head_bias=leaves[2], temperature=1.7)
        results.append([loss, entropy_sum, n_valid.float(), *torch.autograd.grad(loss, leaves)])
        assert wt_param.grad is None
    for name, a, b in zip(("loss", "entropy_sum", "n_valid", "dh", "dW", "db"), *results):
        assert rel_err(b, a) <= 2e-6, f"{name}: rel err {rel_err(b, a):.2e} vs TRL"


def test_softcapped_heads_are_handed_to_trl_with_a_warning():
    hs, ht, ws, wt, _, mask = _heads()
    kw = dict(student_final_logit_softcapping=30.0, temperature=1.0)
    with pytest.warns(UserWarning, match="student logit softcapping 30.0.*TRL's own"):
        ours = trl_distillation.fused_divergence_loss(hs, ht, ws, wt, mask, 0.5, **kw)
    stock = trl_distill._chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, **kw)
    assert torch.equal(ours[0], stock[0])


def _trainer(tmp_path):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from hf_fusedce.demo.model import build_tiny_llama
    from hf_fusedce.demo.tokenizer import load_demo_tokenizer

    student = build_tiny_llama(seed=0, hidden_size=48, num_layers=1, intermediate_size=96)
    teacher = build_tiny_llama(seed=1, hidden_size=80, num_layers=1, intermediate_size=160)  # Dt != D
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Compute {i} + {i + 1}."}]}
                                 for i in range(4)])
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                              max_completion_length=4, report_to=[], use_cpu=True, logging_steps=1, beta=0.5,
                              temperature=1.3, save_strategy="no", seed=0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                               processing_class=load_demo_tokenizer()), student


def _float64_step(trainer, inputs):
    """The stock step's loss and gradients with student and teacher in float64 (the truth), back in float32 after."""
    student, teacher = trainer.model, trainer.teacher_model
    hf_fusedce.unpatch(student)
    try:
        student.double(), teacher.double()
        student.zero_grad()
        loss = trainer.compute_loss(student, inputs)
        loss.backward()
        return loss.detach(), student.lm_head.weight.grad.clone(), student.model.norm.weight.grad.clone()
    finally:
        student.float(), teacher.float()
        student.zero_grad()
        hf_fusedce.patch(student)


def _float64_head_step(trainer, inputs, monkeypatch):
    """The stock step of the float32 student with the loss head (both models' logits and the divergence) in
    float64: the float32 model's own error, which no head can remove."""
    def head(s_h, t_h, s_w, t_w, mask, beta, num_items_in_batch=None, *args, temperature=1.0, **kwargs):
        targets = torch.where(mask != 0, 0, -100)
        loss = reference_linear_distillation(s_h.double(), s_w.double(), t_h.double(), t_w.double(), targets,
                                             beta=beta, temperature=temperature)
        return loss.to(s_h.dtype), torch.zeros(()), (mask != 0).sum()

    student = trainer.model
    hf_fusedce.unpatch(student)
    try:
        with monkeypatch.context() as m:
            m.setattr(trl_distill, "_chunked_divergence_loss", head)
            student.zero_grad()
            loss = trainer.compute_loss(student, inputs)
            loss.backward()
        return loss.detach(), student.lm_head.weight.grad.clone(), student.model.norm.weight.grad.clone()
    finally:
        student.zero_grad()
        hf_fusedce.patch(student)


def test_trainer_uses_the_fused_op_only_for_a_patched_student(tmp_path, monkeypatch):
    trainer, student = _trainer(tmp_path)
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_ids": torch.randint(3, 32000, (2, 5), generator=g), "prompt_mask": torch.ones(2, 5, dtype=torch.long),
              "completion_ids": torch.randint(3, 32000, (2, 4), generator=g),
              "completion_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    calls = []
    real = trl_distillation.fused_divergence_loss
    monkeypatch.setattr(trl_distillation, "fused_divergence_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for patch in (False, True):
        if patch:
            hf_fusedce.patch(student)
        student.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), student.lm_head.weight.grad.clone(), student.model.norm.weight.grad.clone()))
        assert len(calls) == int(patch), "the fused op must run exactly when the student is patched"
    # Against the whole step in float64, each bounded like the CE op's (c = 4 x a float32 baseline + 8 ulps). The
    # baseline is the larger error of TRL's float32 step and of the float64 head on this float32 model (what an
    # exact head gives: the model's own rounding). The fused head sits at the latter; TRL's step was measured both
    # below it (cancelling with the model's rounding: loss 1.2e-7 or 0 vs 9.9e-7) and above it.
    stock, fused, exact = results[0], results[1], _float64_step(trainer, inputs)
    exact_head = _float64_head_step(trainer, inputs, monkeypatch)
    for name, s, x, f, e in zip(("loss", "dW lm_head", "d norm"), stock, exact_head, fused, exact):
        bound = max(accuracy_bound(e, s), accuracy_bound(e, x))
        assert rel_err(f, e) <= bound, (f"{name}: rel err {rel_err(f, e):.3e} > {bound:.3e} (TRL's float32 step "
                                        f"{rel_err(s, e):.3e}, float64 head {rel_err(x, e):.3e})")
    assert trl_distill._chunked_divergence_loss is trl_distillation._STOCK["loss"]  # restored after the step

    out = trainer.train()  # one real on-policy step (generation, teacher forward, fused loss, optimizer)
    assert len(calls) >= 2 and torch.isfinite(torch.tensor(out.training_loss))
    hf_fusedce.unpatch(student)
