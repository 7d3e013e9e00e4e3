"""The native CPU row kernel for softcapped logits (capped_rows.c): one call per chunk instead of eight torch passes
per row block.

Why: at Gemma-2-2B's head (V=256000, softcap 30) the eager "capped" rows (torch_impl._capped_block_rows) make
eight passes over every logit; in bf16, where the GEMMs are fast, that row work was ~10% of the call (1.06-1.11x
the 3-GEMM floor at N=4096). The kernel walks each row in L1-sized tiles, calling MKL's VML vsTanh / vsExp (the
routines torch's own tanh_ / exp_ run on this build, exported by libtorch_cpu) through function pointers.

It is built on first use with the system C compiler (`cc`, ~1 s) into cache_dir() and loaded with ctypes. The
cache is not trusted: each build's sha256 is recorded beside it when it is built (written atomically, library
and digest), and checked BEFORE dlopen, since dlopen of a damaged library can kill the process. A mismatch or
a load error rebuilds it; a good cached build is used without a compiler. Where anything is missing (no
compiler, no VML symbols: e.g. aarch64 builds, a failed build) `available()` is False with the reason in
`status()` (which never raises), logged once per process, and torch_impl keeps its eager path: same numbers
up to float32 rounding. HF_FUSEDCE_CPU_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
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
_log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENV_NATIVE, "1").strip() not in ("0", "false", "no", "off")


def available() -> bool:
    return enabled() and _load()[0] is not None


def status() -> str:
    if not enabled():
        return f"off ({ENV_NATIVE}=0)"
    lib, why = _load()  # never raises: every failure is a reason
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
    """(ctypes library, None) or (None, why). Runs once per process; a fallback is logged once, with its reason."""
    try:
        lib, why = _load_verified()
    except Exception as e:  # status() and supports() never raise: any surprise is a reason to stay eager
        lib, why = None, f"{type(e).__name__}: {e}"
    if lib is None:
        _log.warning("hf_fusedce: native CPU softcap rows unavailable, using the eager rows (same numbers): %s", why)
    return lib, why


def _load_verified():
    try:
        _vml()
    except (OSError, AttributeError) as e:
        return None, f"no MKL VML (vsTanh/vsExp) in this torch build ({e})"
    build = _Build.for_this_machine()
    damage = build.damage()
    if damage is None:
        lib, damage = _dlopen(build.path)
        if lib is not None:
            return lib, None
    if build.compiler is None:  # a good cached build needs no compiler; a bad one cannot be replaced
        return None, (f"no C compiler ({build.cc!r} not found; set CC)" if damage == "not built yet" else
                      f"cached {build.path.name} is unusable ({damage}) and there is no C compiler to rebuild it")
    if damage != "not built yet":
        _log.warning("hf_fusedce: cached %s is unusable (%s); rebuilding it", build.path.name, damage)
    try:
        build.compile()
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        return None, f"could not build {SOURCE.name}: {e}"
    damage = build.damage()
    return (None, f"fresh build of {SOURCE.name} is unusable ({damage})") if damage else _dlopen(build.path)


def _dlopen(path: Path):
    """(library, None) or (None, why). Only a file whose digest matched reaches here: dlopen of a damaged ELF can
    crash the process, which no except clause catches."""
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.capped_rows
    except (OSError, AttributeError) as e:
        return None, f"load error: {e}"
    i64, f32, vp, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [vp, i64, i64, i64, i32, f32, f32, vp, vp, vp, vp, i32, vp, vp, vp, f32, vp, vp, vp, i32]
    fn.restype = None
    return lib, None


def cache_dir() -> Path:
    return cache_root() / "native"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Build:
    """One cached build: `capped_rows-<key>.so` beside `capped_rows-<key>.so.sha256`, the digest recorded when it
    was built. The key covers source, compiler, flags and CPU; the digest covers the bytes actually on disk (a
    partial write, a copied cache, a bad sector, another file under the name)."""

    FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")

    def __init__(self, cc: str, compiler: str | None, path: Path):
        self.cc, self.compiler, self.path = cc, compiler, path
        self.digest_path = path.with_name(path.name + ".sha256")

    @classmethod
    def for_this_machine(cls) -> "_Build":
        cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *cls.FLAGS, _cpu_signature()]).encode()).hexdigest()
        return cls(cc, shutil.which(cc), cache_dir() / f"capped_rows-{key[:16]}.so")

    def damage(self) -> str | None:
        """None when the cached file is the one built here (digest match), else what is wrong with it."""
        if not self.path.exists():
            return "not built yet"
        try:
            recorded = self.digest_path.read_text().strip()
        except OSError:
            return "no recorded digest"
        actual = _sha256(self.path)
        return None if actual == recorded else f"digest {actual[:12]} differs from the recorded {recorded[:12]}"

    def compile(self) -> None:
        """Build into a private temporary folder, prove the result loads in a child process (a crash there costs
        nothing), then rename the library and its digest into place: readers see a whole file or none."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            tmp_out = Path(tmp) / self.path.name
            done = subprocess.run([self.compiler, *self.FLAGS, str(SOURCE), "-o", str(tmp_out), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-500:] or f"{self.cc} exited with {done.returncode}")
            probe = subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1]).capped_rows",
                                    str(tmp_out)], capture_output=True, text=True, timeout=60)
            if probe.returncode != 0:
                raise RuntimeError(f"the fresh build does not load (exit {probe.returncode}): "
                                   f"{probe.stderr.strip()[-300:]}")
            tmp_digest = Path(tmp) / self.digest_path.name
            tmp_digest.write_text(_sha256(tmp_out) + "\n")
            os.replace(tmp_out, self.path)  # atomic; concurrent builders of one source write the same bytes
            os.replace(tmp_digest, self.digest_path)


def _cpu_signature() -> str:
    """-march=native code runs only on a CPU with the same features: a home directory shared by different
    machines must not hand one's build to another (illegal instruction)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
