"""The edge rules of a patched model, one test per row of the deviation table in docs/patching.md ("Where a
patched model differs from stock"): each test measures stock too, so a stock that changes its rule fails here
and the table is re-read. tests/ops/test_hostile.py holds the same rules at the op level."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

import hf_fusedce
from hf_fusedce.testing import rel_err, tiny_batch, tiny_llama

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _pair(**config):
    stock = tiny_llama(**config)
    return stock, hf_fusedce.patch(copy.deepcopy(stock), backend="torch")


def _loss_and_grads(model, **call):
    model.zero_grad(set_to_none=True)
    loss = model(**call).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_every_label_ignored_gives_zero_where_stock_gives_nan():
    stock, model = _pair()
    ids, _ = tiny_batch()
    ignored = torch.full_like(ids, -100)
    s_loss, s_grads = _loss_and_grads(stock, input_ids=ids, labels=ignored)
    loss, grads = _loss_and_grads(model, input_ids=ids, labels=ignored)
    assert math.isnan(s_loss) and loss.item() == 0.0
    assert all(not g.any() for g in s_grads.values()) and all(not g.any() for g in grads.values())


def test_every_label_ignored_with_num_items_equals_stock():
    """Trainer's gradient-accumulation path: stock itself gives 0 for an all-ignored micro-batch; 0 items (no
    token in the whole accumulated batch) is NaN for stock, 0 for us."""
    stock, model = _pair()
    ids, _ = tiny_batch()
    ignored = torch.full_like(ids, -100)
    for items, stock_rule in ((torch.tensor(7), lambda x: x == 0.0), (torch.tensor(0), math.isnan)):
        s_loss, _ = _loss_and_grads(stock, input_ids=ids, labels=ignored, num_items_in_batch=items)
        loss, _ = _loss_and_grads(model, input_ids=ids, labels=ignored, num_items_in_batch=items)
        assert stock_rule(s_loss.item()) and loss.item() == 0.0, items


def test_inf_in_the_head_weight_is_non_finite_like_stock():
    """+inf logits: stock NaN (its max-shift computes inf - inf), ours +inf; the gradients non-finite in both."""
    stock, model = _pair()
    for m in (stock, model):
        with torch.no_grad():
            m.lm_head.weight[3, 0] = float("inf")
    ids, labels = tiny_batch()
    s_loss, s_grads = _loss_and_grads(stock, input_ids=ids, labels=labels)
    loss, grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert math.isnan(s_loss) and loss.item() == math.inf
    assert not s_grads["lm_head.weight"].isfinite().all() and not grads["lm_head.weight"].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_narrow_integer_labels_are_accepted_with_int64_numbers(dtype):
    stock, model = _pair()
    ids, labels = tiny_batch()
    with pytest.raises(RuntimeError, match="expected target dtype"):
        stock(input_ids=ids, labels=labels.to(dtype))
    s_loss, s_grads = _loss_and_grads(stock, input_ids=ids, labels=labels)
    loss, grads = _loss_and_grads(model, input_ids=ids, labels=labels.to(dtype))
    assert rel_err(loss, s_loss) <= 1e-5
    for name, g in s_grads.items():
        assert rel_err(grads[name], g) <= 1e-5, name


def test_labels_outside_the_vocabulary_are_a_value_error():
    stock, model = _pair()
    ids, labels = tiny_batch()
    labels[1, 3] = 97  # vocab_size
    with pytest.raises((IndexError, RuntimeError)):
        stock(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=ids, labels=labels)


def test_training_logits_are_none_unless_asked():
    stock, model = _pair()
    ids, labels = tiny_batch()
    assert model(input_ids=ids, labels=labels).logits is None
    hf_fusedce.patch(model, backend="torch", return_logits=True)
    logits = model(input_ids=ids, labels=labels).logits
    assert not logits.requires_grad and rel_err(logits, stock(input_ids=ids).logits.detach()) <= 1e-5


def test_the_table_and_the_op_page_name_the_same_rules():
    """One table lists the deviations; the op page states the same three edge rules and links to it."""
    patching, op = (DOCS / "patching.md").read_text(), (DOCS / "op.md").read_text()
    table = patching.split("## Where a patched model differs from stock")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Case")]
    cases = {"Every label ignored": "loss 0.0", "num_items_in_batch=0": "loss 0.0", "+inf": "loss `+inf`",
             "int32": "accepted"}
    for case, ours in cases.items():
        (row,) = [r for r in rows if case in r]
        assert ours in row, row
    assert "#where-a-patched-model-differs-from-stock-every-deliberate-deviation" in op
    for rule in ("loss of exactly 0", "gives `+inf` where stock gives NaN", "any integer dtype"):
        assert rule in op, rule
    assert re.search(r"all tokens ignored -> 0.*\+inf logit -> \+inf.*any integer dtype",
                     hf_fusedce.fused_linear_cross_entropy.__doc__.replace("\n", " "))
