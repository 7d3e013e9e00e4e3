"""Shared test setup.

* Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports triton, so the triton backend runs
  its kernels on CPU tensors through the interpreter (slow: keep triton shapes small). With a CUDA device the
  variable is left alone, so GPU runs exercise the compiled kernels.
* ``backend`` fixture: "torch" and "triton"; triton cases skip (with the reason) when the backend is not usable
  here (no triton, or no CUDA and no interpreter).
* ``tiny_llama`` / ``tiny_batch`` fixtures: factories of the tiny offline models and batches the tests share.
* Hypothesis profiles: "ci" (default) is derandomized (the seed is derived from each test, so every run draws the
  same examples), keeps no example database, has no deadline and prints the reproduction blob on failure.
  "dev" draws fresh random examples. Pick one with HYPOTHESIS_PROFILE=dev.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

# hf-fusedce check remembers re-proven families there (hf/recorded.py): never the user's own cache in tests.
os.environ.setdefault("HF_FUSEDCE_CACHE", tempfile.mkdtemp(prefix="hf_fusedce_cache_"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from hf_fusedce import testing  # noqa: E402
from hf_fusedce.testing import device_under_test, triton_backend_status  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("dev", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["torch", "triton"]


def skip_unless_backend(backend: str) -> None:
    if backend == "triton":
        ok, why = triton_backend_status()
        if not ok:
            pytest.skip(f"triton backend unavailable: {why}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    skip_unless_backend(request.param)
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return device_under_test()


def have_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


@pytest.fixture
def tiny_llama():
    """Factory of tiny seeded Llama models (`hf_fusedce.testing.tiny_llama`)."""
    return testing.tiny_llama


@pytest.fixture
def tiny_batch():
    """Factory of (input_ids, labels) batches (`hf_fusedce.testing.tiny_batch`)."""
    return testing.tiny_batch
