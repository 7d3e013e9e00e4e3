"""Is it lean and fast: the bench's own measurement (bench/runner.run_matrix: the same timing loop and memory
readings, CUDA allocator statistics on a GPU, the live-tensor tracker on CPU) at one shape, for ours, stock and
every peer installed, plus the three GEMMs alone; and the cost model's prediction for this device beside it."""
from __future__ import annotations

import torch

from ..bench.impls import IMPLS
from ..bench.report import annotate
from ..bench.runner import BenchConfig, run_matrix
from ..bench.shapes import DTYPE_MODES, Shape
from .report import Check

_MiB = 1 << 20
PEERS = ("stock-compiled", "torch-lce", "liger", "cce-exact")


def case(device, quick: bool) -> tuple[Shape, int, str]:
    """On a GPU the head of TRL's published comparison (Qwen3.5: D=2048, V=248320; 16384 tokens, bf16), fewer
    tokens with --quick; on CPU a head small enough for its minutes, with logits at least twice its weight (at
    fewer tokens the CPU plan may hold all logits in one chunk: a chunk is bounded by the weight's size there)."""
    if device.type == "cuda":
        return Shape("qwen3.5-head", 2048, 248320), 4096 if quick else 16384, "bf16"
    return Shape("d512-v32000", 512, 32000), 1024 if quick else 2048, "fp32"


def measure(device, quick: bool) -> tuple[list[dict], tuple[Shape, int, str]]:
    shape, n, dtype_key = case(device, quick)
    ours = "ours-triton" if device.type == "cuda" else "ours-torch"
    names = [ours, "stock", *PEERS, "floor"]
    if quick and device.type != "cuda":
        names.remove("stock-compiled")  # compiling takes longer than the whole quick run on a CPU
    cuda = device.type == "cuda"
    cfg = BenchConfig(warmup=2 if cuda else 1, repeats=10 if cuda and not quick else 3, max_seconds=10.0, ref="none")
    records: list[dict] = []
    run_matrix([shape], [n], [DTYPE_MODES[dtype_key]], [IMPLS[k] for k in names], device, cfg, records.append,
               explicit=True)
    annotate(records)
    if quick and not cuda:
        records.append({"impl": "stock-compiled", "status": "skipped: --quick on CPU (compiling takes longer than "
                                                            "the quick run; the full run measures it)"})
    return records, (shape, n, dtype_key)


def memory_checks(records: list[dict], ours: str) -> list[Check]:
    """Peak above inputs and their gradients per implementation; ours must be below stock's."""
    by = {r["impl"]: r for r in records}
    stock = by.get("stock", {}).get("peak_above_grads_bytes")
    out = []
    for r in records:
        if r["impl"] == "floor":
            continue
        if r.get("status") != "ok":
            out.append(Check("memory", r["impl"], "skipped" if r["status"].startswith("skipped") else "info",
                             detail=r["status"]))
            continue
        figs = {"peak_above_inputs_mib": r["peak_above_grads_bytes"] / _MiB, "fwd_bwd_ms": r["fwd_bwd_ms"]}
        if stock:
            figs["vs stock"] = r["peak_above_grads_bytes"] / stock
        verdict = "info"
        if r["impl"] == ours and stock:
            verdict = "pass" if r["peak_above_grads_bytes"] < stock else "fail"
        out.append(Check("memory", r["impl"], verdict, figs,
                         "" if verdict != "fail" else "ours holds more memory than materialized logits"))
    return out


def time_checks(records: list[dict], ours: str, device, shape: Shape, n: int, dtype_key: str) -> list[Check]:
    by = {r["impl"]: r for r in records}
    mine, floor = by.get(ours, {}), by.get("floor", {})
    if mine.get("status") != "ok":
        return [Check("time", "ours vs the three GEMMs", "fail", detail=f"ours did not run: {mine.get('status')}")]
    checks = [Check("time", "ours vs the three GEMMs", "info",
                    {"ours_ms": mine["fwd_bwd_ms"], "three_gemms_ms": floor.get("fwd_bwd_ms"),
                     "x_3gemm": mine.get("x_3gemm"), "peers_ms": {k: r["fwd_bwd_ms"] for k, r in by.items()
                                                                  if r.get("status") == "ok" and k != ours}})]
    predicted, model = predicted_seconds(device, shape, n, dtype_key)
    if predicted is None:
        checks.append(Check("time", "cost model", "skipped", detail=model))
    else:
        checks.append(Check("time", "cost model", "info",
                            {"model": model, "predicted_ms": predicted * 1e3, "measured_ms": mine["fwd_bwd_ms"],
                             "measured / predicted": mine["fwd_bwd_ms"] / (predicted * 1e3)},
                            "the ratio corrects the model: send selftest.json back"))
    return checks


def predicted_seconds(device, shape: Shape, n: int, dtype_key: str) -> tuple[float | None, str]:
    """The modelled time of the op's default plan on this device (GPU: the roofline of the named GPU; CPU: the
    CPU plan's model of this machine)."""
    dtype = DTYPE_MODES[dtype_key].compute_dtype
    if device.type == "cuda":
        from ..ops.planning.cost_model import choose_budget, estimate, gpu_for
        gpu = gpu_for(torch.cuda.get_device_name(device))
        if gpu is None:
            return None, f"no model of {torch.cuda.get_device_name(device)} (known: H100, A100, MI300X, MI250X)"
        budget = choose_budget(n, shape.d, shape.v, dtype, gpu)
        return estimate(n, shape.d, shape.v, dtype, budget, gpu).seconds, gpu.name
    from ..ops.planning import cpu_plan
    budget = cpu_plan.default_budget(n, shape.d, shape.v, dtype)
    machine = cpu_plan.machine_for(n, shape.d, shape.v, dtype)
    return cpu_plan.estimate(n, shape.d, shape.v, dtype, budget, machine).seconds, "CPU plan (this machine)"
