"""Measuring the loss head once, on the first training batch: the fused head is run and measured
(`hf_fusedce.memory.measure_peak`) on that batch's token count, vocabulary, dtype and labels; the stock head is
given by its exact allocation formula (`hf_fusedce.memory.stock_head_peak_bytes`) and run only when
`FusedCEConfig(stock_head="measure")` asks and the formula says it fits in free memory."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .. import memory
from .config import MiB, FusedCEConfig
from .ranks import all_reduce, world


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


def run_probe(batch: dict, args, config: FusedCEConfig, device) -> dict:
    """The probe on `batch` ({"labels", "input_ids", "model"}), reduced over ranks; never raises."""
    result: dict[str, Any] = {"device": str(device), "status": None}
    try:
        result.update(_probe_batch(batch, args, config))
    except Exception as err:  # a failing probe must never stop training
        result["status"] = f"probe failed: {type(err).__name__}: {err}"
    return _reduce_probe(result, device)


def _probe_batch(batch, args, config: FusedCEConfig) -> dict:
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
        fused_loss_head(h, w, targets, n_valid, cast, **_fused_op_kwargs(config.patch_options))
    out.update(fused_peak_bytes=int(fused.peak_bytes), method=fused.method, status="measured fused; stock formula")
    h.grad = None
    if config.stock_head == "measure":
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


def _reduce_probe(result: dict, device) -> dict:
    """Max over ranks of the probe's sizes (every rank probes its own first batch)."""
    if world() <= 1:
        return result
    keys = ("tokens", "stock_formula_bytes", "stock_peak_bytes", "fused_peak_bytes")
    _, *vals = all_reduce([torch.zeros(())], [-1 if result.get(k) is None else result[k] for k in keys], device)
    result = dict(result, ranks=world())
    for k, v in zip(keys, vals):
        result[k] = None if v < 0 else int(v)
    return result
