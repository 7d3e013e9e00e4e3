"""`hf-fusedce bench distill` at a tiny shape: every implementation measured, ratios and errors recorded."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("trl")


def test_bench_distill_writes_every_implementation(tmp_path):
    from hf_fusedce.cli.main import main

    out = str(tmp_path / "distill")
    # 1024 x 4000: several 4 MiB row blocks in one chunk, so the memory comparison means something (at one row
    # block ours holds its ~9 block temporaries, about the materialized run's tensors)
    assert main(["bench", "distill", "--n", "1024", "--shapes", "32x4000", "--beta", "0,0.5",
                 "--repeats", "1", "--warmup", "0", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        doc = json.load(f)
    assert doc["command"][:2] == ["hf-fusedce", "bench"] and "distill" in doc["command"]
    recs = doc["records"]
    assert {r["impl"] for r in recs} == {"ours", "trl-chunked", "materialized", "floor (4 GEMMs, 8NDV)"}
    assert all(r["status"] == "ok" for r in recs) and len(recs) == 8
    for r in recs:
        if r["impl"] != "floor (4 GEMMs, 8NDV)":
            assert max(r["rel_err_loss"], r["rel_err_dh"], r["rel_err_dw"]) < 1e-5, r
            assert r["peak_above_grads_bytes"] > 0
    ours = [r for r in recs if r["impl"] == "ours"]
    assert all(r["peak_above_grads_vs_materialized"] < 1.0 for r in ours)
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in open(os.path.join(out, "results.md"))
             if line.startswith("|")]
    assert table[0][5:7] == ["impl", "fwd+bwd s"] and [row[5] for row in table[2:]].count("ours") == 2
