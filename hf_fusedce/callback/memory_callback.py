"""`FusedCEMemoryCallback`: measured memory and throughput for any `transformers.Trainer` (TRL's included).

    from hf_fusedce import FusedCEMemoryCallback
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds)   # or Trainer, DPOTrainer, FusedCETrainer...
    memory = FusedCEMemoryCallback().attach(trainer)   # first in the callback list: every logger gets its keys
    trainer.train()

What it does:
- at every training log, adds the keys of `METRIC_KEYS` to the logs (console, `log_history`, and the loggers
  that come after it in the callback list: `attach` puts it first), reduced across ranks (max for memory,
  sum for tokens);
- once, after the first optimizer step, a probe measures the fused loss head (`hf_fusedce.memory.measure_peak`)
  on that batch's token count, vocabulary, dtype and labels, and gives the stock head from its exact
  allocation formula (`hf_fusedce.memory.stock_head_peak_bytes`): the [tokens x vocab] logits are never
  allocated unless `FusedCEConfig(stock_head="measure")` asks to measure them, and even then only when they
  provably fit (the formula against free memory);
- at the end of training, `<output_dir>/fusedce_summary.json`, and a "Training memory" section appended to
  `<output_dir>/README.md` when a model card is there (`add_model_card_section` does it on demand).
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
from transformers import TrainerCallback

from .. import memory

MiB = 2**20
MAX_INTERVALS_KEPT = 2000
CARD_HEADING = "## Training memory"

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


def _is_partitioned(weight) -> bool:
    """ZeRO-3 leaves an empty partition outside the module's hooks; FSDP2 / TP hold a DTensor shard."""
    from torch.distributed.tensor import DTensor

    return weight.numel() == 0 or isinstance(weight, DTensor) or hasattr(weight, "ds_shape")


def _fused_op_kwargs(options: dict) -> dict:
    from ..ops import fused_linear_cross_entropy

    accepted = set(inspect.signature(fused_linear_cross_entropy).parameters) - {"hidden", "weight", "targets"}
    return {k: v for k, v in options.items() if k in accepted}


def stock_loss_head(hidden, weight, targets, n_valid, autocast_dtype: torch.dtype | None = None):
    """Forward + backward of the stock head as Trainer runs it: forward (under autocast when mixed precision)
    `lm_head`, then what `ForCausalLMLoss` does (float32 upcast, cross-entropy summed over tokens, divided by
    their count); backward outside autocast. Allocates the [tokens x vocab] logits."""
    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = F.linear(hidden, weight)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum") / n_valid
        del logits
    loss.backward()


def fused_loss_head(hidden, weight, targets, n_valid, autocast_dtype: torch.dtype | None = None, **options):
    """The same, with the fused op (`options`: its keyword arguments, e.g. chunk_budget_bytes)."""
    from ..ops import fused_linear_cross_entropy

    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = fused_linear_cross_entropy(hidden, weight, targets, num_items_in_batch=n_valid, **options)
    loss.backward()


def _fits(need: int, device: torch.device) -> tuple[bool, str]:
    """Whether `need` bytes provably fit in free memory (80% of it): CUDA free memory, or host MemAvailable."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = memory.available_host_bytes()
        if free is None:
            return False, "free host memory is unknown (no /proc/meminfo)"
    if need <= 0.8 * free:
        return True, ""
    return False, f"needs {need / 2**30:.2f} GiB (formula) with {free / 2**30:.2f} GiB free"


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

    # ---- state --------------------------------------------------------------------------------------------
    def _reset(self):
        self.probe, self.summary = None, None
        self._first_batch: dict | None = None
        self._device = torch.device("cpu")
        self._mem_key = "fusedce/rss_mib"
        self._t0 = None
        self._tokens = 0  # python int or device tensor, summed lazily (one sync per log)
        self._carry_peak = 0  # interval peak read before the probe reset the counters
        self._step_tracker = None
        self._step_tensor_peak = 0
        self._intervals: list[dict] = []
        self._n_intervals = 0
        self._maxima: dict[str, float] = {}
        self._total_tokens = 0.0
        self._seconds = 0.0
        self._patched = False

    def _start_interval(self):
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
            self._mem_key = "fusedce/peak_alloc_mib"
        else:
            self._mem_key = "fusedce/rss_peak_mib" if memory.reset_rss_peak() else "fusedce/rss_mib"
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._carry_peak = 0
        self._step_tensor_peak = 0

    def _memory_now(self) -> int:
        if self._device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self._device))
        if self._mem_key == "fusedce/rss_peak_mib":
            return int(memory.rss_peak_bytes() or 0)
        return memory.rss_bytes()

    # ---- training events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..hf.patching import is_patched

        self._reset()
        self._device = args.device
        self._patched = bool(model is not None and is_patched(model))
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        self._start_interval()

    def _see_batch(self, module, args, kwargs):
        """Counts training tokens; keeps the first training batch's labels for the probe. Reads only."""
        if not module.training:
            return
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None:
            return
        if mask is not None and mask.shape == ids.shape:
            self._tokens = self._tokens + mask.detach().sum()  # stays on device until the next log
        else:
            self._tokens = self._tokens + ids.numel()
        if self._first_batch is None:
            self._first_batch = {"labels": labels, "input_ids": ids, "model": module}

    def on_step_begin(self, args, state, control, **kwargs):
        if self.config.track_step_tensors and self._device.type != "cuda" and self._step_tracker is None:
            self._step_tracker = memory.LiveTensorTracker()
            self._step_tracker.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._stop_step_tracker()

    def _stop_step_tracker(self):
        if self._step_tracker is not None:
            self._step_tracker.__exit__(None, None, None)
            self._step_tensor_peak = max(self._step_tensor_peak, self._step_tracker.peak_bytes)
            self._step_tracker = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe is None and self.config.memory_probe and self._first_batch is not None:
            # The probe's own measurement resets the CUDA peak: carry the interval's peak so far across it.
            carry = self._memory_now()
            self.probe = self._run_probe(args)
            self._start_interval_memory_only()
            self._carry_peak = carry

    def _start_interval_memory_only(self):
        t0, tokens, step_peak = self._t0, self._tokens, self._step_tensor_peak
        self._start_interval()
        self._t0, self._tokens, self._step_tensor_peak = t0, tokens, step_peak

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.config.log_metrics and logs is not None and "loss" in logs and self._t0 is not None):
            return
        metrics = self._interval_metrics(state, logs)
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(metrics)  # Trainer.log appended its copy before calling the callbacks

    def on_train_end(self, args, state, control, **kwargs):
        self._stop_step_tracker()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.summary = self._build_summary(args, state)
        if not state.is_world_process_zero:
            return
        if self.config.summary_filename:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, self.config.summary_filename), "w") as f:
                json.dump(self.summary, f, indent=2, default=str)
        if self.config.model_card_section:
            self.add_model_card_section(args.output_dir)

    # ---- the probe ----------------------------------------------------------------------------------------
    def _run_probe(self, args) -> dict:
        batch, self._first_batch = self._first_batch, {}
        result: dict[str, Any] = {"device": str(self._device), "status": None}
        try:
            result.update(self._probe_batch(batch, args))
        except Exception as err:  # a failing probe must never stop training
            result["status"] = f"probe failed: {type(err).__name__}: {err}"
        return _reduce_probe(result, self._device)

    def _probe_batch(self, batch, args) -> dict:
        from ..hf.patching import unwrap

        ref = batch["labels"] if batch["labels"] is not None else batch["input_ids"]
        if ref is None or ref.dim() != 2:
            return {"status": "skipped: the first batch has no 2-D labels/input_ids"}
        if batch["labels"] is not None:  # what the model trains on: shifted left, -100 at each row's end
            targets = F.pad(ref[:, 1:], (0, 1), value=-100).reshape(-1).long()
        else:
            targets = ref.reshape(-1).long()
        weight = unwrap(batch["model"]).get_output_embeddings().weight
        vocab, hidden = tuple(getattr(weight, "ds_shape", None) or weight.shape)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            "bf16" if args.bf16 else "fp16" if args.fp16 else "", weight.dtype)
        n = targets.numel()
        stock_bytes = memory.stock_head_peak_bytes(n, vocab, hidden, min(compute.itemsize, 4),
                                                   autocast=compute != weight.dtype,
                                                   weight_requires_grad=weight.requires_grad)
        out = {"tokens": n, "label_tokens": int((targets != -100).sum()), "vocab_size": int(vocab),
               "hidden_size": int(hidden), "dtype": str(weight.dtype).replace("torch.", ""),
               "compute_dtype": str(compute).replace("torch.", ""), "stock_formula_bytes": stock_bytes,
               "stock_peak_bytes": None, "fused_peak_bytes": None}
        if _is_partitioned(weight):
            out["status"] = ("fused head not measured: the lm_head weight is partitioned (ZeRO-3 / FSDP / TP) "
                             "outside the forward; stock head from its formula")
            return out
        device = weight.device
        g = torch.Generator(device=device).manual_seed(0)  # the global RNG is left untouched
        h = torch.randn(n, hidden, generator=g, device=device, dtype=weight.dtype).requires_grad_()
        w = weight.detach().requires_grad_(weight.requires_grad)
        targets = targets.to(device)
        n_valid = max(out["label_tokens"], 1)
        cast = compute if compute != weight.dtype else None
        with memory.measure_peak(device) as fused:
            fused_loss_head(h, w, targets, n_valid, cast, **_fused_op_kwargs(self.config.patch_options))
        out.update(fused_peak_bytes=int(fused.peak_bytes), method=fused.method, status="measured fused; stock formula")
        h.grad = None
        if self.config.stock_head == "measure":
            fits, why = _fits(stock_bytes, device)
            if fits:
                with memory.measure_peak(device) as stock:
                    stock_loss_head(h, w, targets, n_valid, cast)
                out.update(stock_peak_bytes=int(stock.peak_bytes), status="measured fused and stock")
            else:
                out["status"] = f"stock head not run: {why}"
                out["stock_fits"] = False
        del h, w
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    # ---- logging ------------------------------------------------------------------------------------------
    def _interval_metrics(self, state, logs) -> dict:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tokens = self._tokens
        tokens = tokens.double() if isinstance(tokens, torch.Tensor) else torch.tensor(float(tokens))
        mem = max(self._memory_now(), self._carry_peak)
        tok_sum, mem, step_peak = _all_reduce([tokens.to(self._device)], [mem, self._step_tensor_peak], self._device)
        out = {"fusedce/tokens_per_sec": tok_sum / elapsed, self._mem_key: mem / MiB}
        if self.config.track_step_tensors and self._device.type != "cuda":
            out["fusedce/step_peak_tensor_mib"] = step_peak / MiB
        out.update(probe_metrics(self.probe or {}))
        record = {"step": state.global_step, "loss": logs.get("loss"), "seconds": elapsed, "tokens": tok_sum,
                  **{k: v for k, v in out.items() if not k.startswith("fusedce/head_")}}
        self._intervals.append(record)
        del self._intervals[:-MAX_INTERVALS_KEPT]
        self._n_intervals += 1
        for k, v in record.items():
            if k.startswith("fusedce/") and k != "fusedce/tokens_per_sec":
                self._maxima[k] = max(self._maxima.get(k, v), v)
        self._total_tokens += tok_sum
        self._seconds += elapsed
        self._start_interval()
        return out

    # ---- summary and model card ---------------------------------------------------------------------------
    def _build_summary(self, args, state) -> dict:
        import hf_fusedce

        probe = dict(self.probe or {})
        for k in ("stock_peak_bytes", "stock_formula_bytes", "fused_peak_bytes"):
            if probe.get(k) is not None:
                probe[k.replace("_bytes", "_mib")] = probe[k] / MiB
        saved = probe_metrics(probe).get("fusedce/head_saved_mib")
        if saved is not None:
            probe["saved_mib"] = saved
        cfg = asdict(self.config)
        cfg["patch_options"] = {k: repr(v) for k, v in cfg["patch_options"].items()}
        return {
            "hf_fusedce_version": hf_fusedce.__version__,
            "patched": self._patched,
            "config": cfg,
            "device": str(self._device),
            "world_size": int(args.world_size),
            "global_step": int(state.global_step),
            "train_loss": next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), None),
            "loss_head_probe": probe,
            "training": {
                "tokens": self._total_tokens,
                "logged_seconds": self._seconds,
                "tokens_per_sec": self._total_tokens / self._seconds if self._seconds else None,
                self._mem_key.split("/")[1] + "_max": self._maxima.get(self._mem_key),
                "step_peak_tensor_mib_max": self._maxima.get("fusedce/step_peak_tensor_mib"),
            },
            "logged_intervals": self._n_intervals,
            "intervals": self._intervals,  # the last MAX_INTERVALS_KEPT
            "metric_keys": METRIC_KEYS,
        }

    def add_model_card_section(self, output_dir: str) -> bool:
        """Append the "Training memory" section to `output_dir/README.md` (once). False when there is no card."""
        path = os.path.join(output_dir, "README.md")
        if not os.path.exists(path):
            return False
        with open(path, encoding="utf-8") as f:
            if CARD_HEADING in f.read():
                return True
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + self.memory_report_markdown())
        return True

    def memory_report_markdown(self) -> str:
        import hf_fusedce

        s = self.summary or {}
        probe = s.get("loss_head_probe") or self.probe or {}
        head = "fused (the [tokens x vocab] logits were never materialized)" if s.get("patched") else "stock"
        lines = [CARD_HEADING, "", f"Trained with `hf_fusedce` {hf_fusedce.__version__}; training loss head {head}.",
                 ""]

        def mib(b):
            return "n/a" if b is None else f"{b / MiB:,.1f} MiB"

        if probe.get("fused_peak_bytes") is not None:
            stock = (f"{mib(probe['stock_peak_bytes'])} (measured)" if probe.get("stock_peak_bytes") is not None
                     else f"{mib(probe.get('stock_formula_bytes'))} (exact allocation formula, not run)")
            lines += ["| loss head (lm_head + cross-entropy, forward + backward) | peak memory |", "|---|---|",
                      f"| stock | {stock} |", f"| fused | {mib(probe['fused_peak_bytes'])} (measured) |", "",
                      f"On the first training batch ({probe.get('tokens')} tokens, vocab {probe.get('vocab_size')}, "
                      f"{probe.get('compute_dtype')}), measured with `{probe.get('method')}` on "
                      f"{probe.get('device')}.", ""]
        else:
            lines += [f"Loss-head probe: {probe.get('status', 'not run')}.", ""]
        t = s.get("training") or {}
        described = {"peak_alloc_mib_max": "Peak allocated device memory during training",
                     "rss_peak_mib_max": "Peak process RSS during training",
                     "rss_mib_max": "Process RSS at logging steps (max)",
                     "step_peak_tensor_mib_max": "Peak tensor memory inside a training step"}
        lines += [f"- {text}: {t[k]:,.1f} MiB" for k, text in described.items() if t.get(k) is not None]
        if t.get("tokens_per_sec"):
            lines.append(f"- Throughput: {t['tokens_per_sec']:,.0f} tokens/s over {s.get('world_size', 1)} "
                         "process(es)")
        return "\n".join(lines) + "\n"


def probe_metrics(probe: Mapping) -> dict:
    """The `fusedce/head_*` keys of a probe result."""
    fused = probe.get("fused_peak_bytes")
    if fused is None:
        return {}
    out = {"fusedce/head_fused_peak_mib": fused / MiB,
           "fusedce/head_stock_mib_formula": probe["stock_formula_bytes"] / MiB}
    stock = probe.get("stock_peak_bytes")
    if stock is not None:
        out["fusedce/head_stock_peak_mib"] = stock / MiB
    out["fusedce/head_saved_mib"] = ((stock if stock is not None else probe["stock_formula_bytes"]) - fused) / MiB
    return out


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(sums: list[torch.Tensor], maxima: list[float], device) -> tuple[float, ...]:
    """Sum the first values, max the rest, over ranks (no-op in a single process)."""
    sums_t = torch.stack([s.to(device, torch.float64).reshape(()) for s in sums])
    max_t = torch.tensor([float(m) for m in maxima], device=device, dtype=torch.float64)
    if _world() > 1:
        import torch.distributed as dist

        dist.all_reduce(sums_t, op=dist.ReduceOp.SUM)
        dist.all_reduce(max_t, op=dist.ReduceOp.MAX)
    return tuple(float(x) for x in torch.cat([sums_t, max_t]).tolist())


def _reduce_probe(result: dict, device) -> dict:
    """Max over ranks of the probe's sizes (every rank probes its own first batch)."""
    if _world() <= 1:
        return result
    keys = ("tokens", "stock_formula_bytes", "stock_peak_bytes", "fused_peak_bytes")
    _, *vals = _all_reduce([torch.zeros(())], [-1 if result.get(k) is None else result[k] for k in keys], device)
    result = dict(result, ranks=_world())
    for k, v in zip(keys, vals):
        result[k] = None if v < 0 else int(v)
    return result
