"""`hf-fusedce demo` at a tiny size: both runs, the agreement check, the table and the PNG."""
from __future__ import annotations

import json
import os

from hf_fusedce.cli.main import main


def test_demo_cli_tiny(tmp_path, capsys):
    out = str(tmp_path / "demo")
    rc = main(["demo", "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--hidden-size", "64",
               "--out", out, "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "curves agree" in text and "loss head peak (measured)" in text
    with open(os.path.join(out, "demo_results.json")) as f:
        res = json.load(f)
    assert res["vocab_size"] == 32000 and res["tokenizer_size"] == 32000
    assert res["compare"]["max_rel_loss_diff"] <= 1e-3 and len(res["fused"]["losses"]) == 3
    probe = res["fused"]["probe"]
    assert probe["method"] == "live_tensor_tracker" and probe["stock_peak_mib"] > probe["fused_peak_mib"] > 0
    assert res["stock"]["step_peak_mib"] > res["fused"]["step_peak_mib"] > 0
    with open(os.path.join(out, "hf_fusedce_demo.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_small_vocab_trains_a_bpe(tmp_path):
    from hf_fusedce.demo.runner import DemoOptions, run_demo

    res = run_demo(DemoOptions(steps=2, seq_len=32, batch_size=2, vocab_size=2000, hidden_size=64,
                               out=str(tmp_path / "d"), device="cpu", plot=False, quiet=True))
    assert res["agree"] and res["vocab_size"] == 2000 and res["tokenizer_size"] <= 2000


def test_demo_skips_a_stock_run_that_cannot_fit_in_ram(tmp_path, monkeypatch, capsys):
    """On CPU an OOM kills the process, so a stock head larger than the available RAM is not run: the demo
    and the trainer's probe both say it does not fit (estimate), and the fused run still trains."""
    from hf_fusedce import memory
    from hf_fusedce.demo.runner import DemoOptions, run_demo

    monkeypatch.setattr(memory, "available_host_bytes", lambda: 8 * 2**20)  # pretend 8 MiB of RAM is free
    res = run_demo(DemoOptions(steps=2, seq_len=64, batch_size=2, hidden_size=64, out=str(tmp_path / "d"),
                               device="cpu"))
    text = capsys.readouterr().out
    assert "stock run skipped" in text and "does not fit" in text
    assert res["agree"] and res["stock"]["skipped"] and len(res["fused"]["losses"]) == 2
    probe = res["fused"]["probe"]
    assert probe["stock_fits"] is False and "formula" in probe["status"] and probe["fused_peak_mib"] > 0
    assert os.path.exists(os.path.join(str(tmp_path / "d"), "hf_fusedce_demo.png"))
