"""TRL's fused_lm_head protocol (per-token log-probs, entropy, log sum of squared probs, mean logit, top-1 hit) on
the multimodal families, served by hf_fusedce's head on each family's image / audio batch
(hf_fusedce.hf.multimodal_batches): every field and the gradients of every parameter (vision / audio tower
included) equal what the UNPATCHED model's own logits give (log_softmax of logits / temperature), fp32. The
reference is the model's forward, not TRL's head: TRL's head rebuilds the post-head transform from config names
and looks the backbone up as `base_model`, which not every family fits."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")

import hf_fusedce  # noqa: E402
from hf_fusedce.hf import multimodal_batches as mb  # noqa: E402
from hf_fusedce.hf.proof import build_media_batch, media_proven_types  # noqa: E402

TEMPERATURE = 0.7
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FAMILIES = sorted(set(mb.BATCHES) | set(mb.EXTRA))  # ~60 tiny models, about a second each


def _reference(stock, ids, labels, extra):
    """The protocol's fields from the stock model's logits (its own post-head transform included)."""
    z = stock(input_ids=ids, use_cache=False, **extra).logits[:, :-1].float() / TEMPERATURE
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(z, -1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    fields = {"log_probs": picked, "entropy": -(logp.exp() * logp).sum(-1),
              "log_sum_sq_probs": torch.logsumexp(2 * logp, -1), "mean_logits": z.mean(-1),
              "is_top1": z.argmax(-1) == targets}
    return fields, mask


def _backward(model, fields, mask):
    """A loss mixing log_probs and entropy over the scored tokens, backward; the parameter gradients."""
    weights = torch.linspace(-1, 1, int(mask.sum()))
    ((weights * fields["log_probs"][mask]).sum() + 0.3 * fields["entropy"][mask].sum()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check(model_type):
    import trl.trainer.utils as tu

    if model_type not in media_proven_types():
        pytest.skip(f"{model_type}: no recorded media proof")
    stock, ids, labels, extra = build_media_batch(model_type)
    model = copy.deepcopy(stock)
    hf_fusedce.patch(model)
    tu.add_fused_lm_head(model, temperature=TEMPERATURE, outputs=FIELDS)  # as TRL's trainers do
    assert hf_fusedce.is_patched(model)
    torch.manual_seed(0)
    ref, mask = _reference(stock, ids, labels, extra)
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels, use_cache=False, fused_lm_head=True, **extra)
    assert torch.equal(out.label_mask, mask)
    for name in FIELDS:
        got = getattr(out, name)
        assert got.shape == mask.shape, name
        if name == "is_top1":
            assert torch.equal(got[mask], ref[name][mask]), name
        else:
            # Fixed: per-token fields of two fused float32 heads (ours, TRL's) from the same hidden states; the
            # anchored comparison of the same protocol is tests/integrations/test_trl_protocol.py.
            err = (got[mask] - ref[name][mask]).abs().max() / ref[name][mask].abs().max().clamp(min=1e-6)
            assert err <= 1e-5, f"{name}: {err:.2e}"
    g_ref, g = _backward(stock, ref, mask), _backward(model, {n: getattr(out, n) for n in FIELDS}, mask)
    assert g.keys() == g_ref.keys()
    floor = 1e-3 * max(t.abs().max() for t in g_ref.values())  # zero-in-exact-arithmetic gradients are noise
    for name, t in g_ref.items():
        assert (g[name] - t).abs().max() <= 1e-5 * max(t.abs().max(), floor), name
    media = {n for n in g_ref if "vision" in n or "visual" in n or "audio" in n or "projector" in n}
    assert media, "no encoder / projector parameter got a gradient: the media did not reach the model"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_protocol_on_media_batch(model_type):
    _check(model_type)
