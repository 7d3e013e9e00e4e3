"""The CI leg that re-runs the exactness tests under MKL's other code paths (.ci/run, MKL_CBWR) is worth its
time only if those paths round differently from the default one: checked here on a float32 GEMM's distance to
float64, each setting in a fresh process (MKL reads MKL_CBWR once, when it loads)."""
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RUN = (ROOT / ".ci" / "run").read_text()
# The float32 GEMM's relative distance to float64, printed with every digit.
GEMM_ERROR = """
import torch
g = torch.Generator().manual_seed(0)
a, b = torch.randn(64, 509, generator=g), torch.randn(509, 97, generator=g)
exact = a.double() @ b.double()
print(repr(float(((a @ b).double() - exact).norm() / exact.norm())))
"""


def leg_paths() -> list[str]:
    return re.findall(r"for mkl_path in ([A-Z0-9 ]+); do", RUN)[0].split()


def leg_files() -> list[str]:
    block = re.search(r"exactness=\(([^)]*)\)", RUN).group(1)
    return block.split()


def gemm_error(mkl_path: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if mkl_path:
        env["MKL_CBWR"] = mkl_path
    out = subprocess.run([sys.executable, "-c", GEMM_ERROR], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_the_leg_runs_existing_exactness_files_under_two_mkl_paths():
    assert leg_paths() == ["COMPATIBLE", "AVX2"]
    assert 'MKL_CBWR=$mkl_path python -m pytest' in RUN
    missing = [f for f in leg_files() if not (ROOT / f).exists()]
    assert not missing, f".ci/run's MKL leg names files that do not exist: {missing}"
    assert "tests/ci/test_mkl_paths.py" in leg_files()


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL: MKL_CBWR does nothing")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="MKL_CBWR paths are x86 only")
def test_the_leg_changes_the_rounding_here():
    """At least one of the leg's paths gives the GEMM another float32 error than the default path (on an AMD EPYC
    the default is MKL's AVX2 path and COMPATIBLE differs; on an AVX-512 Intel CPU both differ)."""
    default = gemm_error(None)
    assert default > 0.0
    others = {path: gemm_error(path) for path in leg_paths()}
    assert any(err != default for err in others.values()), (
        f"MKL_CBWR paths {others} round this GEMM exactly as the default ({default!r}): the leg tests nothing new")
