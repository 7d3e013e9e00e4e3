"""`hf-fusedce bench real-heads` (and its older spelling `bench --matrix real-heads`): cell order, skip reasons, records and tables written (tiny shapes)."""
from __future__ import annotations

import json
import os

from hf_fusedce.bench import real_heads
from hf_fusedce.bench.impls import IMPLS
from hf_fusedce.bench.shapes import DTYPE_MODES, REAL_HEADS, Shape, real_heads_cells
from hf_fusedce.cli.main import main


def test_cells_come_in_priority_order():
    cells = real_heads_cells()
    assert len(cells) == 4 * 3 * 2
    assert [(d, s.name, n) for d, s, n in cells[:4]] == [
        ("fp32", "qwen2.5-0.5b", 4096), ("bf16", "qwen2.5-0.5b", 4096),
        ("fp32", "llama3.2-1b", 4096), ("bf16", "llama3.2-1b", 4096)]
    assert {n for _, _, n in cells[:8]} == {4096} and cells[-1][2] == 16384
    assert REAL_HEADS["gemma2-2b-softcap"].softcap == 30.0


def test_skip_reasons(monkeypatch):
    gemma, fp32 = REAL_HEADS["gemma2-2b-softcap"], DTYPE_MODES["fp32"]
    lce = IMPLS["torch-lce"]
    assert "softcapping" in real_heads._skip_reason(lce, lambda *a: None, gemma, 4096, fp32)
    monkeypatch.setattr(real_heads, "available_host_bytes", lambda: 2 << 30)
    why = real_heads._skip_reason(IMPLS["stock"], lambda *a: None, REAL_HEADS["qwen2.5-0.5b"], 4096, fp32)
    assert why.startswith("skipped: needs ~") and "GiB RAM available" in why
    assert real_heads._skip_reason(IMPLS["ours-torch"], lambda *a: None, REAL_HEADS["qwen2.5-0.5b"], 4096, fp32) \
        is None


def test_tiny_run_writes_records_and_tables(tmp_path):
    out = tmp_path / "rh"
    assert main(["bench", "real-heads", "--shapes", "32x500", "--n", "64", "--dtype", "fp32",
                 "--impls", "ours-torch,stock,liger,floor", "--rounds", "1", "--ref", "none", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    by = {r["impl"]: r for r in doc["records"]}
    assert by["ours-torch"]["status"] == "ok" and by["ours-torch"]["x_3gemm"] > 0
    assert by["ours-torch"]["timing"].startswith("interleaved")
    assert "TRITON_INTERPRET" in by["liger"]["status"] or "not installed" in by["liger"]["status"]
    plans = (out / "plans.md").read_text()
    assert "CUDA cost model picks" in plans and "CPU plan per cell" in plans
    assert os.path.exists(out / "results.md")


def test_time_budget_records_every_cell_not_run(tmp_path):
    out = tmp_path / "rh"
    assert main(["bench", "real-heads", "--shapes", "32x500", "--n", "64,128", "--dtype", "fp32",
                 "--impls", "ours-torch,floor", "--time-budget", "0", "--out", str(out)]) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 4 and all(r["status"].startswith("skipped: time budget") for r in recs)


def test_softcap_shape_runs_ours_and_stock_with_softcap(tmp_path):
    shape = Shape("tiny-softcap", 16, 300, softcap=5.0)
    sink = []
    from hf_fusedce.bench.runner import BenchConfig

    real_heads.run_cells([("fp32", shape, 32)], [IMPLS["ours-torch"], IMPLS["stock"], IMPLS["torch-lce"]],
                         __import__("torch").device("cpu"), BenchConfig(ref="none"), sink.append, rounds=1)
    by = {r["impl"]: r for r in sink}
    assert by["ours-torch"]["status"] == by["stock"]["status"] == "ok"
    # Fixed: the bench's loss figures (ref="none": no float64 run at this shape); a sanity bound on its output.
    assert abs(by["ours-torch"]["loss"] - by["stock"]["loss"]) <= 1e-5 * abs(by["stock"]["loss"])
    assert "softcapping" in by["torch-lce"]["status"]


def test_e2e_rss_reports_oom_as_such(monkeypatch):
    import subprocess

    from hf_fusedce.bench.e2e import rss as e2e_rss

    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, -9, "", "Killed")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr("hf_fusedce.memory.available_host_bytes", lambda: 4 << 30)
    rec = e2e_rss.run_variant("stock", 16384, limit_gib=16.0)
    assert rec["status"].startswith("oom") and rec["available_ram_gib_at_launch"] == 4.0
    assert rec["limit_gib"] == round(0.9 * 4 + 2.0, 1) and "--limit-gib" in seen["cmd"]
    assert "| 16384 | stock | oom" in e2e_rss.markdown([rec])


def test_blocked_floor_does_the_same_gemms():
    import torch

    h = torch.randn(2500, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    grads = []
    for name in ("floor", "floor-blocked"):
        h.grad = w.grad = None
        IMPLS[name].resolve(torch.device("cpu"))(h, w, None).backward()
        grads.append((h.grad.clone(), w.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-3)


def test_peer_rounds_caps_the_peers_timed_rounds_only(tmp_path):
    out = tmp_path / "rh"
    assert main(["bench", "--matrix", "real-heads", "--shapes", "32x500", "--n", "64", "--dtype", "fp32",
                 "--impls", "ours-torch,trl-chunked,floor", "--rounds", "2", "--peer-rounds", "1", "--ref", "none",
                 "--out", str(out)]) == 0
    by = {r["impl"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert by["ours-torch"]["repeats"] == 2 and by["floor"]["repeats"] == 2
    if by["trl-chunked"]["status"] == "ok":  # TRL installed (the test extra has it)
        assert by["trl-chunked"]["repeats"] == 1 and "--peer-rounds 1" in by["trl-chunked"]["timing"]
