"""Liger Kernel composed with hf_fusedce, in either order: Liger's layer kernels stay (RoPE here: the one that
runs on CPU under the Triton interpreter), its fused linear cross-entropy forward is taken off, hf_fusedce's
head computes the loss, one info line. FusedCETrainer(use_liger_kernel=True) composes instead of refusing."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("liger_kernel")

import hf_fusedce  # noqa: E402
from integration_helpers import tiny_llama  # noqa: E402

ROPE_ONLY = dict(rope=True, rms_norm=False, swiglu=False)  # rms_norm / swiglu fail in the interpreter anyway


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return 300


@pytest.fixture(autouse=True)
def ce_calls(monkeypatch):
    """Counts calls of hf_fusedce's loss op made by the patched forward."""
    import hf_fusedce.hf.forward as fwd
    calls, real = [], fwd.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fwd, "fused_linear_cross_entropy", spy)
    _CALLS["list"] = calls
    return calls


_CALLS = {}


@pytest.fixture
def llama_rope_restored():
    """Liger swaps module-level functions of modeling_llama: put the stock ones back after the test."""
    from transformers.models.llama import modeling_llama
    saved = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward
    yield modeling_llama
    modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaForCausalLM.forward = saved


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def _stock_loss():
    model = tiny_llama(_Tok())
    ids, labels = _batch()
    return model(input_ids=ids, labels=labels).loss


def _check_composed(model, modeling_llama):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    assert hf_fusedce.is_patched(model)
    assert modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb  # Liger's layer kernel kept
    ids, labels = _batch()
    before = len(_CALLS["list"])
    loss = model(input_ids=ids, labels=labels).loss
    assert len(_CALLS["list"]) == before + 1  # hf_fusedce's head computed it
    return loss


def test_liger_after_patch(llama_rope_restored, caplog):
    import liger_kernel.transformers as lt
    stock = _stock_loss()
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    with caplog.at_level(logging.INFO, logger="hf_fusedce"):
        lt.apply_liger_kernel_to_llama(model=model, **ROPE_ONLY)  # fused_linear_cross_entropy defaults to True
    assert any("Liger Kernel composed" in r.message for r in caplog.records)
    loss = _check_composed(model, llama_rope_restored)
    # Fixed: the loss only (a scalar of ~4.6 on a tiny model), composition with Liger's patches is what is tested.
    assert abs(loss.item() - stock.item()) < 1e-5


def test_liger_before_patch(llama_rope_restored):
    import liger_kernel.transformers as lt
    stock = _stock_loss()
    model = tiny_llama(_Tok())
    lt.apply_liger_kernel_to_llama(model=model, **ROPE_ONLY)
    assert model.__dict__["forward"].__func__.__module__.startswith("liger_kernel")
    hf_fusedce.patch(model)
    loss = _check_composed(model, llama_rope_restored)
    assert abs(loss.item() - stock.item()) < 1e-5


def test_displaced_forward_warns_once_and_is_patched_tells(llama_rope_restored):
    """A forward from elsewhere (not one hf_fusedce composes with) replacing ours: is_patched is False and the
    first training forward says who took over."""
    import warnings
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    model.forward = lambda *a, **k: type(model).forward(model, *a, **k)
    assert not hf_fusedce.is_patched(model)
    ids, labels = _batch()
    with pytest.warns(UserWarning, match="was replaced by a forward from"):
        model(input_ids=ids, labels=labels)
    with warnings.catch_warnings(record=True) as seen:  # once: other libraries' warnings may recur (transformers
        warnings.simplefilter("always")                  # 5.25 warns on every call of Liger's copied forward)
        model(input_ids=ids, labels=labels)
    assert not [w for w in seen if "was replaced by a forward from" in str(w.message)]
    hf_fusedce.patch(model)  # puts the head back
    assert hf_fusedce.is_patched(model)


# ---- whatever way Liger's function was reached (issue 23) -----------------------------------------------------

def _early(fn):
    """The function a `from liger_kernel.transformers import ...` binds before hf_fusedce wraps it."""
    return getattr(fn, "__wrapped__", fn)


def _apply_fn(style):
    import liger_kernel.transformers as lt
    import liger_kernel.transformers.monkey_patch as mp
    if style == "bound_early":
        return _early(mp.apply_liger_kernel_to_llama)
    if style == "from_import":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        return apply_liger_kernel_to_llama
    if style == "module_attribute":
        return lt.apply_liger_kernel_to_llama
    if style == "monkey_patch":
        return mp.apply_liger_kernel_to_llama
    if style == "to_instance":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        return lambda model=None, **kw: _apply_liger_kernel_to_instance(model=model, **kw)
    if style == "to_instance_early_table":  # the table's entry as it was before hf_fusedce wrapped it
        return _early(mp.MODEL_TYPE_TO_APPLY_LIGER_FN["llama"])
    raise AssertionError(style)


STYLES = ["bound_early", "from_import", "module_attribute", "monkey_patch", "to_instance",
          "to_instance_early_table"]


def _loss_and_grads(model):
    ids, labels = _batch()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _stock_loss_and_grads():
    return _loss_and_grads(tiny_llama(_Tok()))


def _assert_like_stock(model, stock, modeling_llama):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    assert hf_fusedce.is_patched(model)
    assert modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb  # Liger's layer kernel kept
    before = len(_CALLS["list"])
    loss, grads = _loss_and_grads(model)
    assert len(_CALLS["list"]) == before + 1  # hf_fusedce's head computed it
    s_loss, s_grads = stock
    assert abs(loss.item() - s_loss.item()) <= 1e-5 * max(1.0, abs(s_loss.item()))
    assert grads.keys() == s_grads.keys()
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        err = (grads[name] - s_grads[name]).norm() / s_grads[name].norm()
        assert err <= 1e-4, (name, err.item())


@pytest.mark.parametrize("style", STYLES)
def test_liger_after_patch_any_binding(llama_rope_restored, style):
    stock = _stock_loss_and_grads()
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    _apply_fn(style)(model=model, **ROPE_ONLY)  # fused_linear_cross_entropy defaults to True
    _assert_like_stock(model, stock, llama_rope_restored)
    hf_fusedce.unpatch(model)
    assert not hf_fusedce.is_patched(model) and "_call_impl" not in model.__dict__


@pytest.mark.parametrize("style", STYLES)
def test_liger_before_patch_any_binding(llama_rope_restored, style):
    stock = _stock_loss_and_grads()
    model = tiny_llama(_Tok())
    _apply_fn(style)(model=model, **ROPE_ONLY)
    hf_fusedce.patch(model)
    _assert_like_stock(model, stock, llama_rope_restored)


def test_displaced_forward_is_taken_off_at_the_next_call(llama_rope_restored):
    """No is_patched in between: the model's call itself puts hf_fusedce's forward back."""
    stock = _stock_loss_and_grads()
    model = hf_fusedce.patch(tiny_llama(_Tok()))
    _apply_fn("bound_early")(model=model, **ROPE_ONLY)
    assert model.__dict__["forward"].__func__.__module__.startswith("liger_kernel")
    before = len(_CALLS["list"])
    loss, _ = _loss_and_grads(model)
    assert len(_CALLS["list"]) == before + 1
    assert abs(loss.item() - stock[0].item()) <= 1e-5
    assert hf_fusedce.is_patched(model)


@pytest.mark.parametrize("style", ["bound_early", "module_attribute"])
@pytest.mark.parametrize("order", ["liger_first", "patch_first"])
def test_liger_class_patch_and_instance_patch(llama_rope_restored, style, order):
    """Liger without a model patches the class (`LlamaForCausalLM.forward = lce_forward`)."""
    stock = _stock_loss_and_grads()
    if order == "liger_first":
        _apply_fn(style)(**ROPE_ONLY)
        model = hf_fusedce.patch(tiny_llama(_Tok()))
    else:
        model = hf_fusedce.patch(tiny_llama(_Tok()))
        _apply_fn(style)(**ROPE_ONLY)
    _assert_like_stock(model, stock, llama_rope_restored)


@pytest.mark.parametrize("style", ["bound_early", "module_attribute"])
@pytest.mark.parametrize("order", ["liger_first", "patch_first", "between"])
def test_liger_with_global_patch(llama_rope_restored, style, order):
    """patch() without a model (class patch) and Liger's class or instance patch, in each order."""
    stock = _stock_loss_and_grads()
    try:
        if order == "liger_first":
            _apply_fn(style)(**ROPE_ONLY)
            hf_fusedce.patch()
            model = tiny_llama(_Tok())
        elif order == "patch_first":
            hf_fusedce.patch()
            _apply_fn(style)(**ROPE_ONLY)
            model = tiny_llama(_Tok())
        else:  # the model built under the global patch, then Liger on the class and on the instance
            hf_fusedce.patch()
            model = tiny_llama(_Tok())
            _apply_fn(style)(**ROPE_ONLY)
            _apply_fn(style)(model=model, **ROPE_ONLY)
        _assert_like_stock(model, stock, llama_rope_restored)
    finally:
        hf_fusedce.unpatch()


@pytest.mark.parametrize("order", ["liger_first", "patch_first"])
def test_auto_liger_kernel_for_causal_lm(llama_rope_restored, order):
    from liger_kernel.transformers import AutoLigerKernelForCausalLM
    stock_model = tiny_llama(_Tok())
    stock = _loss_and_grads(stock_model)
    try:
        if order == "patch_first":
            hf_fusedce.patch()
        model = AutoLigerKernelForCausalLM.from_config(stock_model.config, **ROPE_ONLY)
        model.load_state_dict(stock_model.state_dict())
        model.train()
        if order == "liger_first":
            hf_fusedce.patch(model)
        _assert_like_stock(model, stock, llama_rope_restored)
    finally:
        hf_fusedce.unpatch()


README_SCRIPT = """
import os, sys, torch
from liger_kernel.transformers import apply_liger_kernel_to_llama  # bound before hf_fusedce is imported
import hf_fusedce
from hf_fusedce.testing import tiny_llama, tiny_batch
torch.set_num_threads(1)
ids, labels = tiny_batch(300, seq=11)
stock = tiny_llama(300, num_hidden_layers=1)(input_ids=ids, labels=labels).loss.item()
order = sys.argv[1]
model = tiny_llama(300, num_hidden_layers=1)
if order == "patch_first":
    hf_fusedce.patch(model)
apply_liger_kernel_to_llama(rope=True, rms_norm=False, swiglu=False, cross_entropy=False,
                            fused_linear_cross_entropy=True, model=model)
if order == "liger_first":
    hf_fusedce.patch(model)
from transformers.models.llama import modeling_llama
from liger_kernel.transformers.rope import liger_rotary_pos_emb
import hf_fusedce.hf.forward as fwd
calls, real = [], fwd.fused_linear_cross_entropy
fwd.fused_linear_cross_entropy = lambda *a, **k: calls.append(1) or real(*a, **k)
loss = model(input_ids=ids, labels=labels).loss.item()
print(hf_fusedce.is_patched(model), modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb, len(calls),
      abs(loss - stock) <= 1e-5, flush=True)
"""


@pytest.mark.parametrize("order", ["patch_first", "liger_first"])
def test_liger_readme_style_in_a_fresh_process(tmp_path, order):
    """Exactly the issue's script: Liger's README import at the top, before `import hf_fusedce`."""
    import os
    import subprocess
    import sys
    script = tmp_path / "readme.py"
    script.write_text(README_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(script), order], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "1", "True"], out.stdout + out.stderr[-2000:]


def test_fused_ce_trainer_composes_with_use_liger_kernel(llama_rope_restored, tmp_path):
    from transformers import TrainingArguments

    from hf_fusedce import FusedCETrainer
    ids, labels = _batch()
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, use_liger_kernel=True,
                             liger_kernel_config=ROPE_ONLY, remove_unused_columns=False)
    trainer = FusedCETrainer(model=tiny_llama(_Tok()), args=args, train_dataset=rows,
                             data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    trainer.train()  # Trainer applies Liger here
    _check_composed(trainer.model, llama_rope_restored)
