"""Boundaries of the patch (issue 10): which classes are fused, what a model's own `except Exception` around its
head does, accelerate's offload / dispatch hooks on the head, multimodal inputs. Each ends in "same numbers as
stock" or a clear refusal."""
import copy

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, BertForPreTraining, ElectraConfig, ElectraForPreTraining,
                          LlamaForCausalLM)
from transformers.modeling_outputs import CausalLMOutputWithPast

import hf_fusedce
from hf_fusedce import testing
from hf_fusedce.testing import ModelRun, assert_model_as_accurate_as_stock, float64_twin


def tiny_llama(tie=False):
    return testing.tiny_llama(tie=tie, num_hidden_layers=1)


def data():
    return testing.tiny_batch(prompt=3)


def loss_and_grads(model, **kw) -> ModelRun:
    ids, labels = data()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    return ModelRun(loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def assert_as_accurate_as(stock, fused, stock_run: ModelRun | None = None, fused_run: ModelRun | None = None):
    """The fused model's loss and gradients as close to the float64 stock model as stock float32 is."""
    exact = loss_and_grads(float64_twin(stock))
    assert_model_as_accurate_as_stock(fused_run or loss_and_grads(fused), stock_run or loss_and_grads(stock), exact)


# ---- point 1: decided by class ------------------------------------------------------------------------------

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
NOT_CAUSAL = {  # pretraining heads whose loss adds another term (next-sentence, replaced-token detection)
    "BertForPreTraining": (lambda: BertForPreTraining(BertConfig(**SMALL)), "BertLMHeadModel"),
    "ElectraForPreTraining": (lambda: ElectraForPreTraining(ElectraConfig(**SMALL, embedding_size=32)),
                              None),  # the discriminator: no output embeddings at all
}


@pytest.mark.parametrize("name", NOT_CAUSAL)
def test_a_class_whose_loss_is_not_the_causal_lm_loss_is_refused(name):
    """BertForPreTraining shares model_type "bert" with the causal BertLMHeadModel: the class decides (the
    masked-LM classes are hf.encoder.heads', tests/hf/test_encoder_heads.py)."""
    build, causal_sibling = NOT_CAUSAL[name]
    model = build()
    why = f"refusing to patch {name}.*{causal_sibling}.*AutoModelForCausalLM" if causal_sibling else "no output embed"
    with pytest.raises(ValueError, match=why):
        hf_fusedce.patch(model)
    assert not hf_fusedce.is_patched(model)


def test_global_patch_leaves_a_masked_lm_class_stock():
    hf_fusedce.patch()
    try:
        model = BertForMaskedLM(BertConfig(**SMALL))
        assert not hf_fusedce.is_patched(model)
    finally:
        hf_fusedce.unpatch()


class OwnForward(LlamaForCausalLM):
    """A user subclass with its own forward: its loss is whatever it computes."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


class OnlyMethods(LlamaForCausalLM):
    """A user subclass that adds methods only: the forward is LlamaForCausalLM's."""

    def describe(self):
        return "tiny"


def test_subclass_with_its_own_forward_is_refused_and_one_without_is_fused():
    config = tiny_llama().config
    with pytest.raises(ValueError, match="OwnForward.forward, not a class of transformers' causal-LM mapping"):
        hf_fusedce.patch(OwnForward(config))
    stock = OnlyMethods(config)
    fused = hf_fusedce.patch(copy.deepcopy(stock))
    run = loss_and_grads(fused)
    assert run.grads
    assert_as_accurate_as(stock, fused, fused_run=run)


# ---- point 6: a model's own `except Exception` around its head ------------------------------------------------

class GuardedHead(LlamaForCausalLM):
    """Remote-code style forward that guards its head call with `except Exception` (e.g. a fallback path)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        try:
            logits = self.lm_head(hidden)
        except Exception:  # noqa: BLE001 - the pattern under test
            logits = self.lm_head(hidden.detach())
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_model_catching_exceptions_around_its_head_still_trains_exactly():
    """The capture raises nothing, so nothing is swallowed (an exception-based capture lost every body gradient
    here: the fallback's detached input was captured instead)."""
    stock = GuardedHead(tiny_llama().config)
    with pytest.warns(UserWarning, match="forced"):
        fused = hf_fusedce.patch(copy.deepcopy(stock), force=True)
    assert_as_accurate_as(stock, fused)  # the same parameters get gradients: a lost body gradient fails it


def test_a_head_forward_assigned_after_patch_is_still_fused_and_restored_by_unpatch(monkeypatch):
    """TRL's cast_lm_head_to_fp32 assigns `lm_head.forward` after the model was patched: the patch sits on top
    of the new forward again (the fused op still runs, same numbers as stock), and unpatch leaves it in place."""
    from hf_fusedce import ops

    stock = tiny_llama()
    model = hf_fusedce.patch(copy.deepcopy(stock))
    head = model.lm_head

    def assigned_forward(hidden):
        return torch.nn.functional.linear(hidden, head.weight)

    head.forward = assigned_forward
    calls, real = [], ops.fused_linear_cross_entropy
    monkeypatch.setattr("hf_fusedce.hf.forward.fused_linear_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    run = loss_and_grads(model)
    assert calls, "the fused op did not run"
    assert_as_accurate_as(stock, model, fused_run=run)
    hf_fusedce.unpatch(model)
    assert head.forward is assigned_forward


# ---- point 4: accelerate's hooks on the head --------------------------------------------------------------------

def _embeds_loss_and_grad(model, embed_weight) -> ModelRun:
    """Loss and d loss / d inputs_embeds (offloaded parameters are reloaded per call: their .grad is not kept)."""
    ids, labels = data()
    embeds = torch.nn.functional.embedding(ids, embed_weight).requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    return ModelRun(loss.detach(), {"inputs_embeds": embeds.grad})


@pytest.mark.parametrize("order", ["patch_then_offload", "offload_then_patch"])
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_accelerate_offloaded_head_is_called_through_its_hooks(how, order, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    stock = tiny_llama()
    embed_weight = stock.model.embed_tokens.weight.detach().clone()
    exact = _embeds_loss_and_grad(float64_twin(stock), embed_weight.double())
    stock_run = _embeds_loss_and_grad(stock, embed_weight)

    def offload(m):
        if how == "cpu_offload":
            return accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
        if how == "disk_offload":
            return accelerate.disk_offload(m, offload_dir=str(tmp_path), execution_device=torch.device("cpu"))
        device_map = {"model": "cpu", "lm_head": "disk"}  # the head alone offloaded to disk
        return accelerate.dispatch_model(m, device_map=device_map, offload_dir=str(tmp_path))

    model = copy.deepcopy(stock)
    if order == "patch_then_offload":
        model = offload(hf_fusedce.patch(model, backend="torch"))
    else:
        model = hf_fusedce.patch(offload(model), backend="torch")
    assert model.lm_head.weight.device.type == "meta"  # outside its call the head has no weight here
    assert hf_fusedce.is_patched(model)
    fused_run = _embeds_loss_and_grad(model, embed_weight)
    out = model(inputs_embeds=torch.nn.functional.embedding(data()[0], embed_weight), labels=data()[1])
    assert out.logits is None  # the fused path ran
    assert_model_as_accurate_as_stock(fused_run, stock_run, exact)
    hf_fusedce.unpatch(model)  # unpatched: accelerate's hooks still in place, the stock computation again
    assert_model_as_accurate_as_stock(_embeds_loss_and_grad(model, embed_weight), stock_run, exact)


# ---- point 7: the proof's reach ---------------------------------------------------------------------------------

def _gemma3_image_batch():
    from hf_fusedce.hf import proof
    return proof.build_media_batch("gemma3")


def test_image_inputs_of_a_type_proven_on_text_only_run_stock_with_a_warning(monkeypatch):
    from hf_fusedce.hf import forward
    model, ids, labels, extra = _gemma3_image_batch()
    stock = model(input_ids=ids, labels=labels, **extra)
    monkeypatch.setattr(forward, "MULTIMODAL_PROVEN", frozenset())  # as for gemma4, got_ocr2, ...
    hf_fusedce.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="given pixel_values.*proven on text batches only"):
        out = model(input_ids=ids, labels=labels, **extra)
    assert out.logits is not None and torch.equal(out.loss, stock.loss)
    assert model(input_ids=ids, labels=labels).logits is None  # text batches stay fused


def test_image_inputs_of_a_proven_type_are_fused():
    from hf_fusedce.hf import proof
    model, ids, labels, extra = _gemma3_image_batch()
    # stock, patched (fused: its forward returns no logits, or compare raises) and float64 runs, every gradient
    proof.compare(model, ids, labels, **extra)


def test_quirks_are_forced_even_when_their_default_is_none():
    from hf_fusedce.hf import proof
    from hf_fusedce.hf.heads import HeadSpec
    assert proof.tiny_config("gemma3").get_text_config().final_logit_softcapping == proof.QUIRK_VALUES[
        "final_logit_softcapping"]  # gemma3's default is None: the soft cap was never proven before
    model = tiny_llama()
    assert proof._unexercised_quirks(model, HeadSpec(softcap="config.pad_token_id")) == {
        "softcap": None}


def test_a_type_whose_proof_failed_warns_on_patch():
    from hf_fusedce.hf import recorded
    failed = [t for t in recorded._recorded() if recorded.recorded_result(t)["status"] in ("failed", "skipped")
              and t in hf_fusedce.supported_model_types()]
    assert failed, "no failed or skipped type in the committed proof: nothing to check"
    model = tiny_llama()
    model.config.model_type = failed[0]
    with pytest.warns(UserWarning, match=f"{failed[0]}.*proof (failed|skipped)"):
        hf_fusedce.patch(model)
