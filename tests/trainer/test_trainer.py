"""FusedCETrainer against the stock transformers.Trainer on a tiny Llama (CPU, float32)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_fusedce.testing import tiny_llama  # noqa: E402

VOCAB = 1024
MEM_KEYS = ("fusedce/tokens_per_sec", "fusedce/head_saved_mib", "fusedce/head_stock_mib_formula",
            "fusedce/head_fused_peak_mib")


def _tiny_model(seed=0):
    return tiny_llama(VOCAB, 64, seed=seed, max_position_embeddings=256)


def _dataset(n=48, seed=0):
    """Variable-length sequences, labels masked (-100) on a prompt prefix of each."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(12, 40, (1,), generator=g))
        prompt = int(torch.randint(3, length - 4, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length,
                     "labels": [-100] * prompt + ids[prompt:]})
    return datasets.Dataset.from_list(rows)


def _collate(batch):
    width = max(len(b["input_ids"]) for b in batch)

    def pad(key, value):
        return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


def _args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                gradient_accumulation_steps=2, max_steps=20, logging_steps=1, learning_rate=2e-3,
                lr_scheduler_type="constant", report_to=[], use_cpu=True, seed=0, save_strategy="no",
                dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class _Recorder(transformers.TrainerCallback):
    """What a `report_to` logger (TensorBoard, W&B...) receives: the `logs` of `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """20 optimizer steps (grad accumulation 2, prompt-masked labels) with stock Trainer and FusedCETrainer."""
    from hf_fusedce import FusedCETrainer

    tmp = tmp_path_factory.mktemp("pair")
    train, evald = _dataset(), _dataset(16, seed=1)
    stock = Trainer(model=_tiny_model(), args=_args(tmp, "stock"), train_dataset=train, eval_dataset=evald,
                    data_collator=_collate)
    stock.train()
    fused = FusedCETrainer(model=_tiny_model(), args=_args(tmp, "fused"), train_dataset=train, eval_dataset=evald,
                           data_collator=_collate)
    fused.add_callback(_Recorder())
    fused.train()
    return stock, fused


def test_same_loss_curve_as_stock(pair):
    stock, fused = pair
    a, b = _losses(stock), _losses(fused)
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        assert math.isfinite(y)
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    assert b[-1] < b[0]  # it trains


def test_model_is_patched_and_eval_loss_identical(pair):
    from hf_fusedce import is_patched

    stock, fused = pair
    assert is_patched(fused.model)
    es, ef = stock.evaluate()["eval_loss"], fused.evaluate()["eval_loss"]
    # Fixed: Trainer.evaluate's averaged loss (no gradient); gradients are anchored to float64 in tests/hf.
    assert abs(es - ef) <= 1e-5 * abs(es)


def test_memory_keys_in_logs(pair):
    _, fused = pair
    logs = [h for h in fused.state.log_history if "loss" in h]
    for h in logs:
        for k in MEM_KEYS + ("fusedce/rss_peak_mib",):  # Linux: resettable peak RSS
            assert k in h, (k, sorted(h))
        assert h["fusedce/tokens_per_sec"] > 0
        assert h["fusedce/rss_peak_mib"] > 0
    rec = next(c for c in fused.callback_handler.callbacks if isinstance(c, _Recorder))
    seen = [h for h in rec.logs if "loss" in h]
    assert len(seen) == 20 and all(k in seen[0] for k in MEM_KEYS)  # loggers get the keys
    probe = fused.fusedce_probe
    assert probe["method"] == "live_tensor_tracker" and probe["stock_peak_bytes"] is None  # stock head not run
    # the stock head holds [tokens x vocab] fp32 logits (and their gradient); the fused head stays below it
    assert probe["stock_formula_bytes"] >= 3 * probe["tokens"] * VOCAB * 4
    assert 0 < probe["fused_peak_bytes"] < probe["stock_formula_bytes"]
    assert logs[0]["fusedce/head_saved_mib"] == pytest.approx(
        (probe["stock_formula_bytes"] - probe["fused_peak_bytes"]) / 2**20)


def test_summary_json_and_model_card(pair):
    _, fused = pair
    path = os.path.join(fused.args.output_dir, "fusedce_summary.json")
    with open(path) as f:
        summary = json.load(f)
    assert summary["patched"] is True and summary["global_step"] == 20
    probe = summary["loss_head_probe"]
    for k in ("stock_formula_mib", "fused_peak_mib", "saved_mib", "tokens", "method"):
        assert k in probe
    assert summary["training"]["tokens"] > 0 and summary["training"]["rss_peak_mib_max"] > 0
    assert len(summary["intervals"]) == 20 and "fusedce/tokens_per_sec" in summary["intervals"][0]
    fused.create_model_card(model_name="tiny")
    with open(os.path.join(fused.args.output_dir, "README.md")) as f:
        card = f.read()
    assert "## Training memory" in card and "| fused |" in card and "exact allocation formula" in card


def _short_pair(tmp_path, steps=4, **kw):
    from hf_fusedce import FusedCETrainer

    train = _dataset(24)
    a = Trainer(model=_tiny_model(), args=_args(tmp_path, "s", max_steps=steps, **kw), train_dataset=train,
                data_collator=_collate)
    a.train()
    b = FusedCETrainer(model=_tiny_model(), args=_args(tmp_path, "f", max_steps=steps, **kw), train_dataset=train,
                       data_collator=_collate)
    b.train()
    return _losses(a), _losses(b), b


def test_gradient_checkpointing_matches_stock(tmp_path):
    a, b, _ = _short_pair(tmp_path, steps=2, gradient_checkpointing=True)
    assert len(b) == 2
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x)


def test_bf16_mixed_precision_trains(tmp_path):
    a, b, trainer = _short_pair(tmp_path, bf16=True)
    assert all(math.isfinite(y) for y in b)
    for x, y in zip(a, b):  # bf16 autocast: same numbers up to bf16 rounding
        assert abs(x - y) <= 2e-2 * abs(x)
    assert trainer.fusedce_probe["dtype"] == "float32" and trainer.fusedce_probe["fused_peak_bytes"] > 0


def test_disabled_keeps_stock_head_but_still_reports(tmp_path):
    from hf_fusedce import FusedCEConfig, FusedCETrainer, is_patched

    t = FusedCETrainer(model=_tiny_model(), args=_args(tmp_path, "off", max_steps=2),
                       train_dataset=_dataset(8), data_collator=_collate,
                       fusedce_config=FusedCEConfig(enabled=False, track_step_tensors=True))
    t.train()
    assert not is_patched(t.model)
    logs = [h for h in t.state.log_history if "loss" in h]
    assert logs[0]["fusedce/step_peak_tensor_mib"] > 0
    assert t.fusedce_summary["patched"] is False


def test_measured_stock_head_equals_its_formula_and_a_stock_head_that_does_not_fit_is_not_run(tmp_path,
                                                                                             monkeypatch):
    from hf_fusedce import FusedCEConfig, FusedCETrainer, memory

    t = FusedCETrainer(model=_tiny_model(), args=_args(tmp_path, "measure", max_steps=1), train_dataset=_dataset(4),
                       data_collator=_collate, fusedce_config=FusedCEConfig(stock_head="measure"))
    t.train()
    probe = t.fusedce_probe
    assert probe["stock_peak_bytes"] == probe["stock_formula_bytes"] > probe["fused_peak_bytes"] > 0
    log = [h for h in t.state.log_history if "loss" in h][0]
    assert log["fusedce/head_stock_peak_mib"] == pytest.approx(probe["stock_peak_bytes"] / 2**20)

    monkeypatch.setattr(memory, "available_host_bytes", lambda: 2**16)  # pretend 64 KiB of RAM is free
    t = FusedCETrainer(model=_tiny_model(), args=_args(tmp_path, "nofit", max_steps=1), train_dataset=_dataset(4),
                       data_collator=_collate, fusedce_config=FusedCEConfig(stock_head="measure"))
    t.train()
    probe = t.fusedce_probe
    assert probe["stock_fits"] is False and probe["status"].startswith("stock head not run")
    assert probe["stock_peak_bytes"] is None and probe["fused_peak_bytes"] > 0
    assert "exact allocation formula" in t.memory_report_markdown()


def test_lora_run_trains(tmp_path):
    peft = pytest.importorskip("peft")
    from hf_fusedce import FusedCETrainer, is_patched

    model = peft.get_peft_model(_tiny_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t = FusedCETrainer(model=model, args=_args(tmp_path, "lora", max_steps=6, learning_rate=1e-2),
                       train_dataset=_dataset(24), data_collator=_collate)
    t.train()
    assert is_patched(model)
    losses = _losses(t)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    assert t.fusedce_probe["fused_peak_bytes"] > 0


def test_probe_builds_no_full_weight_when_the_real_one_is_partitioned(tmp_path):
    """ZeRO-3 leaves an empty partition outside the module's hooks (numel 0, the shape in `ds_shape`): the probe
    gives the stock head from its formula and builds no V x D weight of its own."""
    from hf_fusedce import FusedCEMemoryCallback
    from hf_fusedce.memory import LiveTensorTracker

    model = _tiny_model()
    empty = torch.nn.Parameter(torch.empty(0))
    empty.ds_shape = (VOCAB, 64)
    model.lm_head.weight = empty
    labels = torch.full((2, 16), 5)
    cb = FusedCEMemoryCallback()
    cb._first_batch = {"input_ids": labels, "labels": labels, "model": model}
    with LiveTensorTracker() as tracker:
        probe = cb._run_probe(_args(tmp_path, "z3"))
    assert probe["status"].startswith("fused head not measured: the lm_head weight is partitioned")
    assert probe["fused_peak_bytes"] is None and probe["vocab_size"] == VOCAB and probe["hidden_size"] == 64
    assert probe["stock_formula_bytes"] > 32 * VOCAB * 12
    assert tracker.largest_numel < VOCAB * 64


def test_model_init_is_patched(tmp_path):
    from hf_fusedce import FusedCETrainer, is_patched

    t = FusedCETrainer(model_init=lambda: _tiny_model(), args=_args(tmp_path, "init", max_steps=2), train_dataset=_dataset(8),
                       data_collator=_collate)
    t.train()
    assert is_patched(t.model) and len(_losses(t)) == 2
