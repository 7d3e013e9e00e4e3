"""`FusedCEMemoryCallback`: measured memory and throughput for any `transformers.Trainer` (TRL's included).

    from hf_fusedce import FusedCEMemoryCallback
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds)   # or Trainer, DPOTrainer, FusedCETrainer...
    memory = FusedCEMemoryCallback().attach(trainer)   # first in the callback list: every logger gets its keys
    trainer.train()

What it does:
- at every training log, adds the keys of `METRIC_KEYS` to the logs (console, `log_history`, and the loggers
  that come after it in the callback list: `attach` puts it first), reduced across ranks (max for memory,
  sum for tokens): measured by `meter.IntervalMeter`;
- once, after the first optimizer step, a probe measures the fused loss head on that batch's token count,
  vocabulary, dtype and labels, and gives the stock head from its exact allocation formula (`head_probe.py`):
  the [tokens x vocab] logits are never allocated unless `FusedCEConfig(stock_head="measure")` asks to
  measure them, and even then only when they provably fit (the formula against free memory);
- at the end of training, `<output_dir>/fusedce_summary.json`, and a "Training memory" section appended to
  `<output_dir>/README.md` when a model card is there (`report.py`; `add_model_card_section` does it on demand).
This class only routes the Trainer's events to those three parts.
"""
from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from . import report
from .config import FusedCEConfig
from .head_probe import probe_metrics, run_probe
from .meter import IntervalMeter


class FusedCEMemoryCallback(TrainerCallback):
    """Logs `fusedce/*` memory and throughput keys, writes the summary JSON and the model-card section, with any
    `transformers.Trainer`. See the module docstring; options in `FusedCEConfig`."""

    def __init__(self, config: FusedCEConfig | None = None):
        self.config = config or FusedCEConfig()
        self.probe: dict | None = None
        self.summary: dict | None = None
        self._hook = None
        self._reset()

    def attach(self, trainer):
        """Put this callback first in `trainer`'s list, so reporting integrations (TensorBoard, W&B...) that run
        after it see its keys. Returns the callback."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def _reset(self, device=None):
        self.probe, self.summary = None, None
        self._first_batch: dict | None = None
        self._meter = IntervalMeter(device)
        self._patched = False

    # ---- training events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..hf.patching import is_patched

        self._reset(args.device)
        self._patched = bool(model is not None and is_patched(model))
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        self._meter.start_interval()

    def _see_batch(self, module, args, kwargs):
        """Counts training tokens; keeps the first training batch's labels for the probe. Reads only."""
        if not module.training:
            return
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None:
            return
        self._meter.count_tokens(ids, mask)
        if self._first_batch is None:
            self._first_batch = {"labels": labels, "input_ids": ids, "model": module}

    def on_step_begin(self, args, state, control, **kwargs):
        if self.config.track_step_tensors:
            self._meter.start_step_tracker()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._meter.stop_step_tracker()

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe is None and self.config.memory_probe and self._first_batch is not None:
            # The probe's own measurement resets the CUDA peak: the meter carries the interval's peak across it.
            self.probe = self._meter.around(lambda: self._run_probe(args))

    def _run_probe(self, args) -> dict:
        batch, self._first_batch = self._first_batch, {}
        return run_probe(batch, args, self.config, self._meter.device)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.config.log_metrics and logs is not None and "loss" in logs and self._meter.t0 is not None):
            return
        metrics = self._meter.close_interval(state.global_step, logs.get("loss"), self.config.track_step_tensors,
                                             probe_metrics(self.probe or {}))
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(metrics)  # Trainer.log appended its copy before calling the callbacks

    def on_train_end(self, args, state, control, **kwargs):
        self._meter.stop_step_tracker()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.summary = report.build_summary(self.config, self._meter, self.probe, self._patched, args, state)
        if not state.is_world_process_zero:
            return
        if self.config.summary_filename:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, self.config.summary_filename), "w") as f:
                json.dump(self.summary, f, indent=2, default=str)
        if self.config.model_card_section:
            self.add_model_card_section(args.output_dir)

    # ---- reporting ----------------------------------------------------------------------------------------
    def add_model_card_section(self, output_dir: str) -> bool:
        """Append the "Training memory" section to `output_dir/README.md` (once). False when there is no card."""
        return report.add_model_card_section(output_dir, self.memory_report_markdown())

    def memory_report_markdown(self) -> str:
        return report.memory_report_markdown(self.summary, self.probe)
