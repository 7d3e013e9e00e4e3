"""Compile the op's Triton kernels for CUDA targets on a machine without a GPU and read their resource use.

A stand-in driver answers the only questions Triton's launcher asks before compiling (current device, stream and
target), and `JITFunction.__getitem__` is swapped for `warmup` (compile, never launch) while the public op runs on
small CPU tensors over every option that selects a kernel variant. Triton's own specialization (dtypes,
constexprs, 16-byte alignment, integers equal to 1 or divisible by 16) decides what gets compiled, exactly as it
would on a GPU; the op's results on CPU are meaningless here (no kernel runs) and are discarded.

Each cubin is read with cuobjdump (registers, local memory, stack, static shared memory) and its PTX re-assembled
with ptxas -v (spill bytes); Triton's dynamic shared memory is in the kernel's metadata. A deliberately spilling
probe kernel goes through the same path, so a checker that stopped seeing spills would be noticed.

    python -m hf_fusedce.ops.cuda.aot --arch 80 90 [--json out.json]     (TRITON_INTERPRET must be unset)
Exit status 1 on any compile error, register spill or local-memory use in the op's kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from ..ce import api
from ..ce.api import fused_linear_cross_entropy

ARCHS = (80, 90)
K1_GRAD_SMEM_LIMIT = 1024  # bytes: the one-hot gradient path must not round-trip through shared memory


class StandInDriver:
    """What Triton's JIT launcher needs to compile for `target` with no GPU; anything else is an error."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return self.target.arch  # one JIT cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        raise AttributeError(f"the stand-in driver cannot {name}: nothing is launched without a GPU")


@contextlib.contextmanager
def compile_only(target: GPUTarget, compiled: list):
    """Within: every `kernel[grid](...)` compiles for `target` and appends (kernel, compiler log) instead of
    launching. The log is what the compiler printed (ptxas -v on CUDA; nothing on AMD)."""
    previous_getitem, previous_available = JITFunction.__getitem__, api.triton_available
    previous_driver = driver._active  # None without a GPU: reset_active() would look for a real driver

    def getitem(fn, grid):
        def launch(*args, **kwargs):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # ptxas -v log, printed by Triton while it compiles
                kernel = fn.warmup(*args, grid=grid, **kwargs)
            compiled.append((kernel, log.getvalue()))
        return launch

    driver.set_active(StandInDriver(target))
    knobs.nvidia.dump_ptxas_log = True
    JITFunction.__getitem__, api.triton_available = getitem, (lambda device: True)
    try:
        yield
    finally:
        JITFunction.__getitem__, api.triton_available = previous_getitem, previous_available
        driver._active = previous_driver
        knobs.nvidia.dump_ptxas_log = False


# ---- the variants the op can launch ----------------------------------------------------------------------------
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
VOCABS = (32000, 50257)  # row stride divisible by 16 (vectorized) or not (GPT-2)
D = 16  # the CPU GEMMs around the (not launched) kernel are wasted work: keep them small


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    vocab: int
    softcap: float | None
    label_smoothing: float
    soft_targets: int  # 0: one class id per token (K=1)
    mode: str  # "grad": mean, gradients in the forward; "none": per-token, forward then backward; "no_grad"
    chunked: bool = False  # chunks starting at odd rows (7, 14, ...), ignored tokens compacted away

    def name(self) -> str:
        parts = [str(self.dtype).removeprefix("torch."), f"V{self.vocab}", self.mode,
                 f"K{self.soft_targets or 1}"]
        parts += ["softcap"] * (self.softcap is not None) + ["smooth"] * (self.label_smoothing > 0)
        return "-".join(parts + ["chunked"] * self.chunked)


    @property
    def reuses(self) -> bool:
        """Options passed as runtime arguments, and odd chunk offsets: must reuse an already compiled kernel."""
        return self.softcap is not None or self.label_smoothing > 0 or self.chunked


def op_cases() -> list[Case]:
    grid = itertools.product(DTYPES, VOCABS, (None,), (0.0,), (0, 3), ("grad", "none", "no_grad"))
    cases = [Case(*c) for c in grid]
    for dtype in DTYPES:
        cases += [Case(dtype, 32000, 30.0, 0.1, 0, "grad"), Case(dtype, 50257, 30.0, 0.0, 3, "none"),
                  Case(dtype, 32000, None, 0.0, 0, "grad", chunked=True),
                  Case(dtype, 50257, 30.0, 0.1, 3, "none", chunked=True)]
    return cases


def run_case(case: Case) -> None:
    n = 45 if case.chunked else 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g).to(case.dtype).requires_grad_(case.mode != "no_grad")
    w = torch.randn(case.vocab, D, generator=g).to(case.dtype).requires_grad_(case.mode != "no_grad")
    kw = dict(softcap=case.softcap, label_smoothing=case.label_smoothing, backend="triton")
    if case.chunked:
        kw["chunk_budget_bytes"] = 7 * case.vocab * torch.finfo(case.dtype).bits // 8  # 7-row chunks
    if case.soft_targets:
        targets = torch.randint(0, case.vocab, (n, case.soft_targets), generator=g)
        kw["target_probs"] = torch.rand(n, case.soft_targets, generator=g).softmax(-1)
    else:
        targets = torch.randint(0, case.vocab, (n,), generator=g)
    if case.chunked:
        targets[::5] = -100
    if case.mode == "no_grad":
        with torch.no_grad():
            fused_linear_cross_entropy(h, w, targets, **kw)
    elif case.mode == "none":
        fused_linear_cross_entropy(h, w, targets, reduction="none", **kw).sum().backward()
    else:
        fused_linear_cross_entropy(h, w, targets, **kw).backward()


# ---- the self-check: a kernel that must spill ------------------------------------------------------------------
@triton.jit
def _spill_probe(X, Y, BLOCK: tl.constexpr):
    """BLOCK values per program, all alive across a reduction: with one warp and BLOCK=16384 each thread must
    hold 512 floats, twice the register file's per-thread maximum (255)."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x * tl.sum(x * x, axis=0) + tl.exp(x))


def run_probe() -> None:
    x = torch.zeros(16384)
    _spill_probe[(1,)](x, x, BLOCK=16384, num_warps=1)


# ---- resource use ----------------------------------------------------------------------------------------------
@dataclass
class Usage:
    kernel: str
    arch: int
    variant: str  # the case that first needed this specialization
    constexprs: str
    num_warps: int
    registers: int
    spill_bytes: int  # ptxas -v: spill stores + spill loads
    local_bytes: int  # cuobjdump: per-thread local memory (spills, stack arrays)
    stack_bytes: int
    smem_bytes: int  # Triton's shared memory (dynamic): what the kernel itself allocates
    smem_static_bytes: int  # the cubin's static section: on sm_90 the 1 KiB every sm_80+ block has reserved
    ctas_per_sm: int  # limited by registers only (64 warps, 64K registers per SM on sm_80 and sm_90)

    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes or self.local_bytes or self.stack_bytes:
            out.append(f"{self.kernel} [{self.variant}] sm_{self.arch}: {self.spill_bytes} B spilled, "
                       f"{self.local_bytes} B local, {self.stack_bytes} B stack")
        return out


def measure(kernel, ptxas_log: str, arch: int, variant: str) -> Usage:
    """Registers and spills from the ptxas -v log Triton printed; local, stack, static shared from the cubin."""
    if "registers" not in ptxas_log:
        raise RuntimeError(f"no ptxas log for {variant} on sm_{arch}: was it a cache hit? Use an empty TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", res).group(1))  # noqa: E731
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log))
    regs = int(re.search(r"Used (\d+) registers", ptxas_log).group(1))
    warps = kernel.metadata.num_warps
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocation granularity: 256 registers per warp
    names = kernel.src.fn.arg_names
    constexprs = ",".join(f"{names[k[0]]}={v}" for k, v in sorted(kernel.src.constants.items()))
    return Usage(kernel.src.fn.__name__, arch, variant, constexprs, warps, regs, spills, field("LOCAL"),
                 field("STACK"), kernel.metadata.shared, field("SHARED"),
                 min(64 // warps, 65536 // (regs_per_warp * warps)))


def compile_variants(target: GPUTarget, measure_one, probes=(run_probe,)) -> tuple[list, list, int]:
    """(op kernels, probe kernels, variants compiled by cases that must reuse one) for one target;
    `measure_one(kernel, compiler_log, variant)` reads a compiled kernel's resource use."""
    seen, misses = {}, 0
    for case in op_cases():
        compiled = []
        with compile_only(target, compiled):
            run_case(case)
        new = [(k, log) for k, log in compiled if k.hash not in seen]
        if case.reuses:
            misses += len(new)
        for k, log in new:
            seen[k.hash] = measure_one(k, log, case.name())
    probe_usages = []
    for probe in probes:
        compiled = []
        with compile_only(target, compiled):
            probe()
        probe_usages += [measure_one(k, log, "self-check") for k, log in compiled]
    return list(seen.values()), probe_usages, misses


def compile_all(archs=ARCHS) -> tuple[list[Usage], list[Usage], dict]:
    """(op kernels, probe kernels, {arch: variants compiled by cases that must reuse one}) per architecture."""
    usages, probes, reuse_misses = [], [], {}
    for arch in archs:
        ops, checks, misses = compile_variants(GPUTarget("cuda", arch, 32),
                                               lambda k, log, variant: measure(k, log, arch, variant))
        usages, probes, reuse_misses[arch] = usages + ops, probes + checks, misses
    return usages, probes, reuse_misses


def format_table(usages: list[Usage]) -> str:
    head = (f"{'kernel':<16} {'arch':>5} {'warps':>5} {'regs':>4} {'spill':>5} {'local':>5} {'smem':>6} {'static':>6} "
            f"{'CTA/SM':>6}  variant")
    lines = [head]
    for u in usages:
        lines.append(f"{u.kernel:<16} sm_{u.arch:<2} {u.num_warps:>5} {u.registers:>4} {u.spill_bytes:>5} "
                     f"{u.local_bytes:>5} {u.smem_bytes:>6} {u.smem_static_bytes:>6} {u.ctas_per_sm:>6}  {u.variant}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--md", help="write the table here (markdown)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    usages, probes, reuse_misses, summary = compile_fresh(compile_all, args.arch, format_table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Row kernel compiled for CUDA without a GPU\n\n`python -m hf_fusedce.ops.cuda.aot "
                    f"--arch {' '.join(map(str, args.arch))}`; {summary}. smem: Triton's shared memory; static: "
                    f"the cubin's static section. CTA/SM: limited by registers only.\n\n```\n"
                    f"{format_table(usages + probes)}\n```\n")
    problems = [p for u in usages for p in u.problems()]
    if not all(p.problems() for p in probes):
        problems.append("self-check: the spilling probe was not flagged; the checker is blind")
    problems += [f"runtime options or chunk offsets recompiled the kernel on sm_{a} ({n} new variants)"
                 for a, n in reuse_misses.items() if n]
    return report(args.json, usages, probes, reuse_misses, problems)


def compile_fresh(compile_all_fn, archs, format_table_fn):
    """Every variant compiled in a fresh Triton cache (so each really compiles and its logs are read); prints the
    table and a summary line. Returns (usages, probes, reuse_misses, summary)."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        usages, probes, reuse_misses = compile_all_fn(archs)
    summary = (f"triton {triton.__version__}; {len(usages)} op kernel variants; recompiles by runtime options / "
               f"chunk offsets {reuse_misses}")
    print(format_table_fn(usages + probes))
    print(summary)
    return usages, probes, reuse_misses, summary


def report(json_path: str | None, usages, probes, reuse_misses: dict, problems: list[str]) -> int:
    """Writes the compile report's JSON (when asked), prints each problem; exit status 1 when there is one."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"triton": triton.__version__, "usages": [asdict(u) for u in usages],
                       "probes": [asdict(p) for p in probes], "reuse_misses": reuse_misses,
                       "problems": problems}, f, indent=1)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
