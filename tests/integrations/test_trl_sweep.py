"""The TRL sweep (hf_fusedce.integrations.trl.sweep) on a few families in CI: hf_fusedce's head through TRL's
protocol equals the stock loss and gradients where TRL's own head does not (unshifted BART, BERT's prediction
transform, GraniteMoE's router aux); the full sweep over every family is the slow test."""
from __future__ import annotations

import pytest

pytest.importorskip("trl")

from hf_fusedce.integrations.trl import sweep as trl_sweep  # noqa: E402


@pytest.mark.parametrize("model_type, trl_status", [("llama", "exact"), ("bart", "inexact"), ("bert", "inexact"),
                                                    ("granitemoe", "crash")])
def test_family_through_the_protocol(model_type, trl_status):
    row = trl_sweep.sweep_type(model_type)
    assert row["stock"] == "ok"
    assert row["ours"]["status"] == "exact", row
    assert row["trl"]["status"] == trl_status, row  # what TRL 1.16's own head does on this family


@pytest.mark.slow
def test_full_sweep_every_proven_family_is_exact_through_the_protocol(tmp_path):
    result = trl_sweep.run()
    bad = [r for r in result["rows"] if r["stock"] == "ok" and r["ours"]["status"] in ("crash", "inexact")
           and r["model_type"] != "bamba"]  # bamba: its z-loss is not a per-token log-prob (README)
    assert not bad, bad
