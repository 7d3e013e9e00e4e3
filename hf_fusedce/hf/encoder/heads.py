"""Encoder-decoder and masked-LM heads as data: the classes of transformers' seq2seq, speech-seq2seq and
masked-LM auto mappings whose loss is the UNSHIFTED token cross-entropy over their output embeddings.

The generic forward (forward.py) already runs the stock forward with ``labels=None`` and the output-embedding
module in capture mode, so whatever a family does before its head is in the captured hidden (T5's
``d_model**-0.5`` rescale when tied, BERT's prediction-head transform, ModernBERT's head). What differs from a
causal LM, and what an entry declares (``EncoderHeadSpec``, a ``heads.HeadSpec`` with ``shift=False``):

- ``decoder_inputs``: with ``labels=None`` the stock seq2seq forward does not build ``decoder_input_ids`` from
  the labels; they are built first with the model's own API (``prepare_decoder_input_ids_from_labels``, T5's
  ``_shift_right``, or its modeling module's ``shift_tokens_right(labels, pad, decoder_start)``)
- ``logit_bias``: tensors the stock forward adds to the logits after the head (BART / mBART / Marian / Pegasus
  ``final_logits_bias``); they are swapped for empty ones while capturing (the head returns an empty
  placeholder) and added to the fused head's bias. A head module's own bias (BERT's tied ``decoder.bias``) is
  read from the module, as for every head.
- ``num_items``: the loss is ``self.loss_function`` (honours ``num_items_in_batch``); otherwise it is
  ``CrossEntropyLoss()``'s mean over non-ignored positions (ignore -100) and ``num_items_in_batch`` is ignored,
  as stock does
- ``requires``: model attributes the exactness depends on ((path, value), checked at patch time), e.g.
  ModernBERT's ``sparse_pred_ignore_index == -100`` (its sparse prediction drops exactly the positions the loss ignores)
- ``media``: the batch kind the proof ran ("audio" for speech models): such inputs are fused

Every entry is proven by ``hf_fusedce.hf.encoder.proof`` (loss and every gradient vs stock, tied and untied,
padded, ignored positions; speech models on their feature extractor's features of a generated waveform).
Types of the three mappings not in ``ENCODER_HEADS`` are refused with the reason in ``ENCODER_REFUSED``, or
``CAUSAL_ELSEWHERE`` (decoder-only audio LMs mapped here whose loss is the shifted causal loss: the causal /
multimodal table decides for them).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass

from ..heads import HeadSpec

# kind -> transformers auto mapping (modeling_auto attribute)
MAPPINGS = {
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "speech_seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
}


@dataclass(frozen=True)
class EncoderHeadSpec(HeadSpec):
    shift: bool = False
    decoder_inputs: bool = False
    logit_bias: tuple = ()
    num_items: bool = False
    requires: tuple = ()
    media: str | None = None


_MLM = EncoderHeadSpec()
_S2S = EncoderHeadSpec(decoder_inputs=True)
_S2S_BIAS = EncoderHeadSpec(decoder_inputs=True, logit_bias=("final_logits_bias",))
_SPEECH = EncoderHeadSpec(decoder_inputs=True, media="audio")

# (kind, model type) -> spec: only what encoder_proof proves exact is listed.
ENCODER_HEADS: dict[tuple[str, str], EncoderHeadSpec] = {
    **{("seq2seq", t): _S2S for t in "t5 mt5 umt5 longt5 m2m_100 pegasus_x seamless_m4t seamless_m4t_v2".split()},
    **{("seq2seq", t): _S2S_BIAS for t in
       "bart mbart marian pegasus blenderbot blenderbot-small plbart mvp led bigbird_pegasus".split()},
    **{("speech_seq2seq", t): _SPEECH for t in "whisper speech_to_text seamless_m4t seamless_m4t_v2 speecht5".split()},
    ("speech_seq2seq", "moonshine"): EncoderHeadSpec(decoder_inputs=True, num_items=True, media="audio"),
    **{("masked_lm", t): _MLM for t in """albert bert big_bird camembert convbert data2vec-text deberta deberta-v2
       distilbert electra ernie fnet funnel gte ibert jina_embeddings_v3 layoutlm longformer megatron-bert
       modernvbert mpnet mra nomic_bert nystromformer reformer rembert roberta roberta-prelayernorm roc_bert roformer
       squeezebert tapas ultravbert xlm-roberta xlm-roberta-xl xmod yoso""".split()},
    **{("masked_lm", t): EncoderHeadSpec(num_items=True) for t in "esmc eurobert".split()},
    ("masked_lm", "esm"): EncoderHeadSpec(logit_bias=("lm_head.bias",)),  # decoder(x) + bias: a separate bias
    **{("masked_lm", t): EncoderHeadSpec(num_items=True, requires=(("sparse_pred_ignore_index", -100),))
       for t in ("modernbert", "ultrabert")},  # sparse prediction drops exactly the positions the loss ignores
}

_NOT_BUILT = "not proven: the proof's tiny config of this family does not build or run ({})"
# (kind, model type) -> why it is refused.
ENCODER_REFUSED: dict[tuple[str, str], str] = {
    ("seq2seq", "encoder-decoder"): "a generic wrapper around two models of any families: not proven",
    ("speech_seq2seq", "speech-encoder-decoder"): "a generic wrapper around two models of any families: not proven",
    ("seq2seq", "fsmt"): "get_output_embeddings() returns the decoder's input embedding, not its output projection",
    ("seq2seq", "prophetnet"): "n-gram prediction streams with its own smoothed loss",
    ("seq2seq", "switch_transformers"): "router z-loss and load-balancing loss added to the CE (output_router_logits)",
    ("seq2seq", "nllb-moe"): "router auxiliary loss added to the CE (output_router_logits)",
    ("seq2seq", "t5gemma"): _NOT_BUILT.format("the tiny model exhausts memory"),
    ("seq2seq", "t5gemma2"): _NOT_BUILT.format("the tiny model exhausts memory"),
    ("speech_seq2seq", "canary"): _NOT_BUILT.format("encoder subsampling sizes"),
    ("speech_seq2seq", "cohere_asr"): _NOT_BUILT.format("unset special token ids"),
    ("speech_seq2seq", "moonshine_streaming"): _NOT_BUILT.format("config validation"),
    ("speech_seq2seq", "pop2piano"): _NOT_BUILT.format("its feature extractor needs librosa, not installed"),
    ("seq2seq", "omniasr"): "a speech recognizer (transformers 5.25) listed in the text seq2seq mapping: not proven",
    ("speech_seq2seq", "dia"): "a text-to-speech model: its heads predict several audio codebooks",
    ("speech_seq2seq", "vibevoice"): "a text-to-speech model with a diffusion head",
    ("masked_lm", "mobilebert"): "its head multiplies by [decoder.weight^T, dense.weight] without calling the "
                                 "output embeddings module",
    ("masked_lm", "perceiver"): "no output embeddings module (the decoder reuses the input embedding matrix)",
    ("masked_lm", "luke"): "adds an entity-prediction loss when entity_labels are given",
    ("masked_lm", "xlm"): "prediction layer with an optional adaptive softmax (the causal table refuses it too)",
    ("masked_lm", "flaubert"): "prediction layer with an optional adaptive softmax (the causal table refuses it too)",
    ("masked_lm", "neomme"): _NOT_BUILT.format("rotary factor validation"),
}

# Decoder-only (shifted causal loss) audio / multimodal LMs listed in the seq2seq mappings: not this table's
# (the causal / multimodal mappings decide for them).
CAUSAL_ELSEWHERE: frozenset[str] = frozenset("""audioflamingo3 glmasr granite_speech granite_speech_plus
moss_transcribe_diarize musicflamingo nemo_speechlm qwen2_audio qwen3_asr vibevoice_asr voxtral voxtral_realtime
fun_asr_nano kyutai_speech_to_text""".split())


def mapping(kind: str) -> dict:
    from transformers.models.auto import modeling_auto
    return dict(getattr(modeling_auto, MAPPINGS[kind], {}))


@functools.lru_cache(maxsize=1)
def classes() -> dict[str, tuple[str, str]]:
    """{class name: (kind, model type)} over the three mappings (the first mapping naming a class wins)."""
    out: dict[str, tuple[str, str]] = {}
    for kind in MAPPINGS:
        for model_type, names in mapping(kind).items():
            for name in (names,) if isinstance(names, str) else names:
                out.setdefault(name, (kind, model_type))
    return out


def entry(cls) -> tuple[str, str] | None:
    """(kind, model type) of a transformers class of the three mappings, else None."""
    if not cls.__module__.startswith("transformers."):
        return None
    return classes().get(cls.__name__)


def spec_or_reason(cls, model=None) -> EncoderHeadSpec | str | None:
    """The spec of a class of the three mappings, or the reason it is refused; None: not this table's class
    (or a decoder-only causal LM the causal / multimodal table decides for)."""
    found = entry(cls)
    if found is None or found[1] in CAUSAL_ELSEWHERE:
        return None
    spec = ENCODER_HEADS.get(found)
    if spec is None:
        return ENCODER_REFUSED.get(found, f"{found[0]} model type {found[1]!r} is not proven (not in "
                                          "hf_fusedce.hf.encoder.heads.ENCODER_HEADS)")
    for path, value in spec.requires if model is not None else ():
        actual = _resolve(model, path)
        if actual != value:
            return f"it has {path}={actual!r}; the fused loss is proven for {value!r} only"
    return spec


def supported(kind: str, status: bool = False):
    """Proven model types of one mapping (status=True: {type: recorded status, with the reason if not proven})."""
    if kind not in MAPPINGS:
        raise ValueError(f"kind must be 'causal_lm' or one of {sorted(MAPPINGS)}, got {kind!r}")
    if not status:
        return sorted(t for k, t in ENCODER_HEADS if k == kind)
    import json
    from pathlib import Path
    doc = json.loads((Path(__file__).resolve().parents[2] / "data" / "encoder_proof_results.json").read_text())
    return {r["model_type"]: r["status"] + (f" ({r['reason']})" if r["reason"] else "")
            for r in doc["results"] if r["kind"] == kind}


def _resolve(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj)


# ---- what the generic forward asks of an EncoderHeadSpec ------------------------------------------------------

def prepare_call(model, spec, call: dict) -> dict:
    """The stock call with labels=None but the decoder inputs stock would have built from the labels."""
    if not getattr(spec, "decoder_inputs", False) or call.get("labels") is None:
        return call
    if call.get("decoder_input_ids") is not None or call.get("decoder_inputs_embeds") is not None:
        return call
    return {**call, "decoder_input_ids": decoder_input_ids(model, call["labels"]), "use_cache": False}


def decoder_input_ids(model, labels):
    """The decoder inputs the family's own forward builds from `labels` (its own functions, not a copy)."""
    if callable(getattr(model, "prepare_decoder_input_ids_from_labels", None)):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    if callable(getattr(model, "_shift_right", None)):
        return model._shift_right(labels)
    shift = _module_attr(model, "shift_tokens_right")
    return shift(labels, model.config.pad_token_id, model.config.decoder_start_token_id)


def _module_attr(model, name):
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and hasattr(module, name) and cls.__module__.startswith("transformers."):
            return getattr(module, name)
    raise RuntimeError(f"hf_fusedce: no {name} found for {type(model).__name__}")


def extra_bias(model, spec):
    """Sum of the logit biases added after the head (flattened to [V]), or None."""
    total = None
    for path in getattr(spec, "logit_bias", ()):
        b = _resolve(model, path).reshape(-1)
        total = b if total is None else total + b
    return total


@contextlib.contextmanager
def empty_logit_biases(model, spec):
    """While capturing, the head returns an empty [..., 0] placeholder: the biases added to it must be empty
    too (a [1, 0] tensor broadcasts with it); the real ones are restored afterwards."""
    saved = []
    try:
        for path in getattr(spec, "logit_bias", ()):
            owner_path, _, name = path.rpartition(".")
            owner = _resolve(model, owner_path) if owner_path else model
            store = owner._parameters if name in owner._parameters else owner._buffers
            tensor = store[name]
            saved.append((store, name, tensor))
            store[name] = tensor.detach().new_empty(*tensor.shape[:-1], 0)
        yield
    finally:
        for store, name, tensor in saved:
            store[name] = tensor
