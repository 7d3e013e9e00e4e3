"""The native CPU row kernel for softcapped logits (capped_rows.c): one call per chunk instead of eight torch passes
per row block.

Why: at Gemma-2-2B's head (V=256000, softcap 30) the eager "capped" rows (torch_impl._capped_block_rows) make
eight passes over every logit; in bf16, where the GEMMs are fast, that row work was ~10% of the call (1.06-1.11x
the 3-GEMM floor at N=4096). The kernel walks each row in L1-sized tiles, calling MKL's VML vsTanh / vsExp (the
routines torch's own tanh_ / exp_ run on this build, exported by libtorch_cpu) through function pointers.

It is built on first use with the system C compiler (`cc`, ~1 s) into cache_dir() and loaded with ctypes.
Where anything is missing (no compiler, no VML symbols: e.g. aarch64 builds, or a failed build) `available()`
is False with the reason in `status()`, and torch_impl keeps its eager path: same numbers up to float32
rounding. HF_FUSEDCE_CPU_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from ...cache import cache_root

ENV_NATIVE = "HF_FUSEDCE_CPU_NATIVE"
SOURCE = Path(__file__).with_name("capped_rows.c")


def enabled() -> bool:
    return os.environ.get(ENV_NATIVE, "1").strip() not in ("0", "false", "no", "off")


def available() -> bool:
    return enabled() and _load()[0] is not None


def status() -> str:
    if not enabled():
        return f"off ({ENV_NATIVE}=0)"
    lib, why = _load()
    return "built and loaded" if lib is not None else f"unavailable: {why}"


def supports(z: torch.Tensor, ids: torch.Tensor) -> bool:
    """Chunks the kernel takes: CPU, float32 or bfloat16, rows contiguous, one target id per row, eager."""
    return (z.device.type == "cpu" and z.dtype in (torch.float32, torch.bfloat16) and z.dim() == 2
            and z.stride(1) == 1 and ids.dim() == 2 and ids.shape[1] == 1 and not torch.compiler.is_compiling()
            and available())


def capped_rows(z: torch.Tensor, ids: torch.Tensor, in_scale: float, softcap: float, sum_out: torch.Tensor,
                t_target_out: torch.Tensor, mean_t_out: torch.Tensor | None, grad=None) -> None:
    """Fill sum_out (n,), t_target_out (n, 1), mean_t_out (n,) from the chunk; with grad (torch_impl._GradTerms
    built for mode "capped"), write (factor e + shift)(1 - t^2) over z. See capped_rows.c."""
    lib, _ = _load()
    n, v = z.shape
    threads = max(1, min(torch.get_num_threads(), n))
    scratch = torch.empty(threads * v, dtype=torch.float32)
    ids = ids.reshape(-1).contiguous()
    base = coef = shift = None
    if grad is not None:
        base, coef = grad.base.float().contiguous(), grad.coef.float().contiguous()
        shift = grad.shift.float().contiguous() if grad.shift is not None else None
    ptr = (lambda t: ctypes.c_void_p(t.data_ptr()) if t is not None else None)
    vtanh, vexp = _vml()
    lib.capped_rows(ptr(z), n, v, z.stride(0), int(z.dtype == torch.bfloat16), ctypes.c_float(in_scale),
                    ctypes.c_float(softcap), ptr(ids), ptr(sum_out), ptr(t_target_out), ptr(mean_t_out),
                    int(grad is not None), ptr(base), ptr(coef), ptr(shift),
                    ctypes.c_float(grad.z_loss if grad is not None else 0.0), vtanh, vexp, ptr(scratch),
                    threads)


@functools.lru_cache(maxsize=1)
def _vml():
    """MKL's vsTanh and vsExp from the loaded libtorch_cpu (raises when this torch build has none)."""
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / _libtorch_cpu_name()))
    return ctypes.cast(lib.vsTanh, ctypes.c_void_p), ctypes.cast(lib.vsExp, ctypes.c_void_p)


def _libtorch_cpu_name() -> str:
    return {"darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}.get(sys.platform, "libtorch_cpu.so")


@functools.lru_cache(maxsize=1)
def _load():
    """(ctypes library, None) or (None, why)."""
    try:
        _vml()
    except (OSError, AttributeError) as e:
        return None, f"no MKL VML (vsTanh/vsExp) in this torch build ({e})"
    try:
        path = _build()
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        return None, f"could not build {SOURCE.name}: {e}"
    lib = ctypes.CDLL(str(path))
    i64, f32, vp, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.capped_rows.argtypes = [vp, i64, i64, i64, i32, f32, f32, vp, vp, vp, vp, i32, vp, vp, vp, f32, vp, vp,
                                vp, i32]
    lib.capped_rows.restype = None
    return lib, None


def cache_dir() -> Path:
    return cache_root() / "native"


def _build() -> Path:
    """Compile capped_rows.c once per source, compiler flags and machine; reuse the cached library after."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; set CC)")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags, _cpu_signature()]).encode()).hexdigest()
    out = cache_dir() / f"capped_rows-{key[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp_out), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-500:] or f"{cc} exited with {done.returncode}")
        os.replace(tmp_out, out)  # atomic: concurrent builders (test workers) each write their own file
    return out


def _cpu_signature() -> str:
    """-march=native code runs only on a CPU with the same features: a home directory shared by different
    machines must not hand one's build to another (illegal instruction)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
