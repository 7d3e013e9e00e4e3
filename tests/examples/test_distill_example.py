"""examples/distill.py at tiny size: the online and the offline (top-k cache) student both move towards the
teacher, and the truncation report orders as it must (more of the teacher kept, closer to full distillation)."""
from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_distill_example_online_and_offline(tmp_path):
    spec = importlib.util.spec_from_file_location("example_distill", os.path.join(ROOT, "examples", "distill.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = str(tmp_path / "distill")
    mod.main(["--output_dir", out, "--max_steps", "4", "--max_train_samples", "16", "--batch_size", "4",
              "--max_length", "40", "--eval_batches", "1", "--top_k", "8", "--temperature", "1.5"])
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    for mode in ("online", "offline"):
        losses = res[f"{mode}_losses"]
        assert len(losses) == 4 and losses[-1] < losses[0], (mode, losses)
        assert res[f"{mode}_kl_after"] < res["kl_before"], mode
    report = res["truncation_effect"]
    assert [r["k"] for r in report] == [8, 128]
    assert report[0]["teacher_mass_kept"] < report[1]["teacher_mass_kept"] <= 1.0
    assert report[1]["grad_rel_err"] < report[0]["grad_rel_err"]
    assert abs(report[1]["kl_topk"] - report[1]["kl_full"]) < abs(report[0]["kl_topk"] - report[0]["kl_full"])
