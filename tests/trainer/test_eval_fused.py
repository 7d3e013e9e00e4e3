"""Evaluation with FusedCETrainer: with `prediction_loss_only` the eval loss is computed fused (no logits), equal
to the stock Trainer's; its peak memory is measured against stock's in the same process (CPU live-tensor
tracker). With compute_metrics the stock forward runs (metrics need the logits)."""
from __future__ import annotations

import copy

import pytest
import torch

datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_fusedce import FusedCETrainer  # noqa: E402
from hf_fusedce.callback import FusedCEConfig  # noqa: E402
from hf_fusedce.testing import rel_err, tiny_llama  # noqa: E402
from hf_fusedce.memory import measure_peak  # noqa: E402

VOCAB, SEQ, ROWS, BATCH = 8192, 256, 4, 2
BUDGET = 1 << 20  # chunk budget: the fused head holds at most ~1 MiB of logits at a time


def _dataset(vocab=VOCAB):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (ROWS, SEQ), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _evaluate(cls, model, tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), per_device_eval_batch_size=BATCH,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    vocab = model.config.vocab_size
    trainer = cls(model=model, args=args, eval_dataset=_dataset(vocab), **kw)
    with measure_peak("cpu") as peak:
        metrics = trainer.evaluate()
    return metrics, peak


def test_eval_loss_only_is_fused_equal_and_smaller(tmp_path):
    model = tiny_llama(VOCAB, num_hidden_layers=1, max_position_embeddings=SEQ)
    stock, stock_peak = _evaluate(Trainer, copy.deepcopy(model), tmp_path)
    config = FusedCEConfig(patch_options={"chunk_budget_bytes": BUDGET})
    fused, fused_peak = _evaluate(FusedCETrainer, copy.deepcopy(model), tmp_path, fusedce_config=config)
    # Fixed: Trainer.evaluate's averaged loss (no gradient, a 1-layer model), the head's float32 sum is the only
    # difference; model-level gradients are anchored to float64 in tests/hf (test_model_accuracy.py).
    assert rel_err(torch.tensor(fused["eval_loss"]), torch.tensor(stock["eval_loss"])) <= 1e-5
    logits_bytes = BATCH * SEQ * VOCAB * 4
    assert stock_peak.peak_bytes >= logits_bytes  # stock builds the [tokens x vocab] logits
    assert fused_peak.peak_bytes < logits_bytes / 4, (fused_peak.peak_bytes, stock_peak.peak_bytes)


def test_eval_with_metrics_runs_stock_with_logits(tmp_path):
    model = tiny_llama(97, num_hidden_layers=1, max_position_embeddings=SEQ)
    seen = {}

    def metrics(pred):
        seen["shape"] = pred.predictions.shape
        return {}

    _evaluate(FusedCETrainer, model, tmp_path, compute_metrics=metrics)
    assert seen["shape"][-1] == 97  # the logits reached compute_metrics
