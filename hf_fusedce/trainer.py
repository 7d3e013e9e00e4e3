"""`FusedCETrainer`: `transformers.Trainer` + `hf_fusedce.patch` + `FusedCEMemoryCallback`.

    from hf_fusedce import FusedCETrainer
    trainer = FusedCETrainer(model=model, args=training_args, train_dataset=ds, data_collator=collator)
    trainer.train()

The model is patched before accelerate prepares it (generation and evaluation with metrics keep the stock
head; evaluation with `prediction_loss_only` computes the eval loss fused, without logits); the callback logs the `fusedce/*` keys, writes `<output_dir>/fusedce_summary.json`
and the model card's "Training memory" section. With another Trainer (TRL's SFTTrainer...), patch the model
yourself if you want the fused head, and attach the callback: `FusedCEMemoryCallback().attach(trainer)`.
"""
from __future__ import annotations

from transformers import Trainer

from .callback import METRIC_KEYS, FusedCEConfig, FusedCEMemoryCallback
from .integrations import liger

__all__ = ["FusedCETrainer", "FusedCEConfig", "METRIC_KEYS"]


class FusedCETrainer(Trainer):
    """`transformers.Trainer` with the fused loss head and measured memory reporting.

    Same constructor as `Trainer`, plus the keyword `fusedce_config` (a `FusedCEConfig`)."""

    def __init__(self, *args, fusedce_config: FusedCEConfig | None = None, **kwargs):
        self.fusedce_config = fusedce_config or FusedCEConfig()
        self.fusedce_callback = FusedCEMemoryCallback(self.fusedce_config)
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            self._fce_patch(model)
        super().__init__(*args, **kwargs)
        self.fusedce_callback.attach(self)
        liger.compose_trainer(self)  # use_liger_kernel: Liger's layer kernels stay, its head kernels go off

    def _fce_patch(self, model):
        if not self.fusedce_config.enabled:
            return model
        from .hf.patching import is_patched, patch

        if not is_patched(model):
            try:
                patch(model, **self.fusedce_config.patch_options)
            except ValueError as err:
                raise ValueError(f"{err}\nFusedCETrainer: pass fusedce_config=FusedCEConfig(patch_options="
                                 "{'force': True}) to force it, or FusedCEConfig(enabled=False) for the stock "
                                 "head.") from err
        return model

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation with `prediction_loss_only` (no compute_metrics): the eval loss is computed fused, with no
        logits (`skip_logits=True`), so long-context evaluation does not build [tokens x vocab]. Otherwise
        (metrics need logits) the model is in eval mode and runs the stock forward."""
        if prediction_loss_only and self.fusedce_config.enabled and "labels" in inputs:
            inputs = {**inputs, "skip_logits": True}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def call_model_init(self, trial=None):
        return self._fce_patch(super().call_model_init(trial))

    @property
    def fusedce_probe(self) -> dict | None:
        return self.fusedce_callback.probe

    @property
    def fusedce_summary(self) -> dict | None:
        return self.fusedce_callback.summary

    def memory_report_markdown(self) -> str:
        return self.fusedce_callback.memory_report_markdown()

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.fusedce_config.model_card_section and self.is_world_process_zero():
            self.fusedce_callback.add_model_card_section(self.args.output_dir)
