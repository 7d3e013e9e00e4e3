"""hf_fusedce.bench.mlm_head at a small shape: fused == stock (loss, dh, dW, db) and the fused step keeps less alive
than stock's full logits (85% of the positions ignored)."""
from hf_fusedce.bench import mlm_head


def test_mlm_head_bench_small():
    res = mlm_head.run(tokens=256, hidden=32, vocab=3001, mask_rate=0.15, reps=1)
    assert 0 < res["shape"]["labelled"] < 256 * 0.3
    # Fixed: the bench's own recorded error figure (its output format) at one small shape.
    assert all(err <= 1e-5 for err in res["rel_err"].values()), res["rel_err"]
    assert res["fused"]["peak_mib"] < res["stock"]["peak_mib"]
    assert res["stock"]["peak_mib"] >= 2 * 256 * 3001 * 4 / 2**20  # logits and their gradient, at least


def test_mlm_head_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert mlm_head.main(["--tokens", "64", "--hidden", "16", "--vocab", "501", "--reps", "1", "--out", str(out)]) == 0
    assert '"speedup"' in out.read_text()


def test_hf_fusedce_bench_mlm_writes_its_results(tmp_path):
    import json

    from hf_fusedce.cli.main import main
    assert main(["bench", "mlm", "--shapes", "32x3001", "--n", "256", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "mlm_head.json").read_text())
    assert doc["command"][:2] == ["hf-fusedce", "bench"] and "mlm" in doc["command"]
    (res,) = doc["results"]
    assert res["shape"]["hidden"] == 32 and res["shape"]["vocab"] == 3001 and res["shape"]["tokens"] == 256
    assert all(err <= 1e-5 for err in res["rel_err"].values())
    assert "3001" in (tmp_path / "mlm_head.md").read_text()
