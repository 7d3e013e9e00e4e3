"""Model-level hostile cases for a patched HF model (issue 6): gradient checkpointing, torch.compile, deepcopy and
pickling, save_pretrained -> stock from_pretrained, repeated patch/unpatch. Tiny Llama on CPU.

Loss and gradients of the patched model are compared with the stock model on the same weights (the fused path
only runs in training mode with labels; a spy on hf_fusedce.hf.forward._head_loss tells which path ran).
"""
from __future__ import annotations

import copy
import io
import pickle
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
patching = pytest.importorskip("hf_fusedce.hf.patching")

from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from hf_fusedce import testing  # noqa: E402
from hf_fusedce.hf import forward  # noqa: E402


def fused_spy():
    return mock.patch.object(forward, "_head_loss", wraps=forward._head_loss)

patch, unpatch, is_patched, patched = patching.patch, patching.unpatch, patching.is_patched, patching.patched

VOCAB = 160


def tiny_llama(tied=True, seed=0) -> LlamaForCausalLM:
    return testing.tiny_llama(VOCAB, tie=tied, seed=seed, max_position_embeddings=64)


def batch(seed=1):
    ids, labels = testing.tiny_batch(VOCAB, seq=12, seed=seed)
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, inputs, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **extra)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone()  # torch.compile's wrapper prefix
             for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def assert_same_training(stock_model, fused_model, inputs, rtol=2e-5, atol=2e-6, **extra):
    with fused_spy() as fused_path:
        loss_f, grads_f = loss_and_grads(fused_model, inputs, **extra)
    assert fused_path.call_count > 0, "the fused path did not run"
    loss_s, grads_s = loss_and_grads(stock_model, inputs, **extra)
    torch.testing.assert_close(loss_f, loss_s, rtol=rtol, atol=atol)
    assert grads_f.keys() == grads_s.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_f[name], grads_s[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def twins(tied=True):
    """A stock model and a patched one with identical weights (built from the same seed, not copied)."""
    return tiny_llama(tied), patch(tiny_llama(tied), backend="torch")


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradient_checkpointing(tied, reentrant):
    stock, fused = twins(tied)
    for m in (stock, fused):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.config.use_cache = False
    assert_same_training(stock, fused, batch())


@pytest.mark.parametrize("compile_backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow),
                                             pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile(compile_backend):
    """torch.compile of a patched model: dynamo traces it (graph breaks at the head-input capture) or falls back;
    loss and gradients stay those of stock, on the first call and on a cached second call. ~15 s (dynamo traces
    the whole tiny Llama); the aot_eager/inductor variants are slow."""
    torch._dynamo.reset()
    stock, fused = twins()
    compiled = torch.compile(fused, backend=compile_backend)
    tol = {"rtol": 1e-4, "atol": 1e-5} if compile_backend == "inductor" else {}
    assert_same_training(stock, compiled, batch(), **tol)
    assert_same_training(stock, compiled, batch(seed=2), **tol)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_deepcopy_of_patched_model_is_patched_and_independent():
    """The copy must be patched, fused, and compute with ITS OWN weights (a forward closure that still points at
    the original model would silently train the original: the bug fixed in a4916a1)."""
    stock, fused = twins()
    clone = copy.deepcopy(fused)
    assert is_patched(clone)
    _perturb(clone)
    stock_clone = tiny_llama()
    stock_clone.load_state_dict(clone.state_dict())
    assert_same_training(stock_clone, clone, batch())
    # the copy's gradients landed on the copy, not on the original
    assert all(p.grad is None for p in fused.parameters())
    assert all(p.grad is not None for p in clone.parameters() if p.requires_grad)
    # and the original is unaffected
    assert_same_training(stock, fused, batch())


def test_deepcopy_then_unpatch_copy_leaves_original_patched():
    _, fused = twins()
    clone = copy.deepcopy(fused)
    unpatch(clone)
    assert not is_patched(clone) and "forward" not in clone.__dict__
    assert is_patched(fused)
    with fused_spy() as fused_path:
        fused(**batch()).loss.backward()
    assert fused_path.call_count == 1


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickling_patched_model(how):
    """A patched model pickles (torch.save(model), multiprocessing, Ray...) and the loaded one trains like stock."""
    stock, fused = twins()
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(fused))
    else:
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    _perturb(loaded)
    stock.load_state_dict(loaded.state_dict())
    loss_l, grads_l = loss_and_grads(loaded, batch())
    loss_s, grads_s = loss_and_grads(stock, batch())
    torch.testing.assert_close(loss_l, loss_s, rtol=2e-5, atol=2e-6)
    for name in grads_s:
        torch.testing.assert_close(grads_l[name], grads_s[name], rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_pretrained_loads_in_stock_transformers(tmp_path, tied):
    """save_pretrained of a patched (and trained one step) model loads with stock from_pretrained and gives
    identical outputs; nothing of hf_fusedce leaks into the config or the checkpoint."""
    _, fused = twins(tied)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(**batch()).loss.backward()
    opt.step()
    fused.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "fusedce" not in text.lower()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LlamaForCausalLM and not is_patched(loaded)
    assert "forward" not in loaded.__dict__
    loaded.train()
    sd_f, sd_l = fused.state_dict(), loaded.state_dict()
    assert sd_f.keys() == sd_l.keys()
    for k in sd_f:
        assert torch.equal(sd_f[k], sd_l[k]), k
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    inputs = batch(seed=3)
    with torch.no_grad():
        unpatched_fused = copy.deepcopy(fused)
        unpatch(unpatched_fused)
        torch.testing.assert_close(loaded(input_ids=inputs["input_ids"]).logits,
                                   fused(input_ids=inputs["input_ids"]).logits, rtol=0, atol=0)
    assert_same_training(loaded, fused, inputs)


def test_save_pretrained_while_class_patched(tmp_path):
    """patch() with no model patches classes; a checkpoint saved then loads into an unpatched class as stock."""
    model = tiny_llama()
    patch(backend="torch")
    try:
        saved = tiny_llama()
        assert is_patched(saved)
        saved.save_pretrained(tmp_path)
    finally:
        unpatch()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not is_patched(loaded)
    model.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(loss_and_grads(loaded, batch())[0], loss_and_grads(model, batch())[0],
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
def test_repeated_patch_and_unpatch():
    stock, model = tiny_llama(), tiny_llama()
    stock_forward = type(model).forward
    attributes = set(model.__dict__)
    for _ in range(3):
        patch(model, backend="torch")
        patch(model, backend="torch")  # twice == once
        assert is_patched(model)
        assert_same_training(stock, model, batch())
        unpatch(model)
        assert not is_patched(model)
        assert set(model.__dict__) == attributes  # nothing of the patch is left on the instance
        assert type(model).forward is stock_forward
        with fused_spy() as fused_path:
            model(**batch()).loss.backward()
        assert fused_path.call_count == 0, "fused path ran after unpatch"
    unpatch(model)  # unpatching an unpatched model is a no-op
    assert not is_patched(model)


def test_patch_refreshes_options():
    model = patch(tiny_llama(), backend="torch", label_smoothing=0.0)
    base = model(**batch()).loss
    patch(model, backend="torch", label_smoothing=0.2)
    smoothed = model(**batch()).loss
    assert not torch.allclose(base, smoothed)
    unpatch(model)
    assert not is_patched(model)
    torch.testing.assert_close(model(**batch()).loss, base, rtol=2e-5, atol=2e-6)


def test_patch_preserves_user_instance_forward():
    """An instance forward installed by someone else (a wrapper, accelerate's convert_to_fp32 hook...) is kept
    beneath the patch and restored exactly by unpatch."""
    model = tiny_llama()
    stock_bound = model.forward
    calls = []

    def user_forward(*a, **k):
        calls.append(1)
        return stock_bound(*a, **k)

    model.forward = user_forward
    patch(model, backend="torch")
    patch(model, backend="torch")
    model(**batch())
    assert calls, "the user's forward was bypassed"
    unpatch(model)
    assert model.__dict__["forward"] is user_forward


def test_patched_context_manager_and_class_patch_interplay():
    stock_class_forward = LlamaForCausalLM.__dict__["forward"]
    model = tiny_llama()
    with patched(model, backend="torch"):
        assert is_patched(model)
    assert not is_patched(model)
    patch(backend="torch")
    try:
        inst = tiny_llama()
        assert is_patched(inst)
        patch(inst, backend="torch")  # instance patch on top of a class patch
        unpatch(inst)
        assert is_patched(inst)  # still class-patched
        with fused_spy() as fused_path:
            inst(**batch()).loss.backward()
        assert fused_path.call_count == 1
    finally:
        unpatch()
    assert not is_patched(tiny_llama())
    assert LlamaForCausalLM.__dict__["forward"] is stock_class_forward  # the class patch is undone exactly


def test_generate_and_signature_after_patch():
    import inspect

    model = patch(tiny_llama(), backend="torch")
    model.eval()
    params = inspect.signature(model.forward).parameters
    assert "logits_to_keep" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())
    out = model.generate(batch()["input_ids"][:, :4], max_new_tokens=3, do_sample=False)
    ref = tiny_llama().eval().generate(batch()["input_ids"][:, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
