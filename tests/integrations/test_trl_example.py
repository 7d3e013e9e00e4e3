"""examples/trl_sft.py at tiny size: trains through hf_fusedce's head (op spied), loss goes down."""
from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_trl_sft_example(tmp_path, op_spy):
    spec = importlib.util.spec_from_file_location("example_trl_sft", os.path.join(ROOT, "examples", "trl_sft.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trainer = mod.main(["--output_dir", str(tmp_path), "--max_steps", "3", "--max_train_samples", "12",
                        "--max_length", "64", "--label_smoothing_factor", "0.1"])
    import hf_fusedce
    assert hf_fusedce.is_patched(trainer.model) and op_spy.calls >= 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
