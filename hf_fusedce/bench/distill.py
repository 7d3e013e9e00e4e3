"""`hf-fusedce bench distill`: the distillation head, ours vs TRL's chunked divergence vs both models' logits
materialized, in one process: time of forward + backward, peak memory, float64 error, and the GEMM floor.

Every implementation computes the same loss (TRL's generalized JSD, mean over tokens) from the student's hidden
states and head (gradients) and the teacher's (constants). Peak memory is what the step allocates above its inputs
(CUDA allocator / CPU live-tensor tracker); "above inputs+grads" also subtracts the gradients the step must return.
The floor is the four bare GEMMs every exact method needs (student logits, teacher logits, dh, dW: 8*N*D*V FLOPs
with Dt = D), timed on the same tensors. Timing is round-robin (each round runs every implementation once), so a
drifting machine load hits all of them alike. The float64 error is measured on the first 512 tokens.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass

import pandas as pd
import torch

from hf_fusedce.bench.report import JSON_NAME, MD_NAME, MEMORY_KEY, MEMORY_LABEL, markdown_table, mib
from hf_fusedce.bench.runner import environment, free_memory, log, sync
from hf_fusedce.memory import measure_peak
from hf_fusedce.ops import fused_linear_distillation, reference_linear_distillation
from hf_fusedce.testing import rel_err


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    dt: int
    v: int
    beta: float
    temperature: float
    dtype: torch.dtype


def _ours(s_h, s_w, t_h, t_w, case):
    return fused_linear_distillation(s_h, s_w, t_h, t_w, beta=case.beta, temperature=case.temperature)


def _trl(s_h, s_w, t_h, t_w, case):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    mask = torch.ones(1, s_h.shape[0], dtype=torch.long, device=s_h.device)
    return _chunked_divergence_loss(s_h[None], t_h[None], s_w, t_w, mask, case.beta,
                                    temperature=case.temperature)[0]


def _materialized(s_h, s_w, t_h, t_w, case):
    return reference_linear_distillation(s_h, s_w, t_h, t_w, beta=case.beta, temperature=case.temperature)


IMPLS = {"ours": _ours, "trl-chunked": _trl, "materialized": _materialized}


def make_inputs(case: Case, device, seed: int):
    """Student logits std ~2, teacher sharper (std ~3): peaked distributions like trained heads."""
    g = torch.Generator(device=device).manual_seed(seed)
    s_h = torch.randn(case.n, case.d, device=device, generator=g).to(case.dtype).requires_grad_()
    s_w = (torch.randn(case.v, case.d, device=device, generator=g) * (2.0 / case.d ** 0.5)).to(case.dtype)
    t_h = torch.randn(case.n, case.dt, device=device, generator=g).to(case.dtype)
    t_w = (torch.randn(case.v, case.dt, device=device, generator=g) * (3.0 / case.dt ** 0.5)).to(case.dtype)
    return s_h, s_w.requires_grad_(), t_h, t_w


def _step(fn, s_h, s_w, t_h, t_w, case):
    s_h.grad = s_w.grad = None
    loss = fn(s_h, s_w, t_h, t_w, case)
    loss.backward()
    return loss


def _floor_step(s_h, s_w, t_h, t_w, buf_s, buf_t, dh, dw):
    """The four GEMMs of any exact method, full size, into preallocated outputs."""
    with torch.no_grad():
        torch.mm(s_h, s_w.t(), out=buf_s)
        torch.mm(t_h, t_w.t(), out=buf_t)
        torch.mm(buf_s, s_w, out=dh)
        torch.mm(buf_s.t(), s_h, out=dw)


def measure_memory(name, case, inputs, device) -> dict:
    fn = IMPLS[name]
    s_h, s_w, _, _ = inputs
    free_memory(device)
    with measure_peak(device) as reading:
        _step(fn, *inputs, case)
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (s_h, s_w))
    s_h.grad = s_w.grad = None
    free_memory(device)
    return {"peak_mem_bytes": int(reading.peak_bytes), "grad_bytes": grad_bytes,
            "peak_above_grads_bytes": int(reading.peak_bytes) - grad_bytes, "mem_method": reading.method}


def time_round_robin(steps: dict, device, warmup, repeats) -> dict:
    """Each round times every implementation once, in turn: on a shared machine whose load drifts over minutes,
    every implementation then sees the same load (a run of one impl after the other would not)."""
    times = {name: [] for name in steps}
    loads = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - t0)
                loads[name].append(round(os.getloadavg()[0], 2))
    return {name: {"fwd_bwd_s": statistics.median(t), "times_s": [round(x, 4) for x in t],
                   "loadavg_1m_at_measure": loads[name]} for name, t in times.items()}


def float64_errors(name, case, inputs, rows) -> dict:
    """Loss, dh, dW of `name` on the first `rows` tokens vs the materialized definition in float64."""
    s_h, s_w, t_h, t_w = (t.detach()[:rows] if i != 1 and i != 3 else t.detach() for i, t in enumerate(inputs))
    out = {}
    for tag, fn, dtype in (("got", IMPLS[name], s_h.dtype), ("ref", _materialized, torch.float64)):
        h, w = s_h.to(dtype).requires_grad_(), s_w.to(dtype).requires_grad_()
        loss = fn(h, w, t_h.to(dtype), t_w.to(dtype), case)
        out[tag] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    return {f"rel_err_{k}": rel_err(a, b) for k, a, b in zip(("loss", "dh", "dw"), out["got"], out["ref"])}


def run_case(case: Case, device, *, warmup=1, repeats=3, err_rows=512, seed=0, impls=tuple(IMPLS)) -> list[dict]:
    inputs = make_inputs(case, device, seed)
    common = {"N": case.n, "D": case.d, "Dt": case.dt, "V": case.v, "beta": case.beta,
              "temperature": case.temperature, "dtype": str(case.dtype).replace("torch.", "")}
    s_h, s_w, t_h, t_w = (t.detach() for t in inputs)
    bufs = [torch.empty(case.n, case.v, dtype=case.dtype, device=device) for _ in range(2)]
    grads = torch.empty_like(s_h), torch.empty_like(s_w)
    floor = "floor (4 GEMMs, 8NDV)"
    steps = {name: (lambda fn=IMPLS[name]: _step(fn, *inputs, case)) for name in impls}
    steps[floor] = lambda: _floor_step(s_h, s_w, t_h, t_w, *bufs, *grads)
    log(f"[distill] timing {', '.join(steps)} round-robin, N={case.n} D={case.d} V={case.v} beta={case.beta}")
    timed = time_round_robin(steps, device, warmup, repeats)
    del bufs, grads
    records = []
    for name in (*impls, floor):
        rec = {**common, "record": "distill", "impl": name, "status": "ok", **timed[name]}
        if name != floor:
            log(f"[distill] memory and float64 error of {name}")
            rec.update(measure_memory(name, case, inputs, device))
            rec.update(float64_errors(name, case, inputs, min(err_rows, case.n)))
            rec["err_rows"] = min(err_rows, case.n)
        records.append(rec)
    _annotate(records)
    return records


def _annotate(records):
    by = {r["impl"]: r for r in records if r["status"] == "ok"}
    floor, trl, mat = by.get("floor (4 GEMMs, 8NDV)"), by.get("trl-chunked"), by.get("materialized")
    for r in records:
        if r["status"] != "ok":
            continue
        if floor:
            r["x_floor"] = r["fwd_bwd_s"] / floor["fwd_bwd_s"]
        if trl:
            r["x_trl"] = r["fwd_bwd_s"] / trl["fwd_bwd_s"]
        if mat and "peak_above_grads_bytes" in r:
            r["peak_above_grads_vs_materialized"] = r["peak_above_grads_bytes"] / mat["peak_above_grads_bytes"]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"loadavg {os.getloadavg()}"


def write(doc: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    json_path, md_path = os.path.join(out, JSON_NAME), os.path.join(out, MD_NAME)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(doc))
    return [json_path, md_path]


DISTILL_COLUMNS = [
    ("N", "N", ".0f"), ("D", "D", ".0f"), ("V", "V", ".0f"), ("beta", "beta", str), ("T", "temperature", str),
    ("impl", "impl", None), ("fwd+bwd s", "fwd_bwd_s", ".3f"), ("x TRL", "x_trl", ".2f"), ("x floor", "x_floor", ".2f"),
    ("peak MiB", "peak_mem_bytes", mib), (f"{MEMORY_LABEL} MiB", MEMORY_KEY, mib),
    ("% of materialized", "peak_above_grads_vs_materialized", ".1%"),
    ("rel err loss / dh / dW (float64)", "rel_errs", None)]


def markdown(doc: dict) -> str:
    env = doc["environment"]
    rows = pd.DataFrame.from_records(doc["records"])
    errs = rows.reindex(columns=["rel_err_loss", "rel_err_dh", "rel_err_dw"])
    rows["rel_errs"] = [" / ".join(f"{x:.1e}" for x in e) if e.notna().all() else None for _, e in errs.iterrows()]
    return "\n".join([
        f"# hf-fusedce bench distill ({env['device']}, {env['date']})", "",
        f"Command: `{' '.join(doc['command'])}`  ", f"torch {env['torch']}, transformers {env['transformers']}, "
        f"trl {doc.get('trl')}; load before: `{doc['uptime_before']}`; after: `{doc['uptime_after']}`", "",
        markdown_table(rows, DISTILL_COLUMNS)]) + "\n"


def run(args, device, command) -> int:
    from hf_fusedce.bench.shapes import parse_shape

    shapes = [parse_shape(s) for s in (args.shapes.split(",") if args.shapes else ["512x32000"])]
    ns = [int(x) for x in args.n.split(",")] if args.n else [4096]
    betas = [float(b) for b in args.beta.split(",")]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[(args.dtype or "fp32").split(",")[0]]
    from importlib.metadata import version

    doc = {"command": command, "environment": environment(device), "trl": version("trl"),
           "uptime_before": _uptime(), "records": []}
    out = args.out or os.path.join("hf_fusedce_bench", "distill-" + device.type)
    for shape in shapes:
        for n in ns:
            for beta in betas:
                case = Case(n, shape.d, args.teacher_dim or shape.d, shape.v, beta, args.temperature, dtype)
                doc["records"] += run_case(case, device, warmup=args.warmup if args.warmup is not None else 1,
                                           repeats=args.repeats or 3, seed=args.seed)
                doc["uptime_after"] = _uptime()
                written = write(doc, out)
    for path in written:
        print(path)
    return 0
