"""A damaged native build in the cache (ops/ce/cpu_native.py) never stops training: the process that finds it
trains a tiny Gemma-2 (final_logit_softcapping=30, the rows the native kernel serves) with stock's loss, and so
does the next process. Each process is a child: a damaged library can kill the process that dlopens it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = r"""
import copy, json, sys
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM
import hf_fusedce
from hf_fusedce.ops.ce import cpu_native
from hf_fusedce.testing import tiny_batch

calls = []
real = cpu_native.capped_rows
cpu_native.capped_rows = lambda *a, **k: calls.append(1) or real(*a, **k)
torch.manual_seed(0)
config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
stock = Gemma2ForCausalLM(config).train()
model = hf_fusedce.patch(copy.deepcopy(stock), backend="torch")
ids, labels = tiny_batch()
losses = []
for m in (stock, model):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    step = [m(input_ids=ids, labels=labels).loss for _ in range(2)]  # two calls: the reason is logged once
    step[0].backward()
    opt.step()
    losses.append([float(x) for x in step] + [float(m(input_ids=ids, labels=labels).loss)])
print(json.dumps({"stock": losses[0], "ours": losses[1], "native_calls": len(calls), "status": cpu_native.status()}))
"""

PROBE = "import ctypes, sys; ctypes.CDLL(sys.argv[1]).capped_rows"


def _run(cache: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_FUSEDCE_CACHE": str(cache), "HF_FUSEDCE_CPU_NATIVE": "1", **env}
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=full, timeout=600)


def _result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for stock, ours in zip(out["stock"], out["ours"]):
        assert abs(stock - ours) <= 1e-5 * abs(stock), out
    return out


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 3]


def _random_bytes(good: bytes) -> bytes:
    return os.urandom(len(good))


def _zeroed_middle(good: bytes) -> bytes:
    """ELF header intact (64 bytes), every byte after it zero up to the last kilobyte."""
    return good[:64] + bytes(len(good) - 64 - 1024) + good[-1024:]


def _another_library(good: bytes) -> bytes:
    return (Path(torch.__file__).parent / "lib" / "libc10.so").read_bytes()


DAMAGE = {"truncated": _truncated, "random bytes": _random_bytes, "zeroed middle": _zeroed_middle,
          "another library": _another_library}


def _no_compiler_path(tmp_path) -> str:
    """A PATH with no C compiler on it (the child is started by its absolute path)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return str(empty)


@pytest.fixture(scope="module")
def good_build(tmp_path_factory):
    """One good build made by a training child; its bytes are the source of every damaged copy."""
    if sys.platform != "linux" or not (Path(torch.__file__).parent / "lib" / "libc10.so").exists():
        pytest.skip("damage cases are written for Linux ELF builds")
    cache = tmp_path_factory.mktemp("native_cache")
    out = _result(_run(cache))
    if not out["status"].startswith("built"):
        pytest.skip(f"native CPU kernel {out['status']}")
    assert out["native_calls"] > 0
    (lib,) = (cache / "native").glob("capped_rows-*.so")
    return lib.name, lib.read_bytes()


def _damaged_cache(tmp_path, good_build, damage) -> Path:
    name, good = good_build
    lib = tmp_path / "native" / name
    lib.parent.mkdir(parents=True)
    lib.write_bytes(DAMAGE[damage](good))
    lib.with_name(name + ".sha256").write_text(hashlib.sha256(good).hexdigest() + "\n")
    probe = subprocess.run([sys.executable, "-c", PROBE, str(lib)], capture_output=True, timeout=60)
    assert probe.returncode != 0, "the damaged copy loads: this case would prove nothing"
    return tmp_path


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_build_is_rebuilt_and_the_next_process_uses_it(tmp_path, good_build, damage):
    cache = _damaged_cache(tmp_path, good_build, damage)
    first = _run(cache)
    out = _result(first)
    assert out["status"] == "built and loaded" and out["native_calls"] > 0
    assert "rebuilding it" in first.stderr
    assert (cache / "native" / good_build[0]).read_bytes() == good_build[1]
    second = _run(cache)
    out = _result(second)
    assert out["status"] == "built and loaded" and out["native_calls"] > 0
    assert "hf_fusedce" not in second.stderr  # a verified build: nothing to say


def test_no_compiler_uses_a_good_cached_build(tmp_path, good_build):
    name, good = good_build
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / name).write_bytes(good)
    (tmp_path / "native" / (name + ".sha256")).write_text(hashlib.sha256(good).hexdigest())
    out = _result(_run(tmp_path, PATH=_no_compiler_path(tmp_path)))
    assert out["status"] == "built and loaded" and out["native_calls"] > 0


def test_no_compiler_and_a_damaged_build_fall_back_with_the_reason_logged_once(tmp_path, good_build):
    cache = _damaged_cache(tmp_path, good_build, "zeroed middle")
    done = _run(cache, PATH=_no_compiler_path(tmp_path))
    out = _result(done)
    assert out["native_calls"] == 0
    assert "unusable" in out["status"] and "no C compiler" in out["status"]
    assert done.stderr.count("native CPU softcap rows unavailable") == 1, done.stderr
