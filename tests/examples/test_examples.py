"""Each example script at tiny size (in-process), the accelerate configs, and a 2-process CPU DDP launch of
examples/sft.py (gloo) against one process on the same data."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(out_dir):
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)


def _check_trained(res, steps):
    losses = res["losses"]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert res["head_saved_mib"] and res["head_saved_mib"] > 0


def test_sft_example(tmp_path):
    out = str(tmp_path / "sft")
    trainer = _load("sft").main(["--output_dir", out, "--max_steps", "4", "--max_train_samples", "64"])
    _check_trained(_result(out), 4)
    from hf_fusedce import is_patched

    assert is_patched(trainer.model)
    # prompts are masked: fewer label tokens than input tokens in every example
    ex = trainer.train_dataset[0]
    n_labels = sum(x != -100 for x in ex["labels"])
    assert 0 < n_labels < len(ex["input_ids"])
    assert os.path.exists(os.path.join(out, "fusedce_summary.json"))


def test_pretrain_example(tmp_path):
    out = str(tmp_path / "pt")
    trainer = _load("pretrain").main(["--output_dir", out, "--max_steps", "4", "--block_size", "64"])
    res = _result(out)
    _check_trained(res, 4)
    assert all(len(x) == 64 for x in trainer.train_dataset[:8]["input_ids"])


@pytest.mark.parametrize("on_head", [False, True], ids=["lora", "lora+lm_head"])
def test_lora_sft_example(tmp_path, on_head):
    out = str(tmp_path / "lora")
    argv = ["--output_dir", out, "--max_steps", "4", "--max_train_samples", "64"]
    trainer = _load("lora_sft").main(argv + (["--lora_on_lm_head"] if on_head else []))
    res = _result(out)
    assert len(res["losses"]) == 4 and res["losses"][-1] < res["losses"][0]
    assert res["lora_on_lm_head"] is on_head
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    from hf_fusedce import is_patched

    assert is_patched(trainer.model)


def test_accelerate_configs_parse():
    yaml = pytest.importorskip("yaml")
    kinds = {"ddp.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP", "deepspeed_zero3.yaml": "DEEPSPEED"}
    for name, kind in kinds.items():
        with open(os.path.join(EXAMPLES, "accelerate", name)) as f:
            cfg = yaml.safe_load(f)
        assert cfg["distributed_type"] == kind and cfg["num_processes"] == 2
    with open(os.path.join(EXAMPLES, "accelerate", "fsdp2.yaml")) as f:
        assert yaml.safe_load(f)["fsdp_config"]["fsdp_version"] == 2
    with open(os.path.join(EXAMPLES, "accelerate", "deepspeed_zero3.yaml")) as f:
        assert yaml.safe_load(f)["deepspeed_config"]["zero_stage"] == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_cpu_ddp_launch_matches_one_process(tmp_path):
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists(accelerate):
        pytest.skip("accelerate CLI not found")
    steps, common = 4, ["--max_steps", "4", "--max_train_samples", "64", "--cpu"]
    one = str(tmp_path / "one")
    _load("sft").main(["--output_dir", one, "--per_device_train_batch_size", "4", *common])
    two = str(tmp_path / "two")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [accelerate, "launch", "--config_file", os.path.join(EXAMPLES, "accelerate", "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           os.path.join(EXAMPLES, "sft.py"), "--output_dir", two, "--per_device_train_batch_size", "2", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r1, r2 = _result(one), _result(two)
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert len(r1["losses"]) == len(r2["losses"]) == steps
    for a, b in zip(r1["losses"], r2["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a), (r1["losses"], r2["losses"])
    assert abs(r1["train_loss"] - r2["train_loss"]) <= 1e-4 * abs(r1["train_loss"])
