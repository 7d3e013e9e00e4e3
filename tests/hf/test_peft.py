"""PEFT: LoRA on the body, LoRA / modules_to_save / trainable tokens ON lm_head (tied and untied), DoRA fallback.
Patched vs stock: loss and every trainable gradient, float32, as close to the float64 stock model as stock float32 is."""
import copy
from unittest import mock

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, TrainableTokensConfig, get_peft_model  # noqa: E402

import hf_fusedce  # noqa: E402
from hf_fusedce.hf import forward  # noqa: E402
from hf_fusedce.testing import (ModelRun, assert_model_as_accurate_as_stock, float64_twin,  # noqa: E402
                                tiny_batch, tiny_llama)


def run(model, seed=11):
    ids, labels = tiny_batch(seed=3, prompt=3)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout stream for stock and patched
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def float64_stock(base, peft_config, stock):
    """The stock PEFT model in float64 with stock's weights, built by the same recipe (a PEFT model whose lm_head
    adapter is tied to the embedding holds a non-leaf tensor, so it cannot be deep-copied)."""
    twin = get_peft_model(float64_twin(base), peft_config).train()
    twin.load_state_dict(stock.state_dict())
    return twin


def assert_same(stock, fused, exact_model):
    exact = ModelRun(*run(exact_model))
    stock_run = ModelRun(*run(stock))
    with mock.patch.object(forward, "_head_loss", wraps=forward._head_loss) as fused_path:
        fused_run = ModelRun(*run(fused))
    assert fused_path.call_count == 1
    assert stock_run.grads
    assert_model_as_accurate_as_stock(fused_run, stock_run, exact)


CONFIGS = {
    "lora-body": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora-head": dict(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "lm_head"]),
    "lora-head-bias": dict(r=4, lora_alpha=8, target_modules=["lm_head"], lora_bias=True),
    "modules_to_save": dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("order", ["patch-after", "patch-before"])
def test_lora_exact(name, tie, order):
    kw = dict(CONFIGS[name])
    if tie and name == "lora-head-bias":
        pytest.skip("PEFT itself rejects lora_bias on the tied Embedding")
    if tie and name != "lora-body":
        kw["ensure_weight_tying"] = True
    base = tiny_llama(tie=tie)
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    stock.train()
    if order == "patch-before":
        fused = get_peft_model(hf_fusedce.patch(copy.deepcopy(base)), LoraConfig(**kw))
    else:
        fused = hf_fusedce.patch(get_peft_model(copy.deepcopy(base), LoraConfig(**kw)))
    fused.load_state_dict(stock.state_dict())
    with torch.no_grad():  # B starts at zero: make the adapter matter
        for (n, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters()):
            if "lora_B" in n or "lora_A" in n:
                p.normal_(0, 0.3)
                q.copy_(p)
    fused.train()
    assert hf_fusedce.is_patched(fused)
    assert_same(stock, fused, float64_stock(base, LoraConfig(**kw), stock))


def test_frozen_base_head_gets_no_weight_gradient():
    model = hf_fusedce.patch(get_peft_model(tiny_llama(tie=False), LoraConfig(r=4, target_modules=["q_proj"])))
    _, grads = run(model)
    assert not any("lm_head" in n for n in grads)
    assert model.get_base_model().lm_head.weight.grad is None


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_on_head(tie):
    cfg = TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 7])
    base = tiny_llama(tie=tie)
    stock = get_peft_model(copy.deepcopy(base), cfg)
    fused = hf_fusedce.patch(get_peft_model(copy.deepcopy(base), cfg))
    with torch.no_grad():
        for (n, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters()):
            if p.requires_grad:
                p.normal_()
                q.copy_(p)
    assert_same(stock, fused, float64_stock(base, cfg, stock))


def test_dora_on_head_falls_back_to_stock_with_warning():
    cfg = LoraConfig(r=4, target_modules=["lm_head"], use_dora=True)
    base = tiny_llama(tie=False)
    stock = get_peft_model(copy.deepcopy(base), cfg)
    fused = hf_fusedce.patch(get_peft_model(copy.deepcopy(base), cfg))
    loss_s, _ = run(stock)
    with pytest.warns(UserWarning, match="DoRA"), \
            mock.patch.object(forward, "_head_loss", wraps=forward._head_loss) as fused_path:
        loss_f, _ = run(fused)
    assert fused_path.call_count == 0 and torch.equal(loss_f, loss_s)
