"""TRL's fused_lm_head protocol served by hf_fusedce's head, without a trainer: every FusedCausalLMOutput field
and the gradients through log_probs and entropy equal TRL's own head (fp32) with the patch made before or after
TRL's add_fused_lm_head; a TRL head installed over the patch by a path hf_fusedce does not intercept is
reported (is_patched False, one warning naming TRL)."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")

import hf_fusedce  # noqa: E402
from hf_fusedce.testing import (MODEL_EPS, ModelRun, assert_as_accurate_as_materialized,  # noqa: E402
                                assert_model_as_accurate_as_stock, rel_err)
from integration_helpers import tiny_llama  # noqa: E402

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
HEAD = dict(temperature=0.7, outputs=FIELDS)


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return 301


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 301, (3, 13), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 9:] = -100
    return ids, labels


def _outputs_and_grads(model):
    ids, labels = _batch()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    weights = torch.linspace(-1, 1, out.log_probs.numel()).reshape(out.log_probs.shape)
    ((weights * out.log_probs).sum() + (0.3 * out.entropy).sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _trl_reference(dtype=torch.float32):
    import trl.trainer.utils as tu
    model = tiny_llama(_Tok()).to(dtype)
    getattr(tu.add_fused_lm_head, "__wrapped__", tu.add_fused_lm_head)(model, **HEAD)  # TRL's own head
    return _outputs_and_grads(model)


def _assert_same(ours, theirs, exact=None):
    """Every field and gradient of ours as close to TRL's head on the float64 model as TRL's in float32 is."""
    (o, og), (t, tg) = ours, theirs
    e, eg = exact or _trl_reference(torch.float64)
    for name in (*FIELDS, "label_mask", "loss"):
        a, b = getattr(o, name), getattr(t, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            assert_as_accurate_as_materialized(a, getattr(e, name), b, eps=MODEL_EPS, name=name)
    assert_model_as_accurate_as_stock(ModelRun(o.loss, og), ModelRun(t.loss, tg), ModelRun(e.loss, eg))


def test_patch_then_trl_head(op_spy):
    import trl.trainer.utils as tu
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    tu.add_fused_lm_head(model, **HEAD)  # what every TRL trainer's __init__ calls
    assert hf_fusedce.is_patched(model)
    _assert_same(_outputs_and_grads(model), _trl_reference())
    assert op_spy.calls == 1


def test_trl_head_then_patch(op_spy):
    import trl.trainer.utils as tu
    model = tiny_llama(_Tok())
    getattr(tu.add_fused_lm_head, "__wrapped__", tu.add_fused_lm_head)(model, **HEAD)
    assert not hf_fusedce.is_patched(model)
    hf_fusedce.patch(model)  # finds TRL's head and reads its options (temperature, outputs)
    assert hf_fusedce.is_patched(model)
    _assert_same(_outputs_and_grads(model), _trl_reference())
    assert op_spy.calls == 1
    out = model(input_ids=_batch()[0][:, :4])  # without the flag: the stock forward (logits), as TRL's
    assert out.logits.shape == (3, 4, 301)


def test_trl_head_installed_over_the_patch_is_reported():
    import trl.trainer.utils as tu
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    getattr(tu.add_fused_lm_head, "__wrapped__", tu.add_fused_lm_head)(model)  # as an older TRL would
    assert not hf_fusedce.is_patched(model)
    ids, labels = _batch()
    with pytest.warns(UserWarning, match="replaced by TRL's fused LM head"):
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=labels, fused_lm_head=True)  # once


def test_label_smoothing_log_probs_are_the_smoothed_likelihood():
    """What the SFT label-smoothing path receives: -log_probs.sum()/n equals transformers' LabelSmoother."""
    from transformers.trainer_pt_utils import LabelSmoother

    from hf_fusedce.integrations import trl as trl_integration
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    ids, labels = _batch()
    stock = LabelSmoother(epsilon=0.1)(model(input_ids=ids), labels, shift_labels=True)
    token = trl_integration._LABEL_SMOOTHING.set(0.1)
    try:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    finally:
        trl_integration._LABEL_SMOOTHING.reset(token)
    assert rel_err(-out.log_probs.sum() / out.label_mask.sum(), stock) < 1e-6


def test_global_patch_serves_trl_head(op_spy):
    import trl.trainer.utils as tu
    hf_fusedce.patch()
    try:
        model = tiny_llama(_Tok())
        tu.add_fused_lm_head(model, **HEAD)
        assert hf_fusedce.is_patched(model) and "forward" not in model.__dict__  # the class forward serves it
        _assert_same(_outputs_and_grads(model), _trl_reference())
        assert op_spy.calls == 1
    finally:
        hf_fusedce.unpatch()
    with hf_fusedce.patched(model):
        assert hf_fusedce.is_patched(model)
    assert not hf_fusedce.is_patched(model)
