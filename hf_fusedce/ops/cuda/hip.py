"""Compile the op's Triton kernels for AMD Instinct GPUs on a machine without a GPU and read their resource use.

The same stand-in driver and the same op calls as ops/cuda/aot.py (every option that selects a kernel variant),
with Triton's AMD backend as the target: gfx942 (MI300X, MI300A, MI325X) and gfx90a (MI250X, MI210), 64-lane
wavefronts. Triton's AMD backend links the code object itself, so no ROCm install is needed. Resource use is read
from the AMDGCN assembly's notes: VGPRs, SGPRs, AGPRs, spill counts, scratch (private segment) size, LDS and
occupancy (waves per SIMD).

AGPRs count as a problem: they are the matrix-core accumulators, and these kernels issue no matrix instructions,
so an AGPR in use is a VGPR spilled into the accumulation file (the compiler does this on gfx90a/gfx942 before it
spills to scratch, and reports no spill for it). Two probes go through the same path and must be flagged: one
that spills into AGPRs, one that spills to scratch.

    python -m hf_fusedce.ops.cuda.hip --arch gfx942 gfx90a [--json out.json] [--md out.md]
Exit status 1 on any compile error, spill, scratch or AGPR use in the op's kernels.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from .aot import _spill_probe, compile_fresh, compile_variants, report

ARCHS = ("gfx942", "gfx90a")
GPUS = {"gfx942": "MI300X", "gfx90a": "MI250X"}
WAVE = 64


def hip_backend_available() -> bool:
    """This triton has an AMD backend (a wheel built without it, or a Triton older than the AMD backend, does not)."""
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "amd" in backends


@dataclass
class HipUsage:
    kernel: str
    arch: str
    variant: str  # the case that first needed this specialization
    constexprs: str
    num_warps: int  # wavefronts of 64 lanes per workgroup
    vgprs: int  # architectural VGPRs per lane
    agprs: int  # accumulation VGPRs per lane (0 expected: no matrix instructions here)
    sgprs: int
    vgpr_spills: int
    sgpr_spills: int
    scratch_bytes: int  # per-lane private segment (spills, stack arrays)
    lds_bytes: int  # Triton's shared memory (LDS): cross-wave reduction scratch
    occupancy: int  # waves per SIMD, as the compiler computed it

    def problems(self) -> list[str]:
        if self.vgpr_spills or self.sgpr_spills or self.scratch_bytes or self.agprs:
            return [f"{self.kernel} [{self.variant}] {self.arch}: {self.vgpr_spills} VGPR / {self.sgpr_spills} SGPR "
                    f"spills, {self.scratch_bytes} B scratch, {self.agprs} AGPRs"]
        return []


def _note(asm: str, key: str) -> int:
    """One number from the assembly's notes, e.g. `; ScratchSize: 0` or `.vgpr_spill_count: 0`."""
    found = re.search(rf"{re.escape(key)}:\s*(\d+)", asm)
    if found is None:
        raise RuntimeError(f"no {key!r} in the AMDGCN assembly: has this Triton's AMD backend changed its notes?")
    return int(found.group(1))


def measure(kernel, arch: str, variant: str) -> HipUsage:
    asm = kernel.asm["amdgcn"]
    names = kernel.src.fn.arg_names
    constexprs = ",".join(f"{names[k[0]]}={v}" for k, v in sorted(kernel.src.constants.items()))
    return HipUsage(kernel.src.fn.__name__, arch, variant, constexprs, kernel.metadata.num_warps,
                    _note(asm, "; NumVgprs"), _note(asm, "; NumAgprs"), _note(asm, "; TotalNumSgprs"),
                    _note(asm, ".vgpr_spill_count"), _note(asm, ".sgpr_spill_count"), _note(asm, "; ScratchSize"),
                    kernel.metadata.shared, _note(asm, "; Occupancy"))


def _probe_into_agprs():
    """1 wave, 16384 values alive across a reduction: 256 floats per lane, more than the 256 VGPRs a lane has."""
    x = torch.zeros(16384)
    _spill_probe[(1,)](x, x, BLOCK=16384, num_warps=1)


def _probe_to_scratch():
    """512 floats per lane: more than VGPRs and AGPRs together (512), so it spills to scratch."""
    x = torch.zeros(32768)
    _spill_probe[(1,)](x, x, BLOCK=32768, num_warps=1)


def compile_all(archs=ARCHS) -> tuple[list[HipUsage], list[HipUsage], dict]:
    """(op kernels, probe kernels, {arch: variants compiled by cases that must reuse one}) per target."""
    usages, probes, reuse_misses = [], [], {}
    for arch in archs:
        ops, checks, misses = compile_variants(GPUTarget("hip", arch, WAVE),
                                               lambda k, log, variant: measure(k, arch, variant),
                                               probes=(_probe_into_agprs, _probe_to_scratch))
        usages, probes, reuse_misses[arch] = usages + ops, probes + checks, misses
    return usages, probes, reuse_misses


def format_table(usages: list[HipUsage]) -> str:
    lines = [f"{'kernel':<16} {'arch':>6} {'waves':>5} {'vgpr':>4} {'agpr':>4} {'sgpr':>4} {'spill':>5} "
             f"{'scratch':>7} {'lds':>5} {'occ':>3}  variant"]
    for u in usages:
        lines.append(f"{u.kernel:<16} {u.arch:>6} {u.num_warps:>5} {u.vgprs:>4} {u.agprs:>4} {u.sgprs:>4} "
                     f"{u.vgpr_spills + u.sgpr_spills:>5} {u.scratch_bytes:>7} {u.lds_bytes:>5} {u.occupancy:>3}  "
                     f"{u.variant}")
    return "\n".join(lines)


def problems_of(usages, probes, reuse_misses) -> list[str]:
    out = [p for u in usages for p in u.problems()]
    for arch in {p.arch for p in probes} | set(reuse_misses):
        mine = [p for p in probes if p.arch == arch]
        if not any(p.agprs and not p.scratch_bytes for p in mine) or not any(p.scratch_bytes for p in mine):
            out.append(f"self-check on {arch}: the probes did not spill into AGPRs and to scratch as built to; "
                       "the checker is blind")
    out += [f"runtime options or chunk offsets recompiled the kernel on {a} ({n} new variants)"
            for a, n in reuse_misses.items() if n]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--md", help="write the table here (markdown)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if not hip_backend_available():
        parser.error(f"triton {triton.__version__} has no AMD backend")
    usages, probes, reuse_misses, summary = compile_fresh(compile_all, args.arch, format_table)
    problems = problems_of(usages, probes, reuse_misses)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Row kernel compiled for AMD Instinct without a GPU\n\n`python -m hf_fusedce.ops.cuda.hip "
                    f"--arch {' '.join(args.arch)}`; {summary}. waves: 64-lane wavefronts per workgroup; lds: "
                    f"Triton's shared memory; occ: waves per SIMD.\n\n```\n{format_table(usages + probes)}\n```\n")
    return report(args.json, usages, probes, reuse_misses, problems)


if __name__ == "__main__":
    sys.exit(main())
