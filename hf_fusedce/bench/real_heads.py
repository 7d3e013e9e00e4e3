"""`hf-fusedce bench real-heads`: the loss heads of real models, implementations interleaved.

Cells (dtype, shape, N) come in priority order (shapes.real_heads_cells), so a --time-budget run spends its
time where it matters first and records every cell it did not reach as skipped, with the reason. Within a cell
the implementations are interleaved: round 0 runs each once inside the memory tracker (also the warm-up),
then `rounds` timed rounds call each implementation once in turn, so a load swing on the shared machine hits
them all alike; the median over rounds is reported, with the load average per cell. When the time budget ends
before a timed round, the memory round's single cold call is the time, and the record says so. The floor is the
3-GEMM implementation timed in the same rounds (x 3-GEMM); --gemm-floor also measures the blocked GEMM rate.

An implementation that materializes N x V logits (stock, the 3-GEMM floor) is skipped when its tensors would
not fit in the RAM available at that moment (the kernel's OOM killer would take down the bench, or a neighbour):
the record says how much it needed and how much there was.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from hf_fusedce.memory import available_host_bytes, measure_peak, stock_head_peak_bytes

from .reference import chunked_reference
from .runner import (TIME_SKIP, _brief, _impl_fields, _step, environment, free_memory, gemm_rate, is_oom, log,
                     make_inputs, record_peak_and_loss, sync)
from .shapes import DTYPE_MODES

RAM_HEADROOM = 0.85  # use at most this share of MemAvailable for one implementation's tensors


def needed_bytes(impl, n: int, v: int, d: int, mode) -> int | None:
    """Rough tensor bytes an implementation needs beyond the inputs, for the ones that build N x V."""
    s = mode.compute_dtype.itemsize
    if impl.kind == "stock" or impl.compiled:  # torch.compile of the stock loss still builds the logits
        return stock_head_peak_bytes(n, v, d, s, autocast=mode.autocast_dtype is not None)
    if impl.name == "floor":
        return 2 * n * v * s + v * d * 4
    return None


def _skip_reason(impl, fn, shape, n, mode) -> str | None:
    if isinstance(fn, str):
        return fn
    if shape.softcap is not None and not impl.softcap:
        return "skipped: no final-logit softcapping option (the Gemma 2 head needs it)"
    need, avail = needed_bytes(impl, n, shape.v, shape.d, mode), available_host_bytes()
    if need is not None and avail is not None and need > RAM_HEADROOM * avail:
        return (f"skipped: needs ~{need / 2**30:.1f} GiB for its N x V tensors, {avail / 2**30:.1f} GiB RAM "
                "available at the time (the OOM killer would end the bench)")
    return None


def _memory_round(impl, fn, h, w, y, mode, device, ref) -> dict:
    rec: dict = {"status": "ok"}
    try:
        if impl.compiled:  # compile first, outside the reading: the compiler's own memory is not the head's
            t0 = time.perf_counter()
            _step(fn, h, w, y, mode, device)
            sync(device)
            rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            h.grad = w.grad = None
        free_memory(device)
        t0 = time.perf_counter()
        with measure_peak(device, compiled=impl.compiled) as reading:
            loss = _step(fn, h, w, y, mode, device)
        rec["memory_round_ms"] = (time.perf_counter() - t0) * 1e3
        record_peak_and_loss(rec, reading, loss, impl, h, w, ref)
        del loss
    except Exception as err:  # noqa: BLE001 - every failure becomes an honest record
        rec = {"status": "oom" if is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        err = None
    finally:
        h.grad = w.grad = None
        free_memory(device)
    return rec


def run_cells(cells, impls, device, cfg, sink, rounds: int = 2, explicit: bool = False, ref_max_n: int = 1024,
              gemm_floor: bool = False, peer_rounds: int | None = None):
    """cells: [(dtype key, Shape, N)] in the order to run. Calls sink(record) per (cell, impl).
    peer_rounds: timed rounds for the peers (kind "peer"), if fewer than `rounds`: a peer at 5-10x the floor
    would otherwise spend most of a cell's time; each record states its own number of timed rounds."""
    env = environment(device)
    resolved = {impl.name: impl.resolve(device, explicit) for impl in impls}
    for dt_key, shape, n in cells:
        mode = DTYPE_MODES[dt_key]
        base = {**env, "record": "op", "shape": shape.name, "N": n, "D": shape.d, "V": shape.v,
                "softcap": shape.softcap, "dtype": mode.name, "logits_bytes_bf16": n * shape.v * 2,
                "timing": f"interleaved: 1 memory/warm-up round, then {rounds} timed rounds, median"}
        log(f"[bench] {mode.name} {shape.name} N={n} D={shape.d} V={shape.v} softcap={shape.softcap}")
        if cfg.out_of_time():
            for impl in impls:
                sink({**base, **_impl_fields(impl, device), "status": TIME_SKIP})
            continue
        h, w, y = make_inputs(shape, n, mode, device, cfg.seed)
        base["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
        if gemm_floor:  # 2 more passes of 2NDV: on a loaded 2-core CPU the 3-GEMM floor impl is the floor
            base["gemm_tflops"] = gemm_rate(h, w, mode, device, repeats=1, blocks=(1024,))
        ref = None
        if n <= ref_max_n and cfg.ref != "none" and shape.softcap is None:
            ref = chunked_reference(h.detach(), w.detach(), y, budget_bytes=256 << 20)
        recs, fns = {}, {}
        for impl in impls:
            fn = resolved[impl.name]
            if not isinstance(fn, str) and shape.softcap is not None and impl.softcap:
                fn = (lambda f: lambda a, b, c: f(a, b, c, softcap=shape.softcap))(fn)
            why = _skip_reason(impl, fn, shape, n, mode)
            if why is None and cfg.out_of_time():
                why = TIME_SKIP
            if why:
                recs[impl.name] = {"status": why}
                continue
            recs[impl.name] = _memory_round(impl, fn, h, w, y, mode, device, ref)
            if recs[impl.name]["status"] == "ok":
                fns[impl.name] = fn
                recs[impl.name]["times_ms"] = []
        kinds = {impl.name: impl.kind for impl in impls}
        for round_index in range(rounds):
            if cfg.out_of_time():
                break
            for name, fn in fns.items():
                if cfg.out_of_time():
                    break
                if kinds[name] == "peer" and peer_rounds is not None and round_index >= peer_rounds:
                    continue
                h.grad = w.grad = None
                sync(device)
                t0 = time.perf_counter()
                _step(fn, h, w, y, mode, device)
                sync(device)
                recs[name]["times_ms"].append((time.perf_counter() - t0) * 1e3)
                h.grad = w.grad = None
        base["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        for impl in impls:
            rec = {**base, **_impl_fields(impl, device), **recs[impl.name]}
            times = rec.get("times_ms")
            if rec["status"] == "ok":
                if times:
                    rec.update(fwd_bwd_ms=statistics.median(times), repeats=len(times), warmup=1)
                    if len(times) < rounds and impl.kind == "peer" and peer_rounds is not None:
                        rec["timing"] = (f"interleaved: 1 memory/warm-up round, then {len(times)} timed round(s) "
                                         f"(--peer-rounds {peer_rounds}), median")
                else:  # the one call there was: cold, under the memory tracker; said so in the record
                    rec.update(fwd_bwd_ms=rec["memory_round_ms"], repeats=1, warmup=0,
                               timing="one cold call under the memory tracker (time budget spent before a "
                                      "timed round)")
            log(f"[bench]   {impl.name:14s} {_brief(rec)}")
            sink(rec)
        del h, w, y, ref
        free_memory(device)


DEFAULT_IMPLS = ("ours-torch", "stock", "stock-compiled", "floor-blocked", "floor", "trl-chunked", "torch-lce", "liger",
                 "cce-exact")
CUDA_NS = (4096, 8192, 16384, 65536)


def cuda_model_table(shapes, ns=CUDA_NS, policies=("auto", "native")) -> str:
    """Markdown: the CUDA roofline model's default budget (ops/planning/cost_model.choose_budget) at each real head, bf16,
    and its modelled H100 / A100 time over the floor and overhead. Arithmetic, never run on a GPU."""
    from hf_fusedce.ops.planning import cost_model as cm

    lines = ["### CUDA cost model picks at the real heads (bf16; a model, never run on a GPU)", "",
             f"Peak rates assumed: H100 {cm.H100.flops / 1e12:.0f} TFLOP/s, {cm.H100.hbm / 1e12:.2f} TB/s; "
             f"A100 {cm.A100.flops / 1e12:.0f} TFLOP/s, {cm.A100.hbm / 1e12:.2f} TB/s. Softcapping adds no GEMM.",
             "", "| head | D | V | N | dW policy | budget MiB | chunks x rows | dW acc | H100 ms | x floor | "
             "A100 ms | x floor | overhead MiB |", "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for n in ns:
            for pol in policies:
                b = cm.choose_budget(n, shape.d, shape.v, torch.bfloat16, dw_accumulation=pol)
                h = cm.estimate(n, shape.d, shape.v, torch.bfloat16, b, cm.H100, pol)
                a = cm.estimate(n, shape.d, shape.v, torch.bfloat16,
                                cm.choose_budget(n, shape.d, shape.v, torch.bfloat16, cm.A100, pol), cm.A100, pol)
                lines.append(f"| {shape.name} | {shape.d} | {shape.v} | {n} | {pol} | {b >> 20} | {h.chunks} x "
                             f"{h.rows} | {h.dw_dtype} | {h.seconds * 1e3:.1f} | {h.x_floor:.3f} | "
                             f"{a.seconds * 1e3:.1f} | {a.x_floor:.3f} | {h.overhead_bytes / 2**20:,.0f} |")
    lines += ["", "A100 columns use the A100's own pick (the H100 pick's budget is the one shown)."]
    return "\n".join(lines) + "\n"


def cpu_plan_table(cells) -> str:
    """Markdown: the CPU plan (ops/planning/cpu_plan.py) for each cell as this process ran it (the machine it
    measured, cached from the run), the stored profile's pick, and the old fixed 32 MiB."""
    from hf_fusedce.ops.planning import cpu_plan as cp

    lines = ["### CPU plan per cell (ops/planning/cpu_plan.py): as run in this process, and from the stored profile",
             "", "| head | dtype | N | machine | budget MiB | chunks x rows | dW acc | chunk MiB | model x floor | "
             "stored profile: chunks x rows | old 32 MiB: rows, model x floor |",
             "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for dt_key, shape, n in cells:
        dtype = DTYPE_MODES[dt_key].compute_dtype
        machine = cp.machine_for(n, shape.d, shape.v, dtype)
        e = cp.choose(n, shape.d, shape.v, dtype, machine)
        stored = cp.choose(n, shape.d, shape.v, dtype)
        old = cp.estimate(n, shape.d, shape.v, dtype, cp.FIXED_BUDGET_BYTES)
        lines.append(f"| {shape.name} | {dt_key} | {n} | {machine.source} | {e.budget_bytes / 2**20:.0f} | "
                     f"{e.chunks} x {e.rows} | {e.dw_dtype} | {e.chunk_bytes / 2**20:.0f} | {e.x_floor:.2f} | "
                     f"{stored.chunks} x {stored.rows} | {old.rows}, {old.x_floor:.2f} |")
    return "\n".join(lines) + "\n"
