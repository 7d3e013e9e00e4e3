"""`hf-fusedce selftest`: on the machine at hand, in minutes, is the op right, lean and fast, and does the patch
give stock's training. The same code on every device: on a GPU the Triton kernel and the allocator's statistics;
on a CPU the torch path, the live-tensor tracker, and the Triton kernel through its interpreter in a subprocess.

It is the bench and the proof run here: numbers.py holds testing.py's float64 rule to the op, speed.py is the
bench's measurement loop at one shape, patch.py is the proof's comparison on a tiny model. Writes selftest.json,
selftest.md and selftest.png; any wrong number fails the run (exit status 1)."""
from __future__ import annotations

import sys
import time

import torch

from . import interpreted, numbers, patch, speed
from .machine import kernel_resources, machine_info
from .report import Check, Report

__all__ = ["Check", "Report", "plan", "run"]


def plan(device: torch.device, quick: bool) -> list[tuple[str, str, object]]:
    """(group, name, thunk returning a Check or a list of them), in the order they run: cheap and decisive first."""
    cuda = device.type == "cuda"
    backends = ("triton", "torch") if cuda else ("torch",)
    steps = [("machine", "row kernel as compiled here", lambda: kernel_resources(device))]
    for backend in backends:
        for dtype in ("fp32", "bf16"):
            for case in numbers.option_cases():
                steps.append(("numbers", f"{case}, {dtype}, {backend}",
                              lambda c=case, d=dtype, b=backend: numbers.option_check(c, d, b, device)))
    if cuda:
        steps += [("numbers", f"triton vs torch twin, {d}", lambda d=d: numbers.twin_check(d, device))
                  for d in ("fp32", "bf16")]
    else:
        steps.append(("numbers", "triton kernel, interpreted (fp32)", lambda: interpreted.checks(quick)))
    for backend in backends:
        steps += [("numbers", f"distillation, {d}, {backend}",
                   lambda d=d, b=backend: numbers.distill_check(d, b, device)) for d in ("fp32", "bf16")]
        steps.append(("numbers", f"token statistics, {backend}",
                      lambda b=backend: numbers.token_stats_check(b, device)))
    for shape, n, dtype in numbers.real_head_cases(quick, device):
        steps.append(("numbers", f"{shape.name} head N={n}, {dtype}",
                      lambda s=shape, n=n, d=dtype: numbers.real_head_check(s, n, d, backends[0], device)))
    steps += [("patch", "tiny Llama SGD steps", lambda: patch.training_steps_check(device)),
              ("patch", "LoRA step", lambda: patch.lora_check(device)),
              ("patch", "TRL SFT step", lambda: patch.sft_check(device)),
              ("memory", "memory and time at one shape", lambda: _memory_and_time(device, quick))]
    return steps


def _memory_and_time(device, quick: bool) -> list[Check]:
    records, (shape, n, dtype) = speed.measure(device, quick)
    ours = "ours-triton" if device.type == "cuda" else "ours-torch"
    shape_note = {"shape": f"N={n} D={shape.d} V={shape.v} {dtype}"}
    checks = speed.memory_checks(records, ours) + speed.time_checks(records, ours, device, shape, n, dtype)
    for c in checks:
        c.figures = {**shape_note, **c.figures}
    return checks


def run(device=None, quick: bool = False, only: tuple[str, ...] = (), log=None) -> Report:
    """Runs every step of `plan` (those whose "group/name" contains one of `only`, if given)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = Report(machine_info(device), "quick" if quick else "full")
    start = time.perf_counter()
    for group, name, thunk in plan(device, quick):
        if only and not any(key in f"{group}/{name}" for key in only):
            continue
        before = len(report.checks)
        report.run(group, name, lambda t=thunk, g=group, n=name: _one(t, g, n))
        report.checks[before:] = _flatten(report.checks[before:])
        for c in report.checks[before:]:
            log(f"[selftest] {c.status:>7}  {c.group}/{c.name}" + (f": {c.detail.splitlines()[0]}"
                                                                  if c.status == "fail" and c.detail else ""))
    report.seconds = time.perf_counter() - start
    return report


def _one(thunk, group, name):
    out = thunk()
    return out if out is not None else Check(group, name, "fail", detail="the check returned nothing")


def _flatten(items) -> list[Check]:
    flat = []
    for item in items:
        flat += item if isinstance(item, list) else [item]
    return flat
