"""FusedCEMemoryCallback with any Trainer (transformers' and TRL's SFTTrainer), the safe probe (the stock head's
exact allocation formula, no [tokens x vocab] tensor in a default run)."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from hf_fusedce.callback import stock_loss_head  # noqa: E402
from hf_fusedce.memory import LiveTensorTracker, measure_peak, stock_head_peak_bytes  # noqa: E402
from hf_fusedce.testing import tiny_llama  # noqa: E402

VOCAB, HIDDEN, SEQ, BATCH = 1024, 64, 48, 2


def _model():
    return tiny_llama(VOCAB, HIDDEN, num_hidden_layers=1, max_position_embeddings=64)


def _fixed_length_data(n=8):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * SEQ, "labels": ids})
    return datasets.Dataset.from_list(rows)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2, logging_steps=1,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("mode", ["float32", "bf16-autocast", "bfloat16"])
def test_stock_head_formula_equals_the_measurement(mode):
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    cast = torch.bfloat16 if mode == "bf16-autocast" else None
    for n, v, d in [(64, 1000, 32), (37, 999, 17), (16, 100, 512), (5, 7, 3)]:
        for weight_grad in (True, False):
            g = torch.Generator().manual_seed(0)
            h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
            w = torch.randn(v, d, generator=g).to(dtype).requires_grad_(weight_grad)
            targets = torch.randint(0, v, (n,), generator=g)
            with measure_peak("cpu") as reading:
                stock_loss_head(h, w, targets, n, cast)
            bytes_ = 2 if dtype == torch.bfloat16 or cast is not None else 4
            assert reading.peak_bytes == stock_head_peak_bytes(n, v, d, bytes_, autocast=cast is not None,
                                                               weight_requires_grad=weight_grad), (n, v, d)


def _largest_allocation(trainer) -> tuple[int, tuple]:
    with LiveTensorTracker() as tracker:
        trainer.train()
    return tracker.largest_numel, tracker.largest_shape


def test_default_fused_run_never_allocates_tokens_x_vocab(tmp_path):
    """The whole FusedCETrainer run (probe included) under the dispatch-mode tracker: no tensor has as many
    elements as a micro-batch's logits. The stock Trainer on the same data does allocate one (the test can fail)."""
    from hf_fusedce import FusedCETrainer

    logits_numel = BATCH * SEQ * VOCAB
    assert VOCAB * HIDDEN < logits_numel  # the largest weight is smaller than the logits
    data = _fixed_length_data()
    fused = FusedCETrainer(model=_model(), args=_args(tmp_path / "f"), train_dataset=data,
                           data_collator=default_data_collator)
    numel, shape = _largest_allocation(fused)
    assert numel < logits_numel, shape
    assert fused.fusedce_probe["fused_peak_bytes"] > 0 and fused.fusedce_probe["tokens"] == BATCH * SEQ
    stock = Trainer(model=_model(), args=_args(tmp_path / "s"), train_dataset=data,
                    data_collator=default_data_collator)
    numel, shape = _largest_allocation(stock)
    assert numel >= logits_numel, shape


def _assert_callback_reported(trainer, cb, steps):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps
    for h in logs:
        assert h["fusedce/tokens_per_sec"] > 0 and h["fusedce/head_fused_peak_mib"] > 0
        assert h["fusedce/head_stock_mib_formula"] > 0 and "fusedce/rss_peak_mib" in h
    with open(os.path.join(trainer.args.output_dir, "fusedce_summary.json")) as f:
        summary = json.load(f)
    assert summary["global_step"] == steps and summary["loss_head_probe"]["fused_peak_mib"] > 0
    card = os.path.join(trainer.args.output_dir, "README.md")
    with open(card, "w") as f:
        f.write("# a card\n")
    assert cb.add_model_card_section(trainer.args.output_dir)
    with open(card) as f:
        assert "## Training memory" in f.read()


def test_callback_with_a_plain_trainer(tmp_path):
    from hf_fusedce import FusedCEMemoryCallback

    cb = FusedCEMemoryCallback()
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_fixed_length_data(),
                      data_collator=default_data_collator, callbacks=[cb])
    trainer.train()
    _assert_callback_reported(trainer, cb, 2)
    assert cb.summary["patched"] is False


def test_callback_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from hf_fusedce import FusedCEMemoryCallback
    from hf_fusedce.demo import load_demo_tokenizer

    model = _model()
    data = _fixed_length_data().remove_columns(["attention_mask", "labels"])
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=SEQ)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=load_demo_tokenizer())
    cb = FusedCEMemoryCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    _assert_callback_reported(trainer, cb, 2)
