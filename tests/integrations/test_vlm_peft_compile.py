"""Vision-language models (tiny Qwen2-VL and LLaVA, image + text batches from their offline processors) through PEFT and
torch.compile, patched vs stock: LoRA on the language model and on lm_head with the vision tower frozen gives the
same loss and every trainable gradient (fp32: as close to the float64 stock model as stock float32 is); torch.compile gives the stock compiled model's loss and
gradients (fullgraph with 0 graph breaks on a text batch; on an image batch stock's own vision code breaks the
graph, and the patched model adds no other kind of break)."""
from __future__ import annotations

import copy
from unittest import mock

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("PIL")

import hf_fusedce  # noqa: E402
from hf_fusedce.hf.recorded import ProofOutdatedWarning  # noqa: E402
from hf_fusedce.hf import forward  # noqa: E402
from hf_fusedce.testing import (ModelRun, assert_model_as_accurate_as_stock, float64_twin,  # noqa: E402
                                model_loss_and_grads)
from vlm_helpers import FAMILIES, image_batch, qwen2_vl_processor, tiny_qwen2_vl  # noqa: E402

LANGUAGE = r".*language_model.*\.(q_proj|v_proj|down_proj)"  # LoRA on the decoder only, not on model.visual
LORA = {
    "language-model": dict(target_modules=LANGUAGE),
    "language-model+lm_head": dict(target_modules=LANGUAGE + r"|lm_head", lora_dropout=0.2),
}


def _image_batch(processor, records):
    out = image_batch(processor, records[:2])
    assert (out["labels"][out["input_ids"] == processor.image_token_id] == -100).all()
    return out


@pytest.fixture(scope="module")
def processor():
    return qwen2_vl_processor()


@pytest.fixture(scope="module")
def batch(processor, records):
    return _image_batch(processor, records)


def _patch(model):
    with warnings.catch_warnings():  # accepted by class, image inputs proven: no force, no warning
        warnings.simplefilter("error")
        # expected on the newest-release CI leg (tests/hf/test_fingerprint.py tests it)
        warnings.filterwarnings("ignore", category=ProofOutdatedWarning)
        return hf_fusedce.patch(model)


def _loss_and_grads(model, batch, seed=11) -> ModelRun:
    return model_loss_and_grads(model, batch, seed=seed)  # seeded: the same LoRA dropout stream for every run


def _float64_stock(base, lora_config, stock):
    """The stock PEFT model in float64 with stock's weights, built by the same recipe (a PEFT model whose lm_head
    adapter is tied to the embedding holds a non-leaf tensor, so it cannot be deep-copied)."""
    from peft import get_peft_model
    twin = get_peft_model(float64_twin(base), lora_config).train()
    twin.load_state_dict(stock.state_dict())
    return twin


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(LORA))
@pytest.mark.parametrize("order", ["patch-after", "patch-before"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_vlm_exact(records, family, name, tie, order):
    from peft import LoraConfig, get_peft_model

    make_processor, build = FAMILIES[family]
    processor = make_processor()
    batch = _image_batch(processor, records)
    kw = dict(r=4, lora_alpha=8, **LORA[name])
    if tie and "lm_head" in name:
        kw["ensure_weight_tying"] = True
    base = build(processor, tie=tie)
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(**kw)).train()
    fused = copy.deepcopy(base)
    if order == "patch-before":
        fused = get_peft_model(_patch(fused), LoraConfig(**kw))
    else:
        fused = _patch(get_peft_model(fused, LoraConfig(**kw)))
    fused.load_state_dict(stock.state_dict())
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for (n, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters()):
            if "lora_" in n:
                p.normal_(0, 0.3)
                q.copy_(p)
    fused.train()
    assert hf_fusedce.is_patched(fused)
    assert not any(".visual." in n or ".vision_tower." in n  # the vision tower frozen
                   for n, p in stock.named_parameters() if p.requires_grad)
    exact = _loss_and_grads(_float64_stock(base, LoraConfig(**kw), stock), batch)
    stock_run = _loss_and_grads(stock, batch)
    with mock.patch.object(forward, "_head_loss", wraps=forward._head_loss) as fused_path:
        fused_run = _loss_and_grads(fused, batch)
    assert fused_path.call_count == 1
    assert any("lm_head" in n for n, g in stock_run.grads.items() if g is not None) == ("lm_head" in name)
    assert_model_as_accurate_as_stock(fused_run, stock_run, exact)


# ---- torch.compile ------------------------------------------------------------------------------------------

def _compiled(model, batch, fullgraph):
    with torch.no_grad():  # eager warm-up: transformers installs its output-capturing hooks here
        model(**batch, use_cache=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(model, fullgraph=fullgraph, backend="eager")
    model.zero_grad(set_to_none=True)
    out = step(**batch, use_cache=False)
    out.loss.backward()
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    fused = out.logits is None  # the fused path returns no logits; stock (or a fallback to it) does
    return ModelRun(out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}), breaks, fused


def _check_compiled(processor, batch, fullgraph):
    stock = tiny_qwen2_vl(processor)
    patched = _patch(copy.deepcopy(stock))
    exact = model_loss_and_grads(float64_twin(stock), batch)  # eager float64: the same function, exactly
    stock_run, s_breaks, _ = _compiled(stock, batch, fullgraph)
    ours, breaks, fused = _compiled(patched, batch, fullgraph)
    assert fused
    assert_model_as_accurate_as_stock(ours, stock_run, exact)
    return breaks, s_breaks


def test_fullgraph_compile_vlm_text_batch(processor, batch):
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    breaks, _ = _check_compiled(processor, text, fullgraph=True)
    assert sum(breaks.values()) == 0


@pytest.mark.slow  # ~30 s: dynamo re-traces around each of the vision tower's data-dependent breaks
def test_compile_vlm_image_batch(processor, batch):
    breaks, stock_breaks = _check_compiled(processor, batch, fullgraph=False)
    assert stock_breaks and set(breaks) == set(stock_breaks)  # transformers' own breaks (vision), no new kind
