"""Vision- and audio-language classes (AutoModelForImageTextToText / AutoModelForMultimodalLM): accepted by
class through heads.LOSS_MAPPINGS, their image / audio inputs fused only when the committed proof includes such a
batch, and every type of those mappings listed with a status. The per-family proof itself (patched vs stock,
loss and every gradient, encoder and projector included) runs in tests/hf/test_proof.py (REQUIRED in CI) and
here for every family with a media batch builder (slow)."""
import warnings

import pytest
import torch

import hf_fusedce
from hf_fusedce.hf import forward, heads, multimodal_batches, patching, proof
from hf_fusedce.testing import ModelRun, assert_model_as_accurate_as_stock

MEDIA_MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES")


def test_loss_mappings_table_drives_the_accepted_classes():
    from transformers.models.auto import modeling_auto
    for mapping in MEDIA_MAPPINGS:
        assert heads.LOSS_MAPPINGS[mapping] == "shifted"
        for name in getattr(modeling_auto, mapping).values():
            assert name in heads.fused_classes()


def test_a_mapping_added_to_the_table_is_accepted_with_its_loss_kind(monkeypatch):
    """What a seq2seq / masked-LM helper does: one line in LOSS_MAPPINGS."""
    from transformers import T5Config, T5ForConditionalGeneration
    model = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                num_heads=4))
    assert patching.class_refusal(model) is not None
    monkeypatch.setitem(heads.LOSS_MAPPINGS, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "unshifted")
    heads.fused_classes.cache_clear()
    try:
        assert patching.class_refusal(model) is None
        assert patching.loss_kind_spec(model, heads.PLAIN).shift is False
    finally:
        monkeypatch.undo()
        heads.fused_classes.cache_clear()


def test_every_media_type_is_in_the_table_or_refused_and_has_a_status():
    """None unlisted: every type of the image-text-to-text and multimodal-LM mappings is in HEADS or REFUSED,
    and supported_model_types(status=True) says which."""
    status = hf_fusedce.supported_model_types(status=True)
    for model_type in proof.media_types():
        assert model_type in heads.HEADS or model_type in heads.REFUSED, model_type
        assert model_type in status, model_type
        assert status[model_type].startswith(("proven", "refused", "failed", "skipped", "not proven")), status


def test_status_wording():
    image = {"status": "proven", "variants": ["untied", "image"], "reason": ""}
    text = {"status": "proven", "variants": ["untied"], "reason": "proven on text only: no builder",
            "multimodal": True}
    assert proof.status_text(image) == "proven exact on an image batch"
    assert proof.status_text(text) == "proven on text only (no builder)"
    assert proof.status_text({"status": "refused", "variants": [], "reason": "why"}) == "refused (why)"


def test_qwen2_vl_is_patched_by_class_and_its_image_batch_fused():
    model, ids, labels, extra = proof.build_media_batch("qwen2_vl")
    stock, exact = model(input_ids=ids, labels=labels, **extra).loss, _exact_loss(model, ids, labels, extra)
    hf_fusedce.patch(model, backend="torch")  # no force: the class is in the image-text-to-text mapping
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # proven on an image batch: no "runs stock" warning
        out = model(input_ids=ids, labels=labels, **extra)
    assert out.logits is None
    _assert_loss_as_accurate(out.loss, stock, exact)


def test_media_inputs_of_a_type_proven_on_text_only_run_stock(monkeypatch):
    model, ids, labels, extra = proof.build_media_batch("llava")
    stock = model(input_ids=ids, labels=labels, **extra)
    monkeypatch.setattr(forward, "MULTIMODAL_PROVEN", forward.MULTIMODAL_PROVEN - {"llava"})
    hf_fusedce.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="given pixel_values.*proven on text batches only"):
        out = model(input_ids=ids, labels=labels, **extra)
    assert out.logits is not None and torch.equal(out.loss, stock.loss)


def test_the_proof_fails_when_the_media_never_reach_the_encoder():
    model, ids, labels, extra = proof.build_media_batch("llava")
    with pytest.raises(AssertionError, match="encoder not run"):
        proof._check_media_used(model, ids, labels, {})


def test_analytically_zero_gradients_must_stay_noise(monkeypatch):
    """ZERO_GRAD: a gradient stock has at float noise (a vision key bias) must be noise in the patched run too."""
    model, ids, labels, extra = proof.build_media_batch("paligemma", tie=False)
    proof.compare(model, ids, labels, patch_options={"force": True}, **extra)  # raises on a mismatch
    name = "model.vision_tower.encoder.layers.0.self_attn.k_proj.bias"
    stock_run = proof._loss_and_grads
    calls = []

    def patched_run_off_by_1e_6(*args, **kw):
        out, grads = stock_run(*args, **kw)
        calls.append(1)
        if len(calls) == 2:  # the patched run (stock's is the first, float64's the third)
            grads[name] = grads[name] + 1e-6
        return out, grads

    monkeypatch.setattr(proof, "_loss_and_grads", patched_run_off_by_1e_6)
    with pytest.raises(AssertionError, match="zero in float64"):
        proof.compare(model, ids, labels, patch_options={"force": True}, **extra)


def test_pixtral_vision_tower_on_the_llava_class():
    """Pixtral-12B (Liger's "pixtral"): LlavaForConditionalGeneration with a Pixtral vision tower."""
    model, *_ = proof.build_media_batch("pixtral")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "pixtral"
    proof.prove_multimodal("pixtral")  # raises on a mismatch


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(multimodal_batches.BATCHES))
def test_every_media_batch(model_type):
    proof.prove_multimodal(model_type)  # raises on a mismatch


def test_global_patch_reaches_a_vision_language_class():
    """patch() with no model: classes of the image-text-to-text mapping are patched when built."""
    model, ids, labels, extra = proof.build_media_batch("llava")
    stock, exact = model(input_ids=ids, labels=labels, **extra).loss, _exact_loss(model, ids, labels, extra)
    hf_fusedce.patch(backend="torch")
    try:
        fresh, *_ = proof.build_media_batch("llava")
        out = fresh(input_ids=ids, labels=labels, **extra)
        assert hf_fusedce.is_patched(fresh)
    finally:
        hf_fusedce.unpatch()
    assert out.logits is None
    _assert_loss_as_accurate(out.loss, stock, exact)


def _exact_loss(model, ids, labels, extra):
    """The stock model's loss in float64 on the same batch (before it is patched)."""
    return proof._float64_run(model, ids, labels, use_cache=False, **extra).loss


def _assert_loss_as_accurate(ours, stock, exact):
    """The patched loss as close to float64 as stock float32's (hf_fusedce.testing's model-level rule)."""
    assert_model_as_accurate_as_stock(ModelRun(ours.detach(), {}), ModelRun(stock.detach(), {}), ModelRun(exact, {}))
