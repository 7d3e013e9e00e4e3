"""What the memory callback logs (`METRIC_KEYS`) and its options (`FusedCEConfig`, shared with FusedCETrainer)."""
from __future__ import annotations

from dataclasses import dataclass, field

MiB = 2**20

# Every key the callback logs, and what it is. Keys present depend on the device (see each line).
METRIC_KEYS = {
    "fusedce/tokens_per_sec": "input tokens (attention_mask sum, all ranks) per second of wall time in the interval",
    "fusedce/peak_alloc_mib": "CUDA: torch.cuda.max_memory_allocated in the interval (reset each log), max over ranks",
    "fusedce/rss_peak_mib": "CPU (Linux): peak resident set size of the process in the interval (VmHWM, reset at "
                            "each log through /proc/self/clear_refs), max over ranks",
    "fusedce/rss_mib": "CPU where the peak cannot be reset: resident set size when logging (current, not a peak), "
                       "max over ranks",
    "fusedce/step_peak_tensor_mib": "CPU with track_step_tensors: peak bytes of tensors allocated inside a training "
                                    "step (forward+backward of its micro-batches, live-tensor tracker), max over "
                                    "steps and ranks",
    "fusedce/head_fused_peak_mib": "probe (first batch): fused loss head peak, forward+backward, measured",
    "fusedce/head_stock_mib_formula": "probe (first batch): stock loss head peak from its exact allocation formula "
                                      "(tensor bytes; not run)",
    "fusedce/head_stock_peak_mib": "probe, only with stock_head='measure' and when it fits: stock loss head peak, "
                                   "measured",
    "fusedce/head_saved_mib": "probe: stock loss head (measured when it was, else the formula) minus the fused one",
}


@dataclass
class FusedCEConfig:
    """Options of `FusedCEMemoryCallback` and `FusedCETrainer`; the defaults need no change."""

    enabled: bool = True
    """FusedCETrainer: patch the model. False keeps the stock head but still probes and logs (A/B runs)."""
    patch_options: dict = field(default_factory=dict)
    """FusedCETrainer: keyword arguments for `hf_fusedce.patch(model, **patch_options)`; the probe passes the
    op's options among them (backend, chunk budget, z_loss...) to the fused head it measures."""
    memory_probe: bool = True
    """Measure the fused loss head once, on the first training batch, and give the stock head's size."""
    stock_head: str = "formula"
    """"formula": the stock head is never run (its exact allocation formula is reported). "measure": run and
    measure it too, when the formula says it fits in free memory (else reported as not fitting)."""
    log_metrics: bool = True
    """Add the `fusedce/*` keys to every training log."""
    track_step_tensors: bool = False
    """CPU only: run each training step under the live-tensor tracker and log its peak (slower)."""
    summary_filename: str = "fusedce_summary.json"
    """Written into `output_dir` at the end of training (None/"" to skip)."""
    model_card_section: bool = True
    """Append a "Training memory" section to `output_dir/README.md` when there is one."""

    def __post_init__(self):
        if self.stock_head not in ("formula", "measure"):
            raise ValueError(f"FusedCEConfig.stock_head must be 'formula' or 'measure', got {self.stock_head!r}")
