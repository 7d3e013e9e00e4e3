"""Encoder-decoder and masked-LM heads (hf_fusedce.hf.encoder.heads): patched vs stock loss and EVERY parameter
gradient (float32, as close to the float64 stock model as stock float32 is), tied and untied (T5: scaled and unscaled), padded batches, ignored positions,
num_items_in_batch; Whisper on its feature extractor's features of a generated waveform. CI proves the required
set; every type of the three mappings: `pytest -m slow -k every_entry` or `python -m hf_fusedce.hf.encoder.proof`."""
import dataclasses
import json

import pytest
import torch

import hf_fusedce
from hf_fusedce.hf import proof
from hf_fusedce.hf.encoder import heads as encoder_heads, proof as encoder_proof

REQUIRED = encoder_proof.required_set()
ENTRIES = encoder_proof.all_entries()


def check(kind, model_type):
    res = encoder_proof.prove(kind, model_type)
    if (kind, model_type) not in encoder_heads.ENCODER_HEADS:
        assert res.status == "refused", res
        pytest.skip(res.reason)
    assert res.status == "proven", res.reason
    assert "padded" in res.variants
    return res


@pytest.mark.parametrize("kind,model_type", REQUIRED, ids=[f"{k}-{t}" for k, t in REQUIRED])
def test_required(kind, model_type):
    res = check(kind, model_type)
    if kind == "speech_seq2seq":
        assert "audio" in res.variants
    if model_type == "t5":  # the d_model**-0.5 rescale before the head, on and off (mT5 5.23: never scaled)
        assert {"tied", "tied-scaled"} <= set(res.variants)


@pytest.mark.slow
@pytest.mark.parametrize("kind,model_type", sorted(set(ENTRIES) - set(REQUIRED)))
def test_every_entry(kind, model_type):
    check(kind, model_type)


def test_every_type_of_the_three_mappings_is_listed():
    """None unlisted: a new transformers type must be proven (ENCODER_HEADS) or refused with a reason."""
    unknown = [e for e in ENTRIES if e not in encoder_heads.ENCODER_HEADS and e not in encoder_heads.ENCODER_REFUSED
               and e[1] not in encoder_heads.CAUSAL_ELSEWHERE]
    assert not unknown


def test_recorded_proof_covers_the_table():
    doc = json.loads(encoder_proof.RESULTS_PATH.read_text())
    status = {(r["kind"], r["model_type"]): r["status"] for r in doc["results"]}
    assert all(status.get(e) == "proven" for e in encoder_heads.ENCODER_HEADS), \
        [e for e in encoder_heads.ENCODER_HEADS if status.get(e) != "proven"]


def test_forgotten_final_logits_bias_is_caught(monkeypatch):
    """Never silent: BART without its final_logits_bias entry fails (the bias meets the empty placeholder)."""
    monkeypatch.setitem(encoder_heads.ENCODER_HEADS, ("seq2seq", "bart"), encoder_heads.EncoderHeadSpec(
        decoder_inputs=True))
    model = encoder_proof.build("seq2seq", "bart")
    with torch.no_grad():
        model.final_logits_bias.normal_()
    inputs, labels = encoder_proof.batch("seq2seq", model)
    with pytest.raises((AssertionError, RuntimeError)):
        encoder_proof._compare(model, inputs, labels)


def test_explicit_decoder_inputs_are_kept():
    """Given decoder_input_ids (not built from the labels), patched == stock too."""
    model = encoder_proof.build("seq2seq", "bart")
    inputs, labels = encoder_proof.batch("seq2seq", model)
    dec = torch.roll(labels.clamp(min=0), 1, dims=1)
    encoder_proof._compare(model, inputs, labels, decoder_input_ids=dec)  # raises on a mismatch


def test_mlm_forward_outside_training_is_stock():
    model = encoder_proof.build("masked_lm", "bert")
    inputs, labels = encoder_proof.batch("masked_lm", model)
    hf_fusedce.patch(model, backend="torch")
    out = model(**inputs, labels=labels)
    assert out.logits is None  # training + labels: fused
    model.eval()
    out = model(**inputs, labels=labels)
    assert out.logits is not None and out.logits.shape[-1] == model.config.vocab_size
    hf_fusedce.unpatch(model)


def test_requires_refuses_other_config_values():
    model = encoder_proof.build("masked_lm", "modernbert")
    model.sparse_pred_ignore_index = 0  # positions it drops != the loss's ignored ones
    with pytest.raises(ValueError, match="sparse_pred_ignore_index"):
        hf_fusedce.patch(model)


def test_spec_is_a_headspec_unshifted():
    for spec in encoder_heads.ENCODER_HEADS.values():
        assert not spec.shift and dataclasses.is_dataclass(spec)


def test_supported_model_types_by_kind():
    assert {"t5", "bart", "marian", "mt5"} <= set(hf_fusedce.supported_model_types(kind="seq2seq"))
    assert "whisper" in hf_fusedce.supported_model_types(kind="speech_seq2seq")
    assert {"bert", "roberta", "modernbert", "xlm-roberta"} <= set(hf_fusedce.supported_model_types(kind="masked_lm"))
    assert "mobilebert" not in hf_fusedce.supported_model_types(kind="masked_lm")
    with pytest.raises(ValueError):
        hf_fusedce.supported_model_types(kind="vision")


def test_refused_class_names_the_reason():
    import transformers
    config = proof.tiny_config("mobilebert")
    model = transformers.MobileBertForMaskedLM(config)
    with pytest.raises(ValueError, match="without calling the output embeddings"):
        hf_fusedce.patch(model)


def test_encoder_card_matches_the_generator():
    from hf_fusedce.cards import encoder as encoder_cards
    assert encoder_cards.INDEX.read_text() == encoder_cards.render(encoder_cards.load()), \
        "regenerate with `python -m hf_fusedce.cards.encoder --refresh`"
