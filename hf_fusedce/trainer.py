"""`FusedCETrainer`: a drop-in `transformers.Trainer` that computes the loss head with the fused op and reports,
with numbers it measured, the memory that saved.

    from hf_fusedce import FusedCETrainer
    trainer = FusedCETrainer(model=model, args=training_args, train_dataset=ds, data_collator=collator)
    trainer.train()

What it adds to `Trainer`:
- the model is patched (`hf_fusedce.patch`, which unwraps PEFT) before accelerate prepares it; evaluation and
  generation keep the stock head, so eval loss is the stock number;
- once, on the first training batch, a probe runs the stock loss head (lm_head + fp32 cross-entropy,
  forward + backward) and the fused op in isolation on that batch's shape, dtype and labels, and measures both
  peaks with `hf_fusedce.memory.measure_peak` (CUDA allocator / CPU live-tensor tracker). A stock head that
  does not fit (CUDA OOM) is recorded as such;
- at every logging step, through `Trainer.log` (so console, TensorBoard, W&B... receive them), the keys in
  `METRIC_KEYS` below, reduced across ranks (max for memory, sum for tokens);
- at the end of `train()`, `<output_dir>/fusedce_summary.json`; `create_model_card()` adds a
  "Training memory" section to the card it writes.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from .memory import measure_peak

MiB = 2**20
MAX_INTERVALS_KEPT = 2000

# Every key this trainer logs, and what it is. Keys present depend on the device (see each line).
METRIC_KEYS = {
    "fusedce/tokens_per_sec": "input tokens (attention_mask sum, all ranks) per second of wall time in the interval",
    "fusedce/peak_alloc_mib": "CUDA: torch.cuda.max_memory_allocated in the interval (reset each log), max over ranks",
    "fusedce/rss_peak_mib": "CPU (Linux): peak resident set size of the process in the interval (VmHWM, reset at "
                            "each log through /proc/self/clear_refs), max over ranks",
    "fusedce/rss_mib": "CPU where the peak cannot be reset: resident set size when logging (current, not a peak), "
                       "max over ranks",
    "fusedce/step_peak_tensor_mib": "CPU with track_step_tensors: peak bytes of tensors allocated inside a training "
                                    "step (forward+backward, live-tensor tracker), max over steps and ranks",
    "fusedce/head_stock_peak_mib": "probe (measured once, first batch): stock loss head peak, fwd+bwd; -1 = does not fit",
    "fusedce/head_fused_peak_mib": "probe (measured once, first batch): fused loss head peak, fwd+bwd",
    "fusedce/head_saved_mib_measured": "probe: stock minus fused head peak on the first batch (measured)",
    "fusedce/head_saved_mib_est": "estimate for the interval's largest micro-batch: the measured saving scaled by "
                                  "its token count over the probe's (stock head memory is linear in tokens)",
    "fusedce/head_saved_mib_analytic": "only when the stock head does not fit: a formula's stock-head size for the "
                                       "interval's largest micro-batch (tokens*vocab*(logit bytes + 12)) minus the "
                                       "measured fused peak: not measured",
}


@dataclass
class FusedCEConfig:
    """Options of `FusedCETrainer`; the defaults need no change."""

    enabled: bool = True
    """Patch the model. False keeps the stock head but still probes and logs (for A/B runs)."""
    patch_options: dict = field(default_factory=dict)
    """Keyword arguments for `hf_fusedce.patch(model, **patch_options)`."""
    memory_probe: bool = True
    """Measure stock vs fused loss-head peaks once, on the first training batch."""
    log_metrics: bool = True
    """Add the `fusedce/*` keys to every training log."""
    track_step_tensors: bool = False
    """CPU only: run each training step under the live-tensor tracker and log its peak (slower)."""
    summary_filename: str = "fusedce_summary.json"
    """Written into `output_dir` at the end of `train()` (None/"" to skip)."""
    model_card_section: bool = True
    """Add a "Training memory" section to the model card written by `create_model_card`."""


def _fused_op_kwargs(options: dict) -> dict:
    from .ops import fused_linear_cross_entropy

    accepted = set(inspect.signature(fused_linear_cross_entropy).parameters) - {"hidden", "weight", "targets"}
    return {k: v for k, v in options.items() if k in accepted}


class _HostWouldOOM(RuntimeError):
    pass


class _ProbeSkipped(Exception):
    pass


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch
        return "DTensor" in type(t).__name__
    return isinstance(t, DTensor) or "DTensor" in type(t).__name__


def stock_head_bytes_estimate(tokens: int, vocab: int, compute_dtype=torch.float32) -> int:
    """Rough peak of a stock loss head (fwd+bwd): logits in the compute dtype, their fp32 copy when that is
    narrower, log-softmax output and the logits gradient in fp32 (measured 2.9x tokens*vocab*4 in fp32)."""
    es = torch.empty((), dtype=compute_dtype).element_size()
    return int(tokens) * int(vocab) * (es + 12 + (4 if es < 4 else 0))


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_peak_bytes() is not None
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _rss_bytes() -> int:
    """Current RSS (Linux /proc/self/statm); elsewhere psutil when installed, else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:
            return 0


def _unwrap_base(model):
    """The `PreTrainedModel` under PEFT / DDP / FSDP wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            break
    return model


class FusedCETrainer(Trainer):
    """`transformers.Trainer` with the fused loss head and measured memory reporting.

    Same constructor as `Trainer`, plus the keyword `fusedce_config` (a `FusedCEConfig`)."""

    def __init__(self, *args, fusedce_config: FusedCEConfig | None = None, **kwargs):
        self.fusedce_config = fusedce_config or FusedCEConfig()
        self._fce_patched = False
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            self._fce_patch(model)
        self._fce_reset_state()
        super().__init__(*args, **kwargs)
        if self.fusedce_config.enabled and getattr(self.args, "use_liger_kernel", False):
            raise ValueError("FusedCETrainer: use_liger_kernel=True would replace the fused forward with Liger's; "
                             "use one of them (or FusedCEConfig(enabled=False) to keep Liger).")

    # ---- patching -------------------------------------------------------------------------------------------
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
        self._fce_patched = True
        return model

    def call_model_init(self, trial=None):
        return self._fce_patch(super().call_model_init(trial))

    # ---- state ----------------------------------------------------------------------------------------------
    def _fce_reset_state(self):
        self.fusedce_probe: dict | None = None
        self.fusedce_summary: dict | None = None
        self._fce_intervals: list[dict] = []  # the last MAX_INTERVALS_KEPT, for the summary
        self._fce_n_intervals = 0
        self._fce_maxima: dict[str, float] = {}
        self._fce_t0: float | None = None
        self._fce_mem_key: str | None = None
        self._fce_tokens = 0  # python int or device tensor, summed lazily
        self._fce_max_micro_tokens = 0
        self._fce_step_tensor_peak = 0
        self._fce_total_tokens = 0
        self._fce_train_seconds = 0.0

    def _fce_device(self) -> torch.device:
        return self.args.device

    def _fce_start_interval(self):
        dev = self._fce_device()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            self._fce_mem_key = "fusedce/peak_alloc_mib"
        else:
            self._fce_mem_key = "fusedce/rss_peak_mib" if _reset_rss_peak() else "fusedce/rss_mib"
        self._fce_t0 = time.perf_counter()
        self._fce_tokens = 0
        self._fce_max_micro_tokens = 0
        self._fce_step_tensor_peak = 0

    # ---- training step --------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        cfg = self.fusedce_config
        if cfg.memory_probe and self.fusedce_probe is None:
            self.fusedce_probe = self._fce_run_probe(inputs)
        if self._fce_t0 is None:
            self._fce_start_interval()
        self._fce_count_tokens(inputs)
        if cfg.track_step_tensors and self._fce_device().type != "cuda":
            with measure_peak(self._fce_device()) as reading:
                loss = super().training_step(model, inputs, num_items_in_batch)
            self._fce_step_tensor_peak = max(self._fce_step_tensor_peak, reading.peak_bytes)
            return loss
        return super().training_step(model, inputs, num_items_in_batch)

    def _fce_count_tokens(self, inputs):
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if ids is None:
            return
        self._fce_max_micro_tokens = max(self._fce_max_micro_tokens, int(ids.numel()))
        if mask is not None and mask.shape == ids.shape:
            n = mask.detach().sum()  # stays on device: one sync per logging step, not per micro-batch
        else:
            n = int(ids.numel())
        self._fce_tokens = self._fce_tokens + n

    # ---- the probe ------------------------------------------------------------------------------------------
    def _fce_head_weight(self):
        """(weight tensor to probe with, how it was obtained). Synthetic (same shape/dtype) when the real weight
        is sharded (DTensor, ZeRO-3 empty partition)."""
        base = _unwrap_base(self.model)
        head = base.get_output_embeddings()
        w = head.weight
        shape = tuple(getattr(w, "ds_shape", None) or w.shape)
        if w.numel() == 0 or _is_dtensor(w) or tuple(w.shape) != shape:
            dev = self._fce_device()
            g = torch.Generator(device=dev).manual_seed(0)
            synth = torch.randn(shape, generator=g, device=dev, dtype=w.dtype) * 0.02
            return synth.requires_grad_(w.requires_grad), "synthetic (same shape and dtype; real weight is sharded)"
        source = "model lm_head weight (detached: no gradient reaches it)"
        if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
            source += "; a peft adapter on lm_head is not part of the probe"
        return w.detach().requires_grad_(w.requires_grad), source

    def _fce_run_probe(self, inputs) -> dict:
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        dev = self._fce_device()
        result: dict[str, Any] = {"device": str(dev), "method": None, "tokens": None}
        try:
            ref = labels if labels is not None else ids
            if ref is None or ref.dim() != 2:
                raise _ProbeSkipped("skipped: batch has no 2-D labels/input_ids")
            ref = ref.to(dev)
            if labels is not None:  # what the model trains on: labels shifted left, -100 at the end of each row
                tgt = F.pad(ref[:, 1:], (0, 1), value=-100).reshape(-1)
            else:
                tgt = ref.reshape(-1)
            weight, source = self._fce_head_weight()
            result.update(self._fce_measure_heads(weight, tgt.long()))
            result["weight_source"] = source
            result["vocab_size"], result["hidden_size"] = int(weight.shape[0]), int(weight.shape[1])
            result["dtype"] = str(weight.dtype).replace("torch.", "")
        except _ProbeSkipped as why:
            result["status"] = str(why)
        except Exception as err:  # a failing probe must never stop training
            result["status"] = f"probe failed: {type(err).__name__}: {err}"
        return self._fce_reduce_probe(result)

    def _fce_measure_heads(self, weight, targets) -> dict:
        dev = self._fce_device()
        n = targets.numel()
        g = torch.Generator(device=dev).manual_seed(0)  # the global RNG is left untouched
        hidden = torch.randn(n, weight.shape[1], generator=g, device=dev, dtype=weight.dtype).requires_grad_()
        n_valid = max(int((targets != -100).sum()), 1)
        compute_dtype = self._fce_compute_dtype(weight)
        out: dict[str, Any] = {"tokens": int(n), "label_tokens": n_valid,
                               "compute_dtype": str(compute_dtype).replace("torch.", "")}
        autocast = self.accelerator.autocast

        def clear():
            hidden.grad = None
            weight.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()

        # Stock head, as transformers computes it: logits = lm_head(h); ForCausalLMLoss upcasts to fp32.
        # Host memory has no catchable OOM (the kernel kills the process): on CPU, a stock head that cannot
        # fit in the available RAM is not run, and reported as not fitting (with the estimate).
        need = stock_head_bytes_estimate(n, weight.shape[0], compute_dtype)
        avail = available_host_bytes() if dev.type != "cuda" else None
        try:
            if avail is not None and need > 0.8 * avail:
                raise _HostWouldOOM(f"needs about {need / 2**30:.1f} GiB (estimated) with "
                                    f"{avail / 2**30:.1f} GiB of RAM available; not run")
            with measure_peak(dev) as stock:
                self._fce_stock_head(hidden, weight, targets, n_valid)
            out["stock_peak_bytes"] = int(stock.peak_bytes)
            out["stock_fits"] = True
            out["method"] = stock.method
        except (torch.OutOfMemoryError, _HostWouldOOM) as err:
            out["stock_peak_bytes"] = None
            out["stock_fits"] = False
            out["stock_error"] = f"stock head does not fit: {str(err).splitlines()[0]}"
        clear()
        from .ops import fused_linear_cross_entropy

        with measure_peak(dev) as fused:
            with autocast():
                loss = fused_linear_cross_entropy(hidden, weight, targets, num_items_in_batch=n_valid,
                                                  **_fused_op_kwargs(self.fusedce_config.patch_options))
            loss.backward()
            del loss
        out["fused_peak_bytes"] = int(fused.peak_bytes)
        out["method"] = fused.method
        clear()
        if out["stock_fits"]:
            out["saved_bytes"] = out["stock_peak_bytes"] - out["fused_peak_bytes"]
            out["status"] = "measured"
        else:
            out["saved_bytes"] = None
            out["status"] = out["stock_error"]
        return out

    def _fce_compute_dtype(self, weight) -> torch.dtype:
        mp = getattr(self.accelerator, "mixed_precision", "no")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, weight.dtype)

    def _fce_stock_head(self, hidden, weight, targets, n_valid):
        """Forward + backward of the stock head (what `ForCausalLMLoss` does after `lm_head`). The logits are
        not referenced during backward (Trainer keeps only the loss), autograd keeps what it saved."""

        def forward():
            with self.accelerator.autocast():
                logits = F.linear(hidden, weight)
                return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum") / n_valid

        forward().backward()

    def _fce_reduce_probe(self, result: dict) -> dict:
        """Max over ranks (every rank probes its own first batch). A rank whose stock head did not fit wins."""
        if self.accelerator.num_processes <= 1:
            return result
        dev = self._fce_device()

        def val(key):
            v = result.get(key)
            return -1.0 if v is None else float(v)

        local = torch.tensor([val("stock_peak_bytes"), val("fused_peak_bytes"), val("tokens"),
                              0.0 if result.get("stock_fits", True) else 1.0], device=dev, dtype=torch.float64)
        allv = self.accelerator.gather(local[None]).reshape(-1, 4)
        stock, fused, tokens, oom = allv.max(0).values.tolist()
        result = dict(result)
        result["ranks"] = int(allv.shape[0])
        if result.get("fused_peak_bytes") is not None or fused >= 0:
            result["fused_peak_bytes"] = int(fused) if fused >= 0 else None
        result["tokens"] = int(tokens) if tokens >= 0 else result.get("tokens")
        if oom:
            result.update(stock_fits=False, stock_peak_bytes=None, saved_bytes=None,
                          status=result.get("stock_error", "stock head does not fit on at least one rank"))
        elif stock >= 0 and result.get("fused_peak_bytes") is not None:
            result["stock_peak_bytes"] = int(stock)
            result["saved_bytes"] = int(stock) - result["fused_peak_bytes"]
        return result

    # ---- logging --------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.fusedce_config.log_metrics and "loss" in logs and self._fce_t0 is not None:
            logs.update(self._fce_interval_metrics(logs))
        super().log(logs, start_time)

    def _fce_interval_metrics(self, logs) -> dict:
        dev = self._fce_device()
        elapsed = max(time.perf_counter() - self._fce_t0, 1e-9)
        tokens = self._fce_tokens
        tokens = tokens.to(torch.float64) if isinstance(tokens, torch.Tensor) else torch.tensor(float(tokens))
        # [tokens (sum over ranks), memory (max), step tensor peak (max), largest micro-batch (max)]
        if dev.type == "cuda":
            mem = float(torch.cuda.max_memory_allocated(dev))
        elif self._fce_mem_key == "fusedce/rss_peak_mib":
            mem = float(_rss_peak_bytes() or 0)
        else:
            mem = float(_rss_bytes())
        local = torch.stack([tokens.to(dev, torch.float64).reshape(()),
                             torch.tensor(mem, device=dev, dtype=torch.float64),
                             torch.tensor(float(self._fce_step_tensor_peak), device=dev, dtype=torch.float64),
                             torch.tensor(float(self._fce_max_micro_tokens), device=dev, dtype=torch.float64)])
        if self.accelerator.num_processes > 1:
            allv = self.accelerator.gather(local[None]).reshape(-1, 4)
            tok_sum = float(allv[:, 0].sum())
            mem, step_peak, micro = (float(x) for x in allv[:, 1:].max(0).values.tolist())
        else:
            tok_sum, mem, step_peak, micro = (float(x) for x in local.tolist())
        out = {"fusedce/tokens_per_sec": tok_sum / elapsed}
        out[self._fce_mem_key] = mem / MiB
        if self.fusedce_config.track_step_tensors and dev.type != "cuda":
            out["fusedce/step_peak_tensor_mib"] = step_peak / MiB
        probe = self.fusedce_probe or {}
        if probe.get("fused_peak_bytes") is not None:
            stock = probe.get("stock_peak_bytes")
            out["fusedce/head_stock_peak_mib"] = stock / MiB if stock is not None else -1.0
            out["fusedce/head_fused_peak_mib"] = probe["fused_peak_bytes"] / MiB
            if probe.get("saved_bytes") is not None:
                out["fusedce/head_saved_mib_measured"] = probe["saved_bytes"] / MiB
                if probe.get("tokens") and micro > 0:
                    out["fusedce/head_saved_mib_est"] = probe["saved_bytes"] * (micro / probe["tokens"]) / MiB
            elif probe.get("stock_fits") is False and probe.get("vocab_size") and micro > 0:
                dtype = getattr(torch, probe.get("compute_dtype", "float32"), torch.float32)
                stock_est = stock_head_bytes_estimate(int(micro), probe["vocab_size"], dtype)
                out["fusedce/head_saved_mib_analytic"] = (stock_est - probe["fused_peak_bytes"]) / MiB
        record = {"step": self.state.global_step, "loss": logs.get("loss"), "seconds": elapsed, "tokens": tok_sum,
                  **{k: v for k, v in out.items() if not k.startswith("fusedce/head_")}}
        self._fce_intervals.append(record)
        del self._fce_intervals[:-MAX_INTERVALS_KEPT]
        self._fce_n_intervals += 1
        for k, v in record.items():
            if k.startswith("fusedce/") and k != "fusedce/tokens_per_sec":
                self._fce_maxima[k] = max(self._fce_maxima.get(k, v), v)
        self._fce_total_tokens += tok_sum
        self._fce_train_seconds += elapsed
        self._fce_start_interval()
        return out

    # ---- train / summary / model card ----------------------------------------------------------------------
    def train(self, *args, **kwargs):
        self._fce_reset_state()
        output = super().train(*args, **kwargs)
        self.fusedce_summary = self._fce_build_summary(output)
        name = self.fusedce_config.summary_filename
        if name and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, name), "w") as f:
                json.dump(self.fusedce_summary, f, indent=2, default=str)
        return output

    def _fce_build_summary(self, output) -> dict:
        import hf_fusedce

        probe = dict(self.fusedce_probe or {})
        for k in ("stock_peak_bytes", "fused_peak_bytes", "saved_bytes"):
            if probe.get(k) is not None:
                probe[k.replace("_bytes", "_mib")] = probe[k] / MiB
        dev = self._fce_device()
        mem_key = getattr(self, "_fce_mem_key", None) or "fusedce/rss_mib"
        cfg = asdict(self.fusedce_config)
        cfg["patch_options"] = {k: repr(v) for k, v in cfg["patch_options"].items()}
        return {
            "hf_fusedce_version": hf_fusedce.__version__,
            "patched": bool(self._fce_patched),
            "config": cfg,
            "device": str(dev),
            "world_size": int(self.accelerator.num_processes),
            "global_step": int(output.global_step),
            "train_loss": float(output.training_loss),
            "loss_head_probe": probe,
            "training": {
                "tokens": self._fce_total_tokens,
                "logged_seconds": self._fce_train_seconds,
                "tokens_per_sec": self._fce_total_tokens / self._fce_train_seconds if self._fce_train_seconds else None,
                mem_key.split("/")[1] + "_max": self._fce_maxima.get(mem_key),
                "step_peak_tensor_mib_max": self._fce_maxima.get("fusedce/step_peak_tensor_mib"),
            },
            "logged_intervals": self._fce_n_intervals,
            "intervals": self._fce_intervals,  # the last MAX_INTERVALS_KEPT
            "metric_keys": METRIC_KEYS,
        }

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if not (self.fusedce_config.model_card_section and self.is_world_process_zero()):
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if not os.path.exists(path):
            return
        section = self.memory_report_markdown()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "## Training memory" in text:
            return
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + section)

    def memory_report_markdown(self) -> str:
        s = self.fusedce_summary or {}
        probe = s.get("loss_head_probe") or self.fusedce_probe or {}
        lines = ["## Training memory", ""]
        patched = s.get("patched", self._fce_patched)
        import hf_fusedce

        lines.append(f"Trained with `hf_fusedce` {hf_fusedce.__version__} `FusedCETrainer`; training loss head "
                     f"{'fused (the [tokens x vocab] logits were never materialized)' if patched else 'stock'}.")
        lines.append("")

        def mib(b):
            return "n/a" if b is None else f"{b / MiB:,.1f} MiB"

        if probe.get("fused_peak_bytes") is not None:
            lines += ["| loss head (lm_head + cross-entropy, forward + backward) | peak memory |", "|---|---|",
                      f"| stock | {mib(probe.get('stock_peak_bytes')) if probe.get('stock_fits', True) else 'does not fit'} |",
                      f"| fused | {mib(probe.get('fused_peak_bytes'))} |",
                      f"| saved | {mib(probe.get('saved_bytes'))} |", "",
                      f"Measured once on the first training batch ({probe.get('tokens')} tokens, vocab "
                      f"{probe.get('vocab_size')}, {probe.get('dtype')}) with `{probe.get('method')}` on "
                      f"{probe.get('device')}.", ""]
        else:
            lines += [f"Loss-head probe: {probe.get('status', 'not run')}.", ""]
        t = s.get("training") or {}
        if t:
            if t.get("peak_alloc_mib_max") is not None:
                lines.append(f"- Peak allocated device memory during training: {t['peak_alloc_mib_max']:,.1f} MiB")
            if t.get("rss_peak_mib_max") is not None:
                lines.append(f"- Peak process RSS during training: {t['rss_peak_mib_max']:,.1f} MiB")
            if t.get("rss_mib_max") is not None:
                lines.append(f"- Process RSS at logging steps (max): {t['rss_mib_max']:,.1f} MiB")
            if t.get("step_peak_tensor_mib_max") is not None:
                lines.append(f"- Peak tensor memory inside a training step: {t['step_peak_tensor_mib_max']:,.1f} MiB")
            if t.get("tokens_per_sec"):
                lines.append(f"- Throughput: {t['tokens_per_sec']:,.0f} tokens/s over {s.get('world_size', 1)} process(es)")
            lines.append("")
        return "\n".join(lines)
