"""Public API and behaviour of a patched model: idempotence, unpatch, context manager, refusal, signature,
stock path without labels / in eval, tuple outputs, logits_to_keep, shift_labels, skip_logits, patch()."""
import inspect
from unittest import mock

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import hf_fusedce
from hf_fusedce.hf import forward
from hf_fusedce.testing import ModelRun, assert_model_as_accurate_as_stock, float64_twin, tiny_batch, tiny_llama



def exact_loss(model, *args, **kw) -> torch.Tensor:
    """The stock model's loss in float64 on the same batch (call before patching it)."""
    with torch.no_grad():
        out = float64_twin(model)(*args, **kw)
    return (out[0] if isinstance(out, tuple) else out.loss).detach()


def assert_loss_as_accurate(ours, stock, exact):
    """The patched loss as close to float64 as stock float32's (hf_fusedce.testing's model-level rule)."""
    assert_model_as_accurate_as_stock(ModelRun(ours.detach(), {}), ModelRun(stock.detach(), {}), ModelRun(exact, {}))

def test_patch_twice_is_once_and_unpatch_restores_exactly():
    m = tiny_llama()
    assert "forward" not in m.__dict__
    hf_fusedce.patch(m)
    first = m.forward
    assert hf_fusedce.patch(m) is m and m.forward is first and hf_fusedce.is_patched(m)
    hf_fusedce.unpatch(m)
    assert "forward" not in m.__dict__ and not hf_fusedce.is_patched(m)


def test_unpatch_restores_a_forward_the_instance_already_had():
    m = tiny_llama()
    own = m.forward
    m.forward = own  # e.g. accelerate's wrapper
    hf_fusedce.patch(m)
    hf_fusedce.unpatch(m)
    assert m.__dict__["forward"] is own


def test_patched_context_manager():
    m = tiny_llama()
    with hf_fusedce.patched(m):
        assert hf_fusedce.is_patched(m)
    assert not hf_fusedce.is_patched(m)


def test_signature_keeps_logits_to_keep_and_kwargs():
    m = hf_fusedce.patch(tiny_llama())
    params = inspect.signature(m.forward).parameters
    assert "logits_to_keep" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())


class TotallyNewForCausalLM(LlamaForCausalLM):
    pass


def test_unknown_model_type_is_refused_unless_forced():
    torch.manual_seed(0)
    m = TotallyNewForCausalLM(tiny_llama().config)
    m.config.model_type = "totally_new_family"
    with pytest.raises(ValueError, match="refusing"):
        hf_fusedce.patch(m)
    with pytest.warns(UserWarning, match="forced"):
        hf_fusedce.patch(m, force=True)
    assert hf_fusedce.is_patched(m)


def test_refused_family_has_a_reason():
    m = tiny_llama()
    m.config.model_type = "musicgen"
    with pytest.raises(ValueError, match="codebook"):
        hf_fusedce.patch(m)


def fused_spy():
    """Counts the fused path's calls (the production forward keeps no global counter)."""
    return mock.patch.object(forward, "_head_loss", wraps=forward._head_loss)


def test_no_labels_takes_the_stock_path():
    m = tiny_llama()
    ids, labels = tiny_batch()
    stock_logits = m(input_ids=ids).logits
    hf_fusedce.patch(m)
    with fused_spy() as fused_path:
        assert torch.equal(m(input_ids=ids).logits, stock_logits)
    assert fused_path.call_count == 0


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_eval_mode_is_stock_with_logits_whatever_the_grad_mode(grad):
    m = tiny_llama().eval()
    ids, labels = tiny_batch()
    stock = m(input_ids=ids, labels=labels)
    hf_fusedce.patch(m)
    with fused_spy() as fused_path, torch.set_grad_enabled(grad):
        out = m(input_ids=ids, labels=labels)
    assert fused_path.call_count == 0
    assert out.logits is not None and torch.equal(out.logits, stock.logits) and torch.equal(out.loss, stock.loss)


def test_training_mode_without_grad_is_fused():
    m = hf_fusedce.patch(tiny_llama().train())
    ids, labels = tiny_batch()
    with fused_spy() as fused_path, torch.no_grad():
        out = m(input_ids=ids, labels=labels)
    assert fused_path.call_count == 1 and out.logits is None


def test_skip_logits_forces_either_way():
    m = tiny_llama().eval()
    ids, labels = tiny_batch()
    stock, exact = m(input_ids=ids, labels=labels).loss, exact_loss(m, input_ids=ids, labels=labels)
    hf_fusedce.patch(m)
    with torch.no_grad():
        out = m(input_ids=ids, labels=labels, skip_logits=True)
    assert out.logits is None
    assert_loss_as_accurate(out.loss, stock, exact)
    assert m.train()(input_ids=ids, labels=labels, skip_logits=False).logits is not None


def test_tuple_output_and_positional_args():
    m = tiny_llama()
    ids, labels = tiny_batch()
    stock, exact = m(ids, labels=labels).loss, exact_loss(m, ids, labels=labels)
    hf_fusedce.patch(m)
    out = m(ids, None, None, None, None, labels, return_dict=False)
    assert isinstance(out, tuple)
    assert_loss_as_accurate(out[0], stock, exact)


def test_shift_labels_and_ignore_index():
    m = tiny_llama()
    ids, labels = tiny_batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    stock = m(input_ids=ids, labels=labels, shift_labels=shift).loss
    exact = exact_loss(m, input_ids=ids, labels=labels, shift_labels=shift)
    hf_fusedce.patch(m)
    assert_loss_as_accurate(m(input_ids=ids, labels=labels, shift_labels=shift).loss, stock, exact)


def test_logits_to_keep_slices_targets_like_hidden():
    m = tiny_llama()
    ids, labels = tiny_batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    stock_kw = dict(input_ids=ids, labels=labels, shift_labels=shift[:, -4:].contiguous(), logits_to_keep=4)
    stock, exact = m(**stock_kw).loss, exact_loss(m, **stock_kw)
    hf_fusedce.patch(m)
    ours = m(input_ids=ids, labels=labels, shift_labels=shift, logits_to_keep=4).loss
    assert_loss_as_accurate(ours, stock, exact)


def test_return_logits_option():
    m = hf_fusedce.patch(tiny_llama(), return_logits=True)
    ids, labels = tiny_batch()
    out = m(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (2, 10, 97) and not out.logits.requires_grad


def test_options_reach_the_op():
    m = tiny_llama()
    ids, labels = tiny_batch()
    base = m(input_ids=ids, labels=labels).loss
    hf_fusedce.patch(m, z_loss=1e-2, backend="torch", chunk_budget_bytes=4096)
    assert m(input_ids=ids, labels=labels).loss > base


def test_global_patch_covers_models_built_later_and_unpatch_restores():
    stock_forward = GPT2LMHeadModel.forward
    hf_fusedce.patch()
    try:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        m = GPT2LMHeadModel(config).train()
        assert hf_fusedce.is_patched(m)
        ids, labels = tiny_batch()
        with fused_spy() as fused_path:
            loss = m(input_ids=ids, labels=labels).loss
        assert fused_path.call_count == 1
        assert "logits_to_keep" in inspect.signature(m.forward).parameters
    finally:
        hf_fusedce.unpatch()
    assert GPT2LMHeadModel.forward is stock_forward
    assert_loss_as_accurate(loss, m(input_ids=ids, labels=labels).loss, exact_loss(m, input_ids=ids, labels=labels))


def test_supported_model_types():
    types = hf_fusedce.supported_model_types()
    assert "llama" in types and "gpt2" in types and "musicgen" not in types


def test_accelerate_prepare_keeps_the_patch():
    """accelerate wraps `model.forward` (autocast + fp32 outputs): still patched, still fused."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    # The accelerator state is a process-wide singleton: other tests in this worker may have set it.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        m = hf_fusedce.patch(tiny_llama())
        m = accelerate.Accelerator(cpu=True, mixed_precision="bf16").prepare(m)
        assert hf_fusedce.is_patched(m)
        ids, labels = tiny_batch()
        with fused_spy() as fused_path:
            assert m(input_ids=ids, labels=labels).loss.dtype == torch.float32
        assert fused_path.call_count == 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
