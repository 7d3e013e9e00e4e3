"""Forward redirection (gather.py), single process: the head is called through its module so sharding hooks
gather the weight once per forward (not per chunk) and the gradient reaches the (sharded) parameter.
ZeRO-3 and FSDP1 are emulated by hooks / a wrapper with their contract; FSDP2 runs for real on a 1-rank gloo
group. Multi-process DDP/FSDP2 tests live elsewhere."""
import copy

import pytest
import torch
from torch import nn

import hf_fusedce
from hf_fusedce.hf import gather
from hf_fusedce.testing import ModelRun, assert_model_as_accurate_as_stock, float64_twin, tiny_batch, tiny_llama


def loss_and_grads(model):
    ids, labels = tiny_batch(prompt=0)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def stock_runs(stock):
    """(float32, float64) runs of the stock model: patched vs stock is bounded by stock's own float64 error."""
    exact = ModelRun(*loss_and_grads(float64_twin(stock)))
    return ModelRun(*loss_and_grads(stock)), exact


def assert_as_accurate(loss, grads: dict, stock_run: ModelRun, exact: ModelRun, names=None):
    """`grads` keyed by stock's parameter names (`names`: only those; all of stock's by default)."""
    names = list(stock_run.grads) if names is None else names
    pick = (lambda run: ModelRun(run.loss, {n: run.grads[n] for n in names}))
    assert_model_as_accurate_as_stock(ModelRun(loss, {n: grads[n] for n in names}), pick(stock_run), pick(exact))


class Zero3Emulation:
    """ZeRO-3's contract on one module: parameters are numel-0 outside the module's forward, gathered by a
    pre-forward hook, released by a post-forward hook, re-gathered before the backward of its outputs."""

    def __init__(self, module):
        self.full = {n: p.data for n, p in module.named_parameters(recurse=False)}
        self.module, self.gathers = module, 0
        self._release()
        module.register_forward_pre_hook(lambda m, a: self._gather())
        module.register_forward_hook(self._post)

    def _gather(self):
        self.gathers += 1
        for n, p in self.module.named_parameters(recurse=False):
            p.data = self.full[n]

    def _release(self):
        for p in self.module.parameters(recurse=False):
            p.data = torch.empty(0)

    def _post(self, module, args, out):
        self._release()
        outs = out if isinstance(out, tuple) else (out,)
        for t in outs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g: (self._gather(), g)[1])
        return out


@pytest.mark.parametrize("budget", [None, 2048])  # 2048 bytes: many chunks, still one gather
def test_zero3_style_head_is_gathered_once_and_gets_its_gradient(budget):
    stock = tiny_llama()
    stock_run, exact = stock_runs(stock)
    model = hf_fusedce.patch(copy.deepcopy(stock), backend="torch", chunk_budget_bytes=budget)
    z = Zero3Emulation(model.lm_head)
    loss, grads = loss_and_grads(model)
    assert z.gathers == 2  # forward once, backward once: not once per chunk
    assert_as_accurate(loss, grads, stock_run, exact, names=["lm_head.weight"])


def test_reading_a_released_weight_fails_loudly():
    with pytest.raises(RuntimeError, match="not materialized"):
        gather.check_materialized(torch.empty(0))


class FSDP1Like(nn.Module):
    """FSDP1's shape: the wrapper holds the real module as `_fsdp_wrapped_module` and gathers in its forward."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner
        self.calls = 0

    @property
    def weight(self):
        return self._fsdp_wrapped_module.weight

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self._fsdp_wrapped_module(*args, **kwargs)


def test_fsdp1_style_wrapper_is_called_through():
    stock = tiny_llama()
    stock_run, exact = stock_runs(stock)
    model = copy.deepcopy(stock)
    wrapper = FSDP1Like(model.lm_head)
    model.lm_head = wrapper
    hf_fusedce.patch(model, backend="torch")
    loss, grads = loss_and_grads(model)
    assert wrapper.calls == 1  # the fused call (the capture short-circuits before the wrapper)
    hf_fusedce.unpatch(model)
    assert "forward" not in wrapper._fsdp_wrapped_module.__dict__ and "_call_impl" not in wrapper.__dict__
    grads["lm_head.weight"] = grads.pop("lm_head._fsdp_wrapped_module.weight")
    assert_as_accurate(loss, grads, stock_run, exact)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fsdp2_fully_shard_one_rank(one_rank_group, tie):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    stock = tiny_llama(tie=tie)
    stock_run, exact = stock_runs(stock)
    model = copy.deepcopy(stock)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(model.lm_head.weight, DTensor)
    hf_fusedce.patch(model, backend="torch")
    loss, grads = loss_and_grads(model)
    grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
    assert_as_accurate(loss, grads, stock_run, exact)


def zero3_every_module(root):
    """DeepSpeed ZeRO-3 puts its hooks on every module that owns parameters: emulate that below `root`."""
    return [Zero3Emulation(m) for m in root.modules() if any(True for _ in m.parameters(recurse=False))]


PEFT_HEADS = {
    "lora": lambda peft: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    "modules_to_save": lambda peft: peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "trainable_tokens": lambda peft: peft.TrainableTokensConfig(target_modules=["lm_head"], token_indices=[1, 5]),
}


@pytest.mark.parametrize("adapter", list(PEFT_HEADS))
def test_zero3_style_peft_head_gathers_every_parameter_it_reads(adapter):
    """LoRA's base layer and lora_B, the modules_to_save copy, the trainable-token delta and its base layer are
    read by the fused head without being called: each is entered through its own ZeRO-3 hooks."""
    peft = pytest.importorskip("peft")
    stock = peft.get_peft_model(tiny_llama(), PEFT_HEADS[adapter](peft))
    with torch.no_grad():  # make the adapter matter (LoRA B starts at zero, token deltas at the base rows)
        for n, p in stock.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    stock.train()
    stock_run, exact = stock_runs(stock)
    model = hf_fusedce.patch(copy.deepcopy(stock), backend="torch")
    zero3_every_module(model.get_base_model().lm_head)  # a parameter read un-gathered is empty: error
    loss, grads = loss_and_grads(model)
    assert grads.keys() == stock_run.grads.keys()
    assert_as_accurate(loss, grads, stock_run, exact)
