"""What a newcomer's slips get: a chunk budget <= 0 rejected, a tiny one warned about, a bad
HF_FUSEDCE_CHUNK_BUDGET_MB named, a model on the meta device and a non-model refused by patch."""
from __future__ import annotations

import pytest
import torch

import hf_fusedce
from hf_fusedce import fused_linear_cross_entropy
from hf_fusedce.ops.planning.chunking import ENV_BUDGET_MB
from hf_fusedce.testing import make_inputs


@pytest.mark.parametrize("budget", [0, -1, -64.0])
def test_budget_not_positive_is_rejected(budget, tiny_llama):
    h, w, t = make_inputs(8, 50, 4)
    with pytest.raises(ValueError, match="chunk_budget_bytes must be a number of bytes > 0"):
        fused_linear_cross_entropy(h, w, t, chunk_budget_bytes=budget)
    with pytest.raises(ValueError, match="chunk_budget_bytes must be a number of bytes > 0"):
        hf_fusedce.patch(tiny_llama(), chunk_budget_bytes=budget)


def test_tiny_budget_warns_and_still_computes(tiny_llama):
    h, w, t = make_inputs(8, 50, 4)
    with pytest.warns(UserWarning, match=r"chunk_budget_bytes = 64 bytes is below 1 MiB.*64 \* 2\*\*20"):
        tiny = fused_linear_cross_entropy(h, w, t, chunk_budget_bytes=64)
    torch.testing.assert_close(tiny, fused_linear_cross_entropy(h, w, t))
    with pytest.warns(UserWarning, match="below 1 MiB") as record:
        hf_fusedce.patch(tiny_llama(), chunk_budget_bytes=64)
    assert record[0].filename == __file__  # points at the caller's line


def test_budget_env_var_that_is_not_a_number_is_named(monkeypatch):
    h, w, t = make_inputs(8, 50, 4)
    monkeypatch.setenv(ENV_BUDGET_MB, "abc")
    with pytest.raises(ValueError, match=f"{ENV_BUDGET_MB}='abc' is not a number"):
        fused_linear_cross_entropy(h, w, t)
    monkeypatch.setenv(ENV_BUDGET_MB, "0")
    with pytest.raises(ValueError, match=f"{ENV_BUDGET_MB}=0"):
        fused_linear_cross_entropy(h, w, t)


@pytest.mark.parametrize("thing", ["not a model", 3, torch.nn.Linear(2, 2)])
def test_patch_of_something_else_is_a_type_error(thing):
    with pytest.raises(TypeError, match="expects a transformers causal LM"):
        hf_fusedce.patch(thing)


def test_patch_of_a_model_on_the_meta_device_is_refused(tiny_llama):
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        hf_fusedce.patch(model)
