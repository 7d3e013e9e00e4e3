"""Forward fingerprints (hf/recorded.py): patch() notices when a family's forward or loss code is not the code its
proof ran on, warns once naming the family and the command, and `hf-fusedce check` re-proves and silences it."""
from __future__ import annotations

import warnings

import pytest
import transformers
from transformers import LlamaForCausalLM

import hf_fusedce
from hf_fusedce.cli.main import main
from hf_fusedce.hf import recorded
from hf_fusedce.testing import tiny_llama


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No family warned yet, an empty local re-proof file, the llama record's fingerprint = today's code."""
    monkeypatch.setattr(recorded, "_WARNED", set())
    monkeypatch.setenv("HF_FUSEDCE_CACHE", str(tmp_path))
    rec = {**recorded.recorded_result("llama"), "fingerprint": recorded.fingerprint(tiny_llama()),
           "transformers": "4.0.test"}
    monkeypatch.setattr(recorded, "_recorded", lambda: {"llama": rec})
    return rec


def _changed_forward(monkeypatch):
    stock = LlamaForCausalLM.forward

    def forward(self, *args, **kwargs):  # other code, same behaviour (no __wrapped__: a real edit)
        return stock(self, *args, **kwargs)

    forward.__module__ = stock.__module__  # as if the installed transformers had this code
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)


def _hf_fusedce_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if "hf_fusedce" in str(w.message)]


def test_fingerprint_names_the_forwards_and_the_loss():
    prints = recorded.fingerprint(tiny_llama())
    assert {"LlamaForCausalLM.forward", "LlamaModel.forward", "ForCausalLMLoss", "fixed_cross_entropy"} <= set(prints)
    assert recorded.fingerprint(tiny_llama(tie=True, hidden_size=64)) == prints  # the code, not the weights


def test_unchanged_code_is_silent(fresh):
    assert _hf_fusedce_warnings(lambda: hf_fusedce.patch(tiny_llama(), backend="torch")) == []


def test_a_changed_forward_warns_once_naming_the_family_and_the_command(fresh, monkeypatch):
    _changed_forward(monkeypatch)
    said = _hf_fusedce_warnings(lambda: hf_fusedce.patch(tiny_llama(), backend="torch"))
    assert len(said) == 1, said
    assert "'llama'" in said[0] and "transformers 4.0.test" in said[0] and "LlamaForCausalLM.forward" in said[0]
    assert "`hf-fusedce check --model-type llama`" in said[0] and "LlamaModel.forward" not in said[0]
    assert _hf_fusedce_warnings(lambda: hf_fusedce.patch(tiny_llama(), backend="torch")) == []  # once


def test_a_changed_loss_function_warns(fresh, monkeypatch):
    from transformers.loss.loss_utils import LOSS_MAPPING
    stock = LOSS_MAPPING["ForCausalLM"]
    changed = lambda *a, **k: stock(*a, **k)  # noqa: E731
    changed.__module__ = stock.__module__
    monkeypatch.setitem(LOSS_MAPPING, "ForCausalLM", changed)
    said = _hf_fusedce_warnings(lambda: hf_fusedce.patch(tiny_llama(), backend="torch"))
    assert len(said) == 1 and "<lambda>" in said[0] and "fixed_cross_entropy" in said[0]


def test_another_librarys_forward_is_not_a_change_of_transformers(fresh, monkeypatch):
    """A forward assigned by Liger (composed by hf.patching) is not transformers' code: nothing to re-prove."""
    stock = LlamaForCausalLM.forward

    def lce_forward(self, *args, **kwargs):
        return stock(self, *args, **kwargs)

    lce_forward.__module__ = "liger_kernel.transformers.model.llama"
    monkeypatch.setattr(LlamaForCausalLM, "forward", lce_forward)
    assert recorded.fingerprint(tiny_llama())["LlamaForCausalLM.forward"] is None
    assert _hf_fusedce_warnings(lambda: hf_fusedce.patch(tiny_llama(), backend="torch")) == []


def test_class_patching_warns_when_the_model_is_built(fresh, monkeypatch):
    _changed_forward(monkeypatch)
    hf_fusedce.patch(backend="torch")
    try:
        said = _hf_fusedce_warnings(tiny_llama)
    finally:
        hf_fusedce.unpatch()
    assert len(said) == 1 and "'llama'" in said[0]


def test_check_reproves_a_changed_family_and_silences_the_warning(fresh, monkeypatch, capsys):
    _changed_forward(monkeypatch)
    assert main(["check", "--model-type", "llama"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("proven   llama") and f"transformers {transformers.__version__}" in out
    assert recorded.local_path().exists()
    assert _hf_fusedce_warnings(lambda: hf_fusedce.patch(tiny_llama(), backend="torch")) == []


def test_shipped_fingerprints_are_the_installed_code():
    """On the transformers the committed proof ran on, the families' code is the code fingerprinted."""
    from hf_fusedce.hf import proof
    version = recorded.recorded_result("llama")["transformers"]
    if version != transformers.__version__:
        pytest.skip(f"the committed proof ran on transformers {version}, installed {transformers.__version__}")
    for model_type in ("llama", "gemma2", "mixtral", "qwen2"):
        assert recorded.changed_code(proof.build(model_type), model_type) == [], model_type
