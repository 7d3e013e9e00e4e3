"""torch.compile(fullgraph=True) trains a patched model: loss and every gradient equal the stock compiled model,
and dynamo counts no graph break (fullgraph would raise on one; the counter makes the claim explicit)."""
import copy
import time

import pytest
import torch

import hf_fusedce
from hf_fusedce.hf import proof
from hf_fusedce.testing import ModelRun, assert_model_as_accurate_as_stock

FAST = ["gemma2", "mixtral"]  # soft cap, MoE aux loss (llama, plain: with aot_eager below)
SLOW = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"]


def _one_layer(model_type):
    config = proof.tiny_config(model_type)
    text = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(text, key):
            setattr(text, key, 1)
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    model = proof.build(model_type, config=config)
    if model.loss_type is None:  # GPT2LMHeadModel matches no LOSS_MAPPING key: stock's loss_function logs a
        model.loss_type = "ForCausalLM"  # warning dynamo cannot trace; name the loss it falls back to anyway
    return model


def _compiled_loss_and_grads(model, ids, labels, backend):
    with torch.no_grad():  # eager warm-up: transformers installs its output-capturing hooks and warns once here
        model(input_ids=ids, labels=labels, use_cache=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(model, fullgraph=True, backend=backend)
    model.zero_grad(set_to_none=True)
    loss = step(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return ModelRun(loss.detach(), {n: p.grad for n, p in model.named_parameters()}), breaks


def _check(model_type, backend):
    stock = _one_layer(model_type).train()
    ids, labels = proof.batch(stock)
    patched = hf_fusedce.patch(copy.deepcopy(stock), backend="torch")
    exact = proof._float64_run(stock, ids, labels, use_cache=False)  # eager float64: the same function, exactly
    stock_run, _ = _compiled_loss_and_grads(stock, ids, labels, backend)
    ours, breaks = _compiled_loss_and_grads(patched, ids, labels, backend)
    assert breaks == 0
    assert_model_as_accurate_as_stock(ours, stock_run, exact, loss_floor=proof.FLOOR)


@pytest.mark.parametrize("model_type", FAST)
def test_fullgraph_compile_trains_like_stock(model_type):
    _check(model_type, "eager")


def test_fullgraph_compile_aot_eager_traces_the_backward():
    _check("llama", "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", SLOW)
def test_fullgraph_compile_trains_like_stock_more_families(model_type):
    _check(model_type, "eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fullgraph_compile_with_row_blocks_equals_eager(monkeypatch, dtype):
    """The row function's block loop and reused buffers (softmax into a scratch slice) trace without a graph
    break, so does a chunk budget below the sane minimum (its warning is given at patch time, not traced), and
    the compiled fused head gives the eager fused head's loss and gradients."""
    from hf_fusedce.ops.ce import torch_impl

    stock = _one_layer("llama").to(dtype).train()
    ids, labels = proof.batch(stock)
    vocab = stock.config.vocab_size
    monkeypatch.setattr(torch_impl, "ROW_BLOCK_BYTES", 3 * vocab * 4)  # 3-row blocks, several per chunk
    monkeypatch.setattr(torch_impl, "ROW_BLOCK_MIN_ROWS", 1)
    with pytest.warns(UserWarning, match="below"):  # a budget this small is warned about at patch time
        patched = hf_fusedce.patch(stock, backend="torch", chunk_budget_bytes=8 * vocab * dtype.itemsize)
    patched.zero_grad(set_to_none=True)
    e_loss = patched(input_ids=ids, labels=labels, use_cache=False).loss
    e_loss.backward()
    e_grads = {n: p.grad.clone() for n, p in patched.named_parameters() if p.grad is not None}
    compiled, breaks = _compiled_loss_and_grads(patched, ids, labels, "eager")  # the tiny budget: no warning
    assert breaks == 0
    # A fixed bound on purpose: the same fused op eager and compiled with backend="eager" runs the same kernels
    # on the same shapes (no patched-vs-stock rounding to anchor); bfloat16 outputs may be one rounding apart.
    tol = proof.TOL if dtype == torch.float32 else 2e-2
    assert proof.rel_err(compiled.loss, e_loss) <= tol
    for name, g in e_grads.items():
        assert proof.rel_err(compiled.grads[name].float(), g.float()) <= tol, name
