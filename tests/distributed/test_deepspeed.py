"""DeepSpeed ZeRO on CPU (DS_ACCELERATOR=cpu, 2 gloo ranks through torchrun): stock vs patched, same run.

One launch of tests/distributed/_deepspeed_worker.py runs every case (a DeepSpeed start costs seconds; the first
on a machine also compiles DeepSpeed's shared-memory op, minutes). Each case trains the same seeded tiny Llama
twice per rank, stock and patched, 2 SGD steps of 2 accumulated micro-batches; checked here:
- the fused head ran on every micro-step (4 calls), the stock run never;
- under ZeRO-3 the lm_head weight is partitioned: 0 elements held by the rank (`ds_numel` the full size), built
  partitioned when the case builds under zero.Init;
- every micro-step's loss equals stock's, and every parameter (gathered with deepspeed.zero.GatheredParameters:
  under ZeRO-3 `.grad` stays empty) after the steps equals stock's, while the steps moved them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from _deepspeed_worker import CASES, GRAD_ACC, STEPS  # noqa: E402
from test_distributed import _bin, _free_port  # noqa: E402

pytestmark = pytest.mark.distributed
TOL = 1e-5  # relative; measured 1e-7 (losses), 6e-7 (parameters, LoRA case)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(HERE, "_deepspeed_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _problems(case: str, rank: int, stock: dict, fused: dict) -> list[str]:
    kind, tied, zero_init, adapter, stage, offload = CASES[case]
    bad = []
    if stock["fused_calls"] != 0 or fused["fused_calls"] != STEPS * GRAD_ACC:
        bad.append(f"fused head calls stock {stock['fused_calls']}, patched {fused['fused_calls']}")
    if fused["tied"] != tied:
        bad.append(f"tied {fused['tied']}")
    if stage == 3 and (fused["head_local_numel"] != 0 or not fused["head_ds_numel"]):
        bad.append(f"lm_head not partitioned: {fused['head_local_numel']} local of {fused['head_ds_numel']}")
    if zero_init and not fused["built_partitioned"]:
        bad.append("not built under zero.Init")
    if len(fused["losses"]) != STEPS * GRAD_ACC:
        bad.append(f"{len(fused['losses'])} micro-steps")
    errs = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(fused["losses"], stock["losses"])]
    if max(errs) > TOL:
        bad.append(f"losses {fused['losses']} vs stock {stock['losses']}")
    if rank == 1 and stock["losses"][0] != 0.0:  # this rank's first micro-batch has only ignored labels
        bad.append(f"rank 1 first loss {stock['losses'][0]}")
    for name, want in stock["after"].items():
        if not torch.equal(fused["before"][name], stock["before"][name]):
            bad.append(f"{name}: the two runs started from different weights")
        elif _rel(fused["after"][name], want) > TOL:
            bad.append(f"{name} after the steps: rel err {_rel(fused['after'][name], want):.1e}")
    trained = [n for n in stock["after"] if not torch.equal(stock["after"][n], stock["before"][n])]
    if not any("lm_head" in n or "embed" in n for n in trained):
        bad.append(f"the steps moved no head weight (moved: {trained})")
    return [f"{case} rank {rank}: {b}" for b in bad]


def test_zero_on_cpu_patched_equals_stock(ranks):
    """Trainer and FusedCETrainer, ZeRO-3 tied / untied, built before and under zero.Init, LoRA on lm_head,
    modules_to_save=["lm_head"], ZeRO-2, ZeRO-3 with CPU parameter offload."""
    assert all(set(r) == set(CASES) for r in ranks), [sorted(r) for r in ranks]
    bad = [p for rank, r in enumerate(ranks) for case, runs in r.items()
           for p in _problems(case, rank, runs["stock"], runs["fused"])]
    assert not bad, "\n".join(bad)
