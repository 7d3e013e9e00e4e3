"""The Triton row kernel compiles for sm_80 and sm_90, and for AMD gfx942 (MI300X) and gfx90a (MI250X), on this
CPU-only machine (no GPU, no CUDA or ROCm driver): every variant the op can launch, with no register spill and no
local memory or scratch (on AMD no AGPR either: these kernels issue no matrix instructions, so an AGPR is a spill),
and the one-hot gradient path within 1 KiB of shared memory on sm_90. Runs hf_fusedce.ops.cuda.aot / .hip in a
subprocess because conftest.py turns on the Triton interpreter for this process, and the interpreter compiles
nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def _nvidia_tools_present() -> bool:
    try:
        from triton import knobs
        return all(os.path.exists(getattr(knobs.nvidia, t).path) for t in ("ptxas", "cuobjdump"))
    except Exception:  # noqa: BLE001 - a triton without the NVIDIA backend or its tools
        return False


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _nvidia_tools_present():
        pytest.skip("this triton build ships no NVIDIA backend tools (ptxas, cuobjdump)")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "hf_fusedce.ops.cuda.aot", "--arch", "80", "90", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=3600)  # ~1 min of CPU; loaded boxes are slower
    print(proc.stdout)  # the registers / smem table (pytest -s, or the failure report)
    assert out.exists(), f"ops.cuda.aot crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_every_variant_compiles_without_spills(report):
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["returncode"] == 0, report["stderr"][-4000:]
    for u in report["usages"]:
        assert u["spill_bytes"] == u["local_bytes"] == u["stack_bytes"] == 0, u


def test_the_checker_sees_a_spill(report):
    """Self-check: a kernel built to spill is compiled and measured the same way, and is flagged."""
    assert {p["arch"] for p in report["probes"]} == {80, 90}
    for probe in report["probes"]:
        assert probe["spill_bytes"] > 0 and probe["stack_bytes"] > 0, probe


def test_variants_cover_the_options_the_op_selects(report):
    """Both architectures; every dtype; one-hot and soft targets; gradient and no-gradient kernels; runtime
    options (softcap, smoothing) and odd chunk offsets reuse an already compiled kernel."""
    usages = report["usages"]
    assert {u["arch"] for u in usages} == {80, 90}
    names = [u["variant"] for u in usages]
    for part in ("float32", "bfloat16", "float16", "float64", "-K1", "-K3", "-grad-", "-none-"):
        assert any(part in n for n in names), part
    assert all(n == 0 for n in report["reuse_misses"].values()), report["reuse_misses"]


def test_one_hot_gradient_fits_in_1kib_of_shared_memory_on_sm90(report):
    """smem_bytes is what the kernel allocates (Triton's shared memory: cross-warp reduction scratch). The sm_90
    cubin also carries a 1 KiB static section, the per-block reservation every sm_80+ kernel gets; it is
    reported apart and must not grow."""
    k1_grad = [u for u in report["usages"] if u["arch"] == 90 and "-K1" in u["variant"] and "-grad-" in u["variant"]]
    assert k1_grad
    for u in k1_grad:
        assert u["smem_bytes"] <= 1024 and u["smem_static_bytes"] <= 1024, u


def test_the_triton_asked_for_is_the_one_compiling(report):
    """CI compiles once more with the GPU image's triton (HF_FUSEDCE_EXPECT_TRITON, see .ci/run): a PYTHONPATH
    that did not take would otherwise re-test the pinned one and pass."""
    expected = os.environ.get("HF_FUSEDCE_EXPECT_TRITON")
    assert report["triton"] == (expected or triton.__version__)


# ---- AMD Instinct: the same variants through Triton's AMD backend (hf_fusedce.ops.cuda.hip) --------------------
def _hip_backend_present() -> bool:
    try:
        from triton.backends import backends
        return "amd" in backends
    except Exception:  # noqa: BLE001 - a triton without the backends registry
        return False


@pytest.fixture(scope="module")
def hip_report(tmp_path_factory):
    if not _hip_backend_present():
        pytest.skip(f"triton {triton.__version__} has no AMD backend")
    out = tmp_path_factory.mktemp("hip") / "hip.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "hf_fusedce.ops.cuda.hip", "--arch", "gfx942", "gfx90a",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=3600)
    print(proc.stdout)
    assert out.exists(), f"ops.cuda.hip crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_every_variant_compiles_for_mi300x_and_mi250x_without_spills_or_scratch(hip_report):
    assert hip_report["problems"] == [], "\n".join(hip_report["problems"])
    assert hip_report["returncode"] == 0, hip_report["stderr"][-4000:]
    assert {u["arch"] for u in hip_report["usages"]} == {"gfx942", "gfx90a"}
    for u in hip_report["usages"]:
        assert u["vgpr_spills"] == u["sgpr_spills"] == u["scratch_bytes"] == u["agprs"] == 0, u
    names = [u["variant"] for u in hip_report["usages"]]
    for part in ("float32", "bfloat16", "float16", "float64", "-K1", "-K3", "-grad-", "-none-"):
        assert any(part in n for n in names), part
    assert all(n == 0 for n in hip_report["reuse_misses"].values()), hip_report["reuse_misses"]


def test_the_hip_checker_sees_agpr_and_scratch_spills(hip_report):
    """Self-check: on gfx90a/gfx942 the compiler spills into AGPRs first (no spill count) and then to scratch;
    a probe built for each must be flagged."""
    for arch in ("gfx942", "gfx90a"):
        probes = [p for p in hip_report["probes"] if p["arch"] == arch]
        assert any(p["agprs"] > 0 and p["scratch_bytes"] == 0 for p in probes), probes
        assert any(p["vgpr_spills"] > 0 and p["scratch_bytes"] > 0 for p in probes), probes


def test_the_triton_asked_for_is_the_one_compiling_for_amd(hip_report):
    expected = os.environ.get("HF_FUSEDCE_EXPECT_TRITON")
    assert hip_report["triton"] == (expected or triton.__version__)
