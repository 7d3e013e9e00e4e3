"""Tensor parallelism (issue 14): the vocab-parallel fused head on 2 and 4 CPU gloo ranks, torchrun.

One launch per world size runs every check in tests/distributed/_tp_worker.py; here we assert on what each rank
wrote. fp32 relative errors <= 1e-5 against the single-device op and the float64 reference.
"""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_distributed import torchrun_run  # noqa: E402

pytestmark = pytest.mark.distributed
RTOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def ranks(request, tmp_path_factory):
    world = request.param
    return torchrun_run("_tp_worker.py", tmp_path_factory.mktemp(f"tp{world}"), world)


def test_op_matches_single_device_and_float64_every_option(ranks):
    for r in ranks:
        for run in ("op_f32_uneven", "op_f64_tiny_vocab"):
            assert len(r[run]) >= 12
            for case, errs in r[run].items():
                for quantity, (vs_single, vs_f64) in errs.items():
                    where = f"rank {r['rank']}/{r['world']} {run} {case} d{quantity}"
                    assert vs_single <= RTOL, f"{where}: rel err vs single-device op {vs_single:.2e}"
                    assert vs_f64 <= RTOL, f"{where}: rel err vs float64 reference {vs_f64:.2e}"
