"""The command line as a newcomer meets it: help without developer notes and with defaults, `check --all`
streaming a line per family with a progress bar, `demo --device cuda` refused without CUDA."""
from __future__ import annotations

import argparse

import pytest
import torch

from hf_fusedce.cli.main import HelpFormatter, build_parser, main


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "check", "bench", "distill-cache"):
        assert f"  {command} " in out
    assert "register(" not in out and "module" not in out


def test_every_option_with_a_default_shows_it():
    for name, sub in _subparsers(build_parser()).items():
        formatter = sub.formatter_class(name)
        assert isinstance(formatter, HelpFormatter)
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in formatter._get_help_string(action), (name, action.option_strings)


def test_check_all_streams_one_line_per_family_with_progress(monkeypatch, capsys):
    from hf_fusedce.hf import proof

    types = ["aaa", "bbb", "ccc"]
    printed_before = []

    def fake_prove(model_type):
        printed_before.append(capsys.readouterr().out)  # what was on stdout when this family started
        return proof.ProofResult(model_type, "proven")

    monkeypatch.setattr(proof, "causal_lm_types", lambda: dict.fromkeys(types, "X"))
    monkeypatch.setattr(proof, "prove", fake_prove)
    assert main(["check", "--all"]) == 0
    captured = capsys.readouterr()
    assert printed_before[0] == "" and printed_before[1].startswith("proven   aaa")
    assert printed_before[2].startswith("proven   bbb")
    assert captured.out.startswith("proven   ccc") and "3 proven, 0 skipped" in captured.out
    assert "3/3" in captured.err  # tqdm's bar (counts, rate and ETA) on stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_demo_on_cuda_without_cuda_is_refused(tmp_path, capsys):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bench_console_reports_the_memory_the_png_plots():
    from hf_fusedce.bench import report, runner

    rec = {"status": "ok", "fwd_bwd_ms": 1.0, "peak_mem_bytes": 3 * 2**20, report.MEMORY_KEY: 2**20}
    line = runner._brief(rec)
    assert report.MEMORY_LABEL in line and "1.0 MiB" in line and "3.0 MiB" not in line
