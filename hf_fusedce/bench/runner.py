"""Timing and memory of one implementation at one (shape, N, dtype): the measurement loop of `hf-fusedce bench`.

Time: forward + backward of `fn` (under the dtype mode's autocast) then `loss.backward()`, median of
`repeats` timed calls after `warmup` untimed ones; CUDA events on GPU, perf_counter on CPU. Gradients are
set to None before every call so each call allocates them anew, as a training step does.
Memory: one more call inside `hf_fusedce.memory.measure_peak`, so the peak is measured above the inputs
(hidden, weight, targets exist before it starts); `peak_above_grads_bytes` subtracts the gradients of hidden
and weight, which every implementation must return.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from hf_fusedce.memory import measure_peak

from .impls import Impl
from .reference import Reference, chunked_reference, compare
from .report import MEMORY_KEY, MEMORY_LABEL
from .shapes import DtypeMode, Shape

OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


TIME_SKIP = "skipped: time budget (--time-budget) spent"


@dataclass
class BenchConfig:
    warmup: int = 2
    repeats: int = 10
    min_repeats: int = 3
    max_seconds: float = 3.0  # stop timing an impl after this many seconds (once min_repeats are done)
    ref: str = "min"  # float64 reference errors at: "min" (smallest N of each shape), "all", "none"
    ref_max_logits: int = 2**31  # skip the reference when N*V exceeds this (float64 work grows with it)
    seed: int = 0
    deadline: float | None = None  # time.perf_counter() after which measurements are skipped (--time-budget)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, OOM_ERRORS):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Fields repeated in every record: where and with what the number was taken."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
                        break
        except OSError:
            pass
    return {
        "device": name,
        "device_type": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "hf_fusedce": _version("hf_fusedce"),
        "cpu_native_softcap_rows": _cpu_native_status() if device.type == "cpu" else None,
        # CPU timings on a shared machine are only as good as its load: recorded so a reader can judge
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _cpu_native_status() -> str:
    from hf_fusedce.ops.ce import cpu_native
    return cpu_native.status()


def make_inputs(shape: Shape, n: int, mode: DtypeMode, device: torch.device, seed: int):
    """hidden ~ N(0,1), weight scaled so logits have std ~2 (peaked like a trained head), all targets valid."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, shape.d, device=device, generator=gen).to(mode.param_dtype).requires_grad_()
    w = (torch.randn(shape.v, shape.d, device=device, generator=gen) * (2.0 / shape.d ** 0.5))
    w = w.to(mode.param_dtype).requires_grad_()
    y = torch.randint(0, shape.v, (n,), device=device, generator=gen)
    return h, w, y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, h, w, y, mode: DtypeMode, device):
    h.grad = None
    w.grad = None
    with mode.autocast(device):
        loss = fn(h, w, y)
    loss.backward()
    return loss


def _time_calls(fn, h, w, y, mode, device, cfg: BenchConfig) -> list[float]:
    times: list[float] = []
    t_begin = time.perf_counter()
    for i in range(max(cfg.repeats, 1)):
        h.grad = w.grad = None
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, h, w, y, mode, device)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _step(fn, h, w, y, mode, device)
            times.append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= cfg.min_repeats and time.perf_counter() - t_begin > cfg.max_seconds:
            break
    return times


def record_peak_and_loss(rec: dict, reading, loss, impl: Impl, h, w, ref: Reference | None) -> None:
    """The record's memory fields (peak, the gradients' bytes, the peak above them) and, for a loss head (not the
    GEMM floor), its loss and its error against the float64 reference."""
    grad_bytes = sum(t.numel() * t.element_size() for t in (h, w))
    rec.update({"peak_mem_bytes": int(reading.peak_bytes), "grad_bytes": grad_bytes,
                "peak_above_grads_bytes": int(reading.peak_bytes) - grad_bytes, "mem_method": reading.method})
    if impl.kind != "floor":
        rec["loss"] = float(loss.detach().float())
        if ref is not None:
            rec.update(compare(ref, rec["loss"], h.grad, w.grad))
            rec["reference"] = "float64, chunked, same inputs"


def measure(impl: Impl, fn, h, w, y, mode: DtypeMode, device, cfg: BenchConfig, ref: Reference | None) -> dict:
    """Times and measures one implementation; returns the measurement part of the record."""
    rec: dict = {"status": "ok"}
    try:
        first_ms = None
        for i in range(cfg.warmup):
            sync(device)
            t0 = time.perf_counter()
            _step(fn, h, w, y, mode, device)
            sync(device)
            if i == 0:  # holds a compiled peer's compile time (reported apart from its median)
                first_ms = (time.perf_counter() - t0) * 1e3
        times = _time_calls(fn, h, w, y, mode, device, cfg)
        h.grad = w.grad = None
        free_memory(device)
        with measure_peak(device, compiled=impl.compiled) as reading:
            loss = _step(fn, h, w, y, mode, device)
        rec.update({
            "fwd_bwd_ms": statistics.median(times),
            "times_ms": [round(t, 4) for t in times],
            "repeats": len(times),
            "warmup": cfg.warmup,
            "first_call_ms": first_ms,
        })
        record_peak_and_loss(rec, reading, loss, impl, h, w, ref)
        if hasattr(os, "getloadavg"):  # per measurement: CPU timings drift with the machine's load
            rec["loadavg_1m_at_measure"] = round(os.getloadavg()[0], 2)
        del loss
    except Exception as err:  # noqa: BLE001 - every failure becomes an honest record
        status = "oom" if is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        rec = {"status": status}
        err = None  # drop the traceback (it holds frames with tensors) before freeing
    finally:
        h.grad = w.grad = None
        free_memory(device)
    return rec


def run_matrix(shapes, ns, modes, impls, device, cfg: BenchConfig, sink, explicit: bool = False):
    """Calls sink(record) for every (mode, shape, N, impl), in that nesting. explicit: impls were named."""
    env = environment(device)
    resolved = {impl.name: impl.resolve(device, explicit) for impl in impls}
    for mode in modes:
        for shape in shapes:
            ref_ns = set(ns) if cfg.ref == "all" else ({min(ns)} if cfg.ref == "min" and ns else set())
            for n in ns:
                base = {**env, "record": "op", "shape": shape.name, "N": n, "D": shape.d, "V": shape.v,
                        "dtype": mode.name, "logits_bytes_bf16": n * shape.v * 2}
                log(f"[bench] {mode.name} {shape.name} N={n} D={shape.d} V={shape.v}")
                if cfg.out_of_time():
                    for impl in impls:
                        sink({**base, **_impl_fields(impl, device), "status": TIME_SKIP})
                    continue
                try:
                    h, w, y = make_inputs(shape, n, mode, device, cfg.seed)
                except Exception as err:  # noqa: BLE001
                    status = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"
                    err = None
                    free_memory(device)
                    for impl in impls:
                        sink({**base, **_impl_fields(impl, device), "status": f"{status} (creating inputs)"})
                    continue
                base["gemm_tflops"] = gemm_rate(h, w, mode, device)
                ref = None
                if n in ref_ns and n * shape.v <= cfg.ref_max_logits:
                    try:
                        ref = chunked_reference(h.detach(), w.detach(), y,
                                                budget_bytes=(2 << 30) if device.type == "cuda" else (256 << 20))
                    except Exception as err:  # noqa: BLE001
                        log(f"[bench]   reference skipped: {type(err).__name__}: {err}")
                        err = None
                        ref = None
                        free_memory(device)
                for impl in impls:
                    fn = resolved[impl.name]
                    rec = {**base, **_impl_fields(impl, device)}
                    if isinstance(fn, str):
                        rec["status"] = fn
                    elif cfg.out_of_time():
                        rec["status"] = TIME_SKIP
                    else:
                        rec.update(measure(impl, fn, h, w, y, mode, device, cfg, ref))
                    log(f"[bench]   {impl.name:14s} {_brief(rec)}")
                    sink(rec)
                del h, w, y, ref
                free_memory(device)


def gemm_rate(h, w, mode: DtypeMode, device, repeats: int = 3, blocks=(256, 1024, None)) -> float:
    """TFLOP/s of z = h W^T over all N rows in the mode's compute dtype, measured in this run beside the
    implementations: the rate behind the "x floor" column (6*N*D*V at this rate). The same FLOPs are timed in
    row blocks of several sizes (None: one GEMM), after one warm-up, and the fastest time is kept: the floor is
    the best the BLAS does here (on a CPU one unchunked GEMM streams its N x V output through memory and runs
    well below that, which would make the floor too lenient)."""
    dt = mode.compute_dtype
    hc, wc = h.detach().to(dt), w.detach().to(dt)
    n = hc.shape[0]
    best = float("inf")
    for block in blocks:
        step = n if block is None else min(block, n)
        for _ in range(repeats + 1):  # one extra pass for warm-up; the fastest pass counts
            sync(device)
            t0 = time.perf_counter()
            for start in range(0, n, step):
                z = hc[start:start + step] @ wc.t()
                del z
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * h.shape[0] * h.shape[1] * w.shape[0] / best / 1e12


def _impl_fields(impl: Impl, device) -> dict:
    return {"impl": impl.name, "kind": impl.kind, "strategy": impl.describe(device), "exact_grads": impl.exact}


def _brief(rec: dict) -> str:
    if rec.get("status") != "ok":
        return rec.get("status", "?")
    s = f"{rec['fwd_bwd_ms']:9.2f} ms  {MEMORY_LABEL} {rec[MEMORY_KEY] / 2**20:9.1f} MiB"
    if rec.get("dw_rel_err") is not None:
        s += f"  err loss {rec['loss_rel_err']:.1e} dh {rec['dh_rel_err']:.1e} dW {rec['dw_rel_err']:.1e}"
    return s
