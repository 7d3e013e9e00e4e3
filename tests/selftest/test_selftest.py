"""`hf-fusedce selftest` on this CPU: green on the real op, red (exit 1) on an injected wrong gradient, its JSON
naming the device and every check's verdict and figures."""
from __future__ import annotations

import json

import pytest
import torch

from hf_fusedce.cli.main import main
from hf_fusedce.ops.ce import torch_impl
from hf_fusedce.selftest import speed


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    rc = main(["selftest", "--quick", "--device", "cpu", "--out", str(out)])
    return rc, json.loads((out / "selftest.json").read_text()), out


def test_quick_selftest_is_green_and_writes_its_record(quick_run):
    rc, doc, out = quick_run
    failed = [(c["group"], c["name"], c["detail"][:300]) for c in doc["checks"] if c["status"] == "fail"]
    assert rc == 0 and doc["ok"] and not failed, failed
    assert doc["machine"]["device"].startswith("CPU") and doc["machine"]["torch"] == torch.__version__
    assert 0.5 < doc["machine"]["memory_gib"] < 4096  # GiB, not another unit
    groups = {c["group"] for c in doc["checks"]}
    assert groups == {"machine", "numbers", "memory", "time", "patch"}
    names = " | ".join(c["name"] for c in doc["checks"])
    for part in ("softcap", "soft targets", "ignored tokens", "z-loss", "label smoothing", "logit scale",
                 "interpreted", "twin", "distillation", "token statistics", "qwen2.5-0.5b head", "TRL SFT", "LoRA",
                 "tiny Llama", "cost model", "three GEMMs"):
        assert part in names, part
    for c in doc["checks"]:
        if c["group"] == "numbers" and c["status"] == "pass" and "dhidden err" in c["figures"]:
            assert c["figures"]["dhidden err"] < 0.05, c  # a figure, not a placeholder
    peers = {c["name"]: c for c in doc["checks"] if c["group"] == "memory"}
    assert peers["ours-torch"]["status"] == "pass" and peers["ours-torch"]["figures"]["vs stock"] < 0.5
    assert peers["liger"]["status"] == "skipped" and peers["liger"]["detail"]  # the reason
    assert (out / "selftest.md").read_text().startswith("# hf-fusedce selftest (quick): PASS")


def test_an_injected_wrong_gradient_fails_the_selftest(monkeypatch, tmp_path, capsys):
    """The torch row function's gradient made 3% too large (beyond bf16's own rounding, ~0.4% per element): the
    float64 checks see it in fp32 and in bf16, the command exits 1."""
    real = torch_impl.ce_rows

    def wrong(z, rows, spec, compute_grad, *args, **kwargs):
        loss = real(z, rows, spec, compute_grad, *args, **kwargs)
        if compute_grad:
            z.mul_(1.03)
        return loss

    monkeypatch.setattr(torch_impl, "ce_rows", wrong)
    rc = main(["selftest", "--device", "cpu", "--only", "numbers/plain", "--only", "numbers/all together, bf16",
               "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "selftest.json").read_text())
    assert rc == 1 and not doc["ok"]
    failed = {c["name"] for c in doc["checks"] if c["status"] == "fail"}
    assert {"plain, fp32, torch", "plain, bf16, torch", "all together, bf16, torch"} <= failed
    assert all("dhidden" in c["detail"] or "dweight" in c["detail"] for c in doc["checks"] if c["status"] == "fail")
    assert "FAIL numbers/plain, fp32, torch" in capsys.readouterr().out


def test_memory_above_stock_is_a_failure():
    records = [{"impl": "ours-torch", "status": "ok", "peak_above_grads_bytes": 3 << 20, "fwd_bwd_ms": 1.0},
               {"impl": "stock", "status": "ok", "peak_above_grads_bytes": 2 << 20, "fwd_bwd_ms": 1.0},
               {"impl": "liger", "status": "skipped: not installed (No module named 'liger_kernel')"}]
    checks = {c.name: c for c in speed.memory_checks(records, "ours-torch")}
    assert checks["ours-torch"].status == "fail" and checks["stock"].status == "info"
    assert checks["liger"].status == "skipped" and "not installed" in checks["liger"].detail
