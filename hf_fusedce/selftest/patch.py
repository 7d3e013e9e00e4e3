"""Does the patch give stock's training: a tiny Llama's training steps (loss and every gradient, then SGD steps),
one TRL SFT step, one LoRA step (adapters on attention and on lm_head), patched against stock on the same
device. fp32, the proof's tolerance (hf/proof.py)."""
from __future__ import annotations

import copy
import tempfile

import torch

from ..hf import proof
from ..testing import rel_err, tiny_batch, tiny_llama
from .report import Check

STEPS = 3


def _sgd_losses(model, ids, labels, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _compare_steps(stock, fused, ids, labels, steps: int) -> tuple[dict, list[str]]:
    a, b = _sgd_losses(stock, ids, labels, steps), _sgd_losses(fused, ids, labels, steps)
    errs = [abs(x - y) / max(abs(x), proof.FLOOR) for x, y in zip(a, b)]
    params = max(rel_err(p.detach(), q.detach(), floor=proof.FLOOR)
                 for p, q in zip(stock.parameters(), fused.parameters()))
    figures = {"stock losses": a, "patched losses": b, "max loss err": max(errs), "params err after": params}
    problems = [f"losses differ: {a} vs {b}"] * (max(errs) > proof.TOL) + \
        [f"parameters differ after {steps} SGD steps: {params:.2e}"] * (params > proof.TOL)
    return figures, problems


def training_steps_check(device) -> Check:
    import hf_fusedce

    base = tiny_llama(vocab_size=1031, hidden_size=64, tie=True).to(device)
    ids, labels = (t.to(device) for t in tiny_batch(vocab_size=1031, batch=2, seq=24))
    first = proof.compare(base, ids, labels)  # loss and every gradient, patched vs stock (raises on a mismatch)
    figures, problems = _compare_steps(copy.deepcopy(base), hf_fusedce.patch(copy.deepcopy(base)), ids, labels,
                                       STEPS)
    figures = {"first step max rel err": first, **figures}
    return Check("patch", f"tiny Llama, {STEPS} SGD steps", "fail" if problems else "pass", figures,
                 "; ".join(problems))


def lora_check(device) -> Check:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        return Check("patch", "LoRA step", "skipped", detail=f"peft not installed ({err})")
    import hf_fusedce

    base = tiny_llama(vocab_size=1031, hidden_size=64).to(device)
    ids, labels = (t.to(device) for t in tiny_batch(vocab_size=1031, batch=2, seq=24))
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    torch.manual_seed(1)  # the same random adapters on both sides (init_lora_weights=False: B != 0, so they act)
    stock = get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    fused = hf_fusedce.patch(get_peft_model(copy.deepcopy(base), cfg))
    figures, problems = _compare_steps(stock, fused, ids, labels, 1)
    return Check("patch", "LoRA step (attention + lm_head adapters)", "fail" if problems else "pass", figures,
                 "; ".join(problems))


def sft_check(device) -> Check:
    """One SFTTrainer step on the shipped chat data and 32k tokenizer, TRL's own head vs ours."""
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        return Check("patch", "TRL SFT step", "skipped", detail=f"trl / datasets not installed ({err})")
    import hf_fusedce
    from ..demo.data import make_sft_records
    from ..demo.tokenizer import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    rows = [{"messages": r["messages"]} for r in make_sft_records(8)]
    losses = {}
    for variant in ("stock", "patched"):
        model = tiny_llama(len(tokenizer), hidden_size=64, num_hidden_layers=1, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).to(device)
        if variant == "patched":
            hf_fusedce.patch(model)
        with tempfile.TemporaryDirectory() as out:
            args = SFTConfig(output_dir=out, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
                             max_length=48, seed=0, disable_tqdm=True, bf16=False)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
            trainer.train()
        losses[variant] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    a, b = losses["stock"], losses["patched"]
    err = max(abs(x - y) / max(abs(x), 1.0) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
    ok = err <= proof.TOL
    return Check("patch", "TRL SFT step", "pass" if ok else "fail",
                 {"stock loss": a, "patched loss": b, "rel err": err}, "" if ok else "SFT losses differ")
