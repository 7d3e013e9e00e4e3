"""`hf-fusedce bench --sweep-n` (bench/sweep_n.py): which cells run at which hidden size, the float64 row check
of the large-N regime, the compiled peer's memory reading, and a tiny end-to-end run writing its files."""
from __future__ import annotations

import json

import pytest
import torch

from hf_fusedce.bench import impls as bench_impls
from hf_fusedce.bench import shapes, sweep_n
from hf_fusedce.cli.main import main
from hf_fusedce.memory import measure_peak


def test_cells_cut_the_hidden_size_only_above_full_d_max_n():
    cfg = sweep_n.SweepConfig(heads=("qwen2.5-0.5b",), ns=(4096, 512, 1 << 20), full_d_max_n=4096, reduced_d=64)
    got = [(shape.name, shape.d, shape.v, n) for _, shape, n in sweep_n.cells(cfg)]
    assert got == [("qwen2.5-0.5b", 896, 151936, 512), ("qwen2.5-0.5b", 896, 151936, 4096),
                   ("qwen2.5-0.5b@d64", 64, 151936, 1 << 20)]
    names = lambda n: [i.name for i in sweep_n.impls_for(cfg, n)]  # noqa: E731
    assert "stock" in names(4096) and "stock-compiled" in names(4096)
    assert names(1 << 20) == ["ours-torch", "floor-blocked", "floor"]  # peers stop at peer_max_n


def _inputs(n=300, d=24, v=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    return h, w, torch.randint(0, v, (n,), generator=g)


def test_sampled_rows_match_float64_and_catch_a_wrong_gradient():
    from hf_fusedce.ops import fused_linear_cross_entropy

    h, w, y = _inputs()
    fused_linear_cross_entropy(h, w, y, backend="torch").backward()
    good = sweep_n.sampled_rows(h, w, y, h.grad, 32, 0)
    assert good["rows_checked"] == 32 and good["rows_loss_max_abs_err"] < 1e-5 and good["rows_dh_max_rel_err"] < 1e-5
    bad = sweep_n.sampled_rows(h, w, y, h.grad * (1 + 1e-3), 32, 0)  # a 0.1% gradient error
    assert bad["rows_dh_max_rel_err"] > 5e-4


def test_compiled_code_is_measured_outside_the_tracker():
    """Under a TorchDispatchMode dynamo runs compiled code eagerly, so the tracker would report the eager code's
    memory: a compiled block reads the peak RSS instead (Linux)."""
    with measure_peak("cpu", compiled=True) as reading:
        x = torch.ones(256 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold (32 MiB): fresh pages
        x.add_(1)
    del x
    assert reading.method in ("rss_peak", "live_tensor_tracker")  # the tracker only where /proc cannot reset
    if reading.method == "rss_peak":
        assert reading.peak_bytes >= 250 << 20
    with measure_peak("cpu") as tracked:
        torch.ones(1 << 20, dtype=torch.uint8)
    assert tracked.method == "live_tensor_tracker" and tracked.peak_bytes == 1 << 20


def test_stock_compiled_peer_gives_stocks_numbers():
    h, w, y = _inputs(64, 16, 200)
    compiled = bench_impls.IMPLS["stock-compiled"]
    assert compiled.compiled and compiled.kind == "peer"
    out = []
    for name in ("stock", "stock-compiled"):
        h.grad = w.grad = None
        loss = bench_impls.IMPLS[name].resolve(torch.device("cpu"))(h, w, y)
        loss.backward()
        out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # inductor reorders fp32 sums: rounding only


def _sweep(argv) -> int:
    return main(["bench", "sweep-n", *argv])


def test_a_tiny_sweep_writes_its_table_and_chart(tmp_path, monkeypatch):
    """Both regimes: full D with peers and a float64 reference, then D cut, ours once with sampled rows checked."""
    monkeypatch.setitem(shapes.REAL_HEADS, "tiny", shapes.Shape("tiny", 32, 700))
    out = tmp_path / "sweep"
    assert _sweep(["--heads", "tiny", "--n", "128,1536", "--impls", "ours-torch,floor-blocked,floor,stock",
                   "--full-d-max-n", "1024", "--reduced-d", "8", "--floor-rows", "512", "--rounds", "1",
                   "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    recs = {(r["N"], r["impl"]): r for r in doc["records"]}
    assert recs[(128, "ours-torch")]["D"] == 32 and recs[(128, "stock")]["status"] == "ok"
    assert recs[(128, "ours-torch")]["loss_rel_err"] < 1e-5  # the float64 reference of the full-D regime
    big = recs[(1536, "ours-torch")]
    assert big["D"] == 8 and big["shape"] == "tiny@d8" and "hidden size cut" in big["regime"]
    assert big["rows_dh_max_rel_err"] < 1e-5 and recs[(1536, "floor-blocked")]["x_3gemm"] == 1.0
    assert (1536, "stock") not in recs  # no peer where the hidden size is cut
    text = (out / "sweep.md").read_text()
    assert "| 128 | 32 | ours-torch |" in text and "| 1536 | 8 | ours-torch |" in text
    assert (out / "sweep.png").stat().st_size > 0


def test_the_one_command_spelling_runs_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setitem(shapes.REAL_HEADS, "tiny", shapes.Shape("tiny", 32, 700))
    out = tmp_path / "sweep"
    assert main(["bench", "--sweep-n", "--shapes", "tiny", "--n", "128", "--impls", "ours-torch,floor",
                 "--rounds", "1", "--out", str(out)]) == 0
    assert "| 128 | 32 | ours-torch |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("argv", [["--sweep-n", "--shapes", "nope"], ["--sweep-n", "--impls", "nope"]])
def test_unknown_names_are_refused(argv, capsys):
    assert main(["bench", *argv]) == 2
    assert "unknown nope" in capsys.readouterr().err
