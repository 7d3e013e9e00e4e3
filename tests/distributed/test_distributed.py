"""Distributed training with the fused head (issue 6): 2 CPU processes (gloo) per run.

* DDP through `accelerate launch --config_file examples/accelerate/ddp.yaml` and transformers.Trainer
  (TrainingArguments(use_cpu=True) makes that config start two gloo ranks on CPU).
* FSDP1 (flat parameters) needs an accelerator in torch: GPU only, through torchrun.
* FSDP2 through torchrun and `fully_shard` applied as accelerate does (accelerate 1.15 ignores FSDP for CPU
  runs: with use_cpu, examples/accelerate/fsdp2.yaml silently trains DDP), checking the lm_head weight is a
  DTensor Shard(0) outside the forward. The fsdp2.yaml config runs on a GPU only; DeepSpeed ZeRO-2/3 run on CPU in
  test_deepspeed.py (the deepspeed_zero3.yaml test below is its GPU variant).

Every run: gradient accumulation 2, average_tokens_across_devices (num_items_in_batch = the global token count of
the optimizer step, loss x world size), and one micro-batch in which rank 1 holds only ignored labels. Checked
against ONE process running the STOCK model on the same global batch: each rank's loss, num_items_in_batch, and
the synced (gathered) gradients of every parameter, tied embedding included.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("hf_fusedce.hf.patching")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIGS = os.path.join(ROOT, "examples", "accelerate")
sys.path.insert(0, HERE)
from _trainer_worker import GRAD_ACC, build_model  # noqa: E402

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.skip(f"{name} CLI not found")
    return path


def _run(cmd, out, n_ranks):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(n_ranks)]


def accelerate_run(config, out, n_ranks, *worker_args):
    cmd = [_bin("accelerate"), "launch", "--config_file", os.path.join(CONFIGS, config),
           "--num_processes", str(n_ranks), "--main_process_port", str(_free_port()),
           os.path.join(HERE, "_trainer_worker.py"), "--out", str(out), *worker_args]
    return _run(cmd, str(out), n_ranks)


def torchrun_run(script, out, n_ranks, *worker_args):
    cmd = [_bin("torchrun"), "--nproc_per_node", str(n_ranks), "--master_port", str(_free_port()),
           os.path.join(HERE, script), "--out", str(out), *worker_args]
    return _run(cmd, str(out), n_ranks)


def single_process_reference(ranks, tied):
    """The stock model, one process, the first optimizer step's global batch (every rank's micro-batches): the
    loss each rank should have reported, the token count, and the gradients."""
    world = len(ranks)
    model = build_model(tied)
    model.train()
    step0 = [[rec for rec in r["records"] if rec["step"] == 0] for r in ranks]
    assert all(len(s) == GRAD_ACC for s in step0), [len(s) for s in step0]
    n_items = sum(int(rec["labels"][..., 1:].ne(-100).sum()) for s in step0 for rec in s)
    losses = []
    for s in step0:
        per_rank = []
        for rec in s:
            out = model(input_ids=rec["input_ids"], labels=rec["labels"], num_items_in_batch=torch.tensor(n_items))
            out.loss.backward()  # accumulates d(sum of all tokens' CE / N_global)/dparams over ranks and micro-steps
            per_rank.append(world * out.loss.item())
        losses.append(per_rank)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return losses, n_items, grads


def check_against_reference(ranks, tied, rtol=1e-4, atol=1e-6):
    world = len(ranks)
    assert all(r["world_size"] == world for r in ranks)
    assert all(r["fused_calls"] >= GRAD_ACC for r in ranks), "the fused path did not run on every rank"
    losses, n_items, grads = single_process_reference(ranks, tied)
    for r, rank in enumerate(ranks):
        step0 = [rec for rec in rank["records"] if rec["step"] == 0]
        assert [rec["num_items_in_batch"] for rec in step0] == [n_items] * GRAD_ACC
        got = [rec["loss"] for rec in step0]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(losses[r]), rtol=rtol, atol=atol,
                                   msg=lambda m: f"rank {r} losses {got} vs single process {losses[r]}: {m}")
    # the rank whose tokens are all ignored: loss exactly 0, finite, and the step still syncs
    if world > 1:
        assert ranks[1]["records"][0]["loss"] == 0.0
    assert torch.isfinite(torch.tensor([rec["loss"] for rank in ranks for rec in rank["records"]])).all()
    for r, rank in enumerate(ranks):
        got = rank["grads"]
        assert got.keys() == grads.keys(), (sorted(got), sorted(grads))
        for name, want in grads.items():
            assert got[name] is not None, f"rank {r}: no gradient reached {name}"
            torch.testing.assert_close(got[name].cpu(), want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"rank {r} grad {name}: {m}")
    if tied:
        assert "lm_head.weight" not in grads  # one parameter: the head's gradient landed on the embedding


# ---------------------------------------------------------------------------------------------------------------
def test_ddp_trainer_two_cpu_ranks_match_single_process(tmp_path):
    """accelerate launch with examples/accelerate/ddp.yaml, transformers.Trainer, patched tied Llama."""
    ranks = accelerate_run("ddp.yaml", tmp_path, 2, "--tied", "1")
    assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks)
    check_against_reference(ranks, tied=True)
    # FusedCEMemoryCallback under DDP: keys on every rank, the probe and the token count reduced over ranks
    assert all(len(r["fusedce_logs"]) == 2 and r["fusedce_probe"]["ranks"] == 2 for r in ranks)
    assert all(r["fusedce_probe"]["fused_peak_bytes"] > 0 for r in ranks)
    rank_tokens = [sum(int(rec["input_ids"].numel()) for rec in r["records"]) for r in ranks]
    assert ranks[0]["fusedce_tokens"] == ranks[1]["fusedce_tokens"] > max(rank_tokens)


@pytest.mark.parametrize("tied", [1, 0], ids=["tied", "untied"])
def test_fsdp2_two_cpu_ranks_match_single_process(tmp_path, tied):
    ranks = torchrun_run("_fsdp2_worker.py", tmp_path, 2, "--tied", str(tied))
    for r in ranks:  # sharded outside the forward, and still sharded after the backward
        assert r["head_weight_kind"] == "DTensor/(Shard(dim=0),)", r["head_weight_kind"]
        assert r["head_weight_kind_after"] == "DTensor"
    check_against_reference(ranks, tied=bool(tied))


@pytest.mark.slow
def test_accelerate_fsdp2_config_on_cpu_is_ddp_not_fsdp(tmp_path):
    """Documents why FSDP2 is tested via torchrun on CPU: accelerate only honours FSDP for GPU-family types, so
    fsdp2.yaml with use_cpu trains DDP. If accelerate starts honouring it on CPU, this test fails: switch the FSDP2
    test above to the config then."""
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour only")
    ranks = accelerate_run("fsdp2.yaml", tmp_path, 2, "--tied", "1")
    assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks)
    check_against_reference(ranks, tied=True)  # and it is still right


# ---------------------------------------------------------------------------------------------------------------
def _gpu_ranks():
    return min(2, torch.cuda.device_count())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP only on GPUs (CPU: DDP fallback)")
@pytest.mark.parametrize("tied", [1, 0], ids=["tied", "untied"])
def test_fsdp2_accelerate_config_gpu(tmp_path, tied):
    """examples/accelerate/fsdp2.yaml through Trainer on 1-2 GPUs (one GPU still shards: world size 1)."""
    n = _gpu_ranks()
    ranks = accelerate_run("fsdp2.yaml", tmp_path, n, "--tied", str(tied), "--backend", "auto")
    assert ranks[0]["head_weight_kind"].startswith("DTensor"), ranks[0]["head_weight_kind"]
    check_against_reference(ranks, tied=bool(tied), rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch FSDP1 needs an accelerator device")
@pytest.mark.parametrize("tied", [1, 0], ids=["tied", "untied"])
def test_fsdp1_flat_parameters_gpu(tmp_path, tied):
    """FSDP1 (use_orig_params=False): the lm_head weight is part of the root unit's flat shard outside the
    forward; the fused head must see the full weight (forward redirection) and match one stock process."""
    n = _gpu_ranks()
    ranks = torchrun_run("_fsdp2_worker.py", tmp_path, n, "--tied", str(tied), "--fsdp", "1", "--backend", "auto")
    check_against_reference(ranks, tied=bool(tied), rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU variant (CPU: test_deepspeed.py)")
@pytest.mark.parametrize("tied", [1, 0], ids=["tied", "untied"])
def test_deepspeed_zero3_accelerate_config_gpu(tmp_path, tied):
    """examples/accelerate/deepspeed_zero3.yaml: parameters are partitioned (numel 0 outside their module's hooks)
    even on one GPU; the fused head must reach the full weight and its gradient the partition."""
    pytest.importorskip("deepspeed")
    n = _gpu_ranks()
    ranks = accelerate_run("deepspeed_zero3.yaml", tmp_path, n, "--tied", str(tied), "--backend", "auto")
    assert all(r["fused_calls"] >= GRAD_ACC for r in ranks)
    for r in ranks:
        assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in r["records"])
