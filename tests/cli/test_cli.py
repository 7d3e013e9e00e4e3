"""The command line as a newcomer meets it: help without developer notes and with defaults, `check --all`
streaming a line per family with a progress bar, `demo --device cuda` refused without CUDA."""
from __future__ import annotations

import argparse

import pytest
import torch

from hf_fusedce.cli.main import HelpFormatter, build_parser, main, subcommands


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "check", "bench", "distill-cache"):
        assert f"  {command} " in out
    assert "register(" not in out and "module" not in out


def _every_subcommand(parser, prefix=""):
    for name, sub in subcommands(parser).items():
        yield prefix + name, sub
        yield from _every_subcommand(sub, prefix + name + " ")


def test_every_option_with_a_default_shows_it():
    for name, sub in _every_subcommand(build_parser()):
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

    monkeypatch.setattr(proof, "fused_types", lambda: dict.fromkeys(types, "X"))
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


def _op(impl, n, peak_mib, above_grads_mib, **extra):
    return {"record": "op", "impl": impl, "N": n, "D": 64, "V": 4096, "shape": "64x4096", "dtype": "fp32",
            "status": "ok", "fwd_bwd_ms": 2.0 * n, "peak_mem_bytes": int(peak_mib * 2**20),
            "peak_above_grads_bytes": int(above_grads_mib * 2**20), **extra}


def test_bench_table_and_plot_show_the_console_memory_figure(tmp_path):
    """results.md's columns, and the console line, the table cell and the PNG's memory curve agree."""
    from hf_fusedce.bench import report, runner

    records = [_op("ours-torch", 128, 3.0, 1.25, loss_rel_err=1e-7), _op("floor", 128, 2.5, 0.5),
               _op("ours-torch", 512, 4.0, 2.5), _op("floor", 512, 3.5, 1.0),
               {**_op("liger", 128, 0, 0), "status": "skipped: needs CUDA"}]
    doc = {"environment": {"device": "cpu"}, "command": ["hf-fusedce", "bench"], "records": records}
    report.annotate(records)
    md = (tmp_path / "results.md")
    report.write_markdown(doc, str(tmp_path))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()
            if line.startswith("|")]
    header, body = rows[0], [dict(zip(rows[0], r)) for r in rows[2:]]
    memory_column = f"{report.MEMORY_LABEL} MiB"
    assert header == ["N", "impl", "fwd+bwd ms", "x floor", "x 3-GEMM", "TFLOP/s", "peak above inputs MiB",
                      memory_column, "loss err", "dh err", "dW err", "status"]
    assert [(r["N"], r["impl"]) for r in body] == [("128", "ours-torch"), ("128", "floor"), ("512", "ours-torch"),
                                                     ("512", "floor")]  # skipped peers are listed under the table
    assert "Not measured: liger (skipped: needs CUDA)" in md.read_text()
    ours = body[2]
    assert ours[memory_column] == "2.5" and ours["peak above inputs MiB"] == "4.0" and ours["loss err"] == ""
    assert body[0]["loss err"] == "1.0e-07" and ours["x 3-GEMM"] == "1.00"
    assert " ".join(runner._brief(records[2]).split()).endswith(f"{report.MEMORY_LABEL} 2.5 MiB")  # the console

    fig = report.figure(doc)
    time_ax, memory_ax = fig.axes
    assert memory_ax.get_title().endswith(report.MEMORY_LABEL) and memory_ax.get_ylabel() == "MiB"
    (line,) = [ln for ln in memory_ax.get_lines() if ln.get_label() == "ours-torch"]  # the floor has no memory
    assert list(line.get_xdata()) == [128, 512] and list(line.get_ydata()) == pytest.approx([1.25, 2.5], abs=2e-3)
    assert [ln.get_label() for ln in memory_ax.get_lines()] == ["ours-torch"]
