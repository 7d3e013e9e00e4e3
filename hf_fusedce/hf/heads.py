"""Declarative table of causal-LM head quirks, one entry per model type of transformers' causal-LM mapping.

The patched forward captures the hidden states exactly where the stock forward calls the output-embedding
module (so anything a model does *before* its head, e.g. MiniCPM3 dividing the hidden states, is already in
them) and then has to reproduce what the stock forward does *after* it. That is what an entry declares:

- ``softcap``: config path of a tanh soft cap, z = cap * tanh(z / cap)       (Gemma 2/3/4, RecurrentGemma...)
- ``logit_mul`` / ``logit_div``: path of a factor the logits are multiplied / divided by  (Cohere, Granite...)
- ``vocab_slice``: config path of the vocabulary size the logits are cut to  (padded vocabularies)
- ``z_loss``: path of Bamba's coefficient c adding c * mean over all positions of logsumexp(z)^2
- ``router_aux``: path of the coefficient c of the MoE router load-balancing loss added as ``c * aux``
  (Mixtral family, when ``output_router_logits``); aux from the model module's own ``load_balancing_loss_func``
- ``shift=False``: the model's loss is ``CrossEntropyLoss`` on *unshifted* labels (BART-style decoders), so
  ``num_items_in_batch`` is ignored as stock does
- ``mean_only=True``: the shifted loss is ``CrossEntropyLoss``'s mean (Qwen2-Audio, Granite Speech): stock ignores
  ``num_items_in_batch``, so do we
- ``pre_head``: documentation of what the model applies before its head (already inside the captured hidden)

Paths are resolved on the model: ``config.x`` (``text_config.x`` = ``config.get_text_config().x``) or a model
attribute chain. Every entry is proven against the stock forward by ``hf_fusedce.hf.proof``; model types not in
``HEADS`` are refused (``REFUSED`` says why for the known-incompatible ones).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class HeadSpec:
    softcap: str | None = None
    logit_mul: str | None = None
    logit_div: str | None = None
    vocab_slice: str | None = None
    z_loss: str | None = None
    router_aux: str | None = None
    shift: bool = True
    mean_only: bool = False
    pre_head: str | None = None

    def quirks(self) -> dict:
        """Non-default fields, for cards and error messages."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


PLAIN = HeadSpec()
_SOFTCAP = HeadSpec(softcap="text_config.final_logit_softcapping")
_AUX = HeadSpec(router_aux="router_aux_loss_coef")
_UNSHIFTED = HeadSpec(shift=False)
_MEAN_ONLY = HeadSpec(mean_only=True)

# Families whose forward is `logits = head(hidden)` followed by the stock ForCausalLMLoss.
_PLAIN_TYPES = """
afmoe apertus arcee aria_text axk1 axk2 bailing_hybrid bert bert-generation big_bird biogpt bitnet bloom blt
camembert codegen ctrl cwm data2vec-text deepseek_v2 deepseek_v3 deepseek_v32 diffllama dots1 dots3_note
dots3_note_text electra emu3 ernie ernie4_5 exaone4 exaone_moe falcon falcon_mamba fuyu gemma gemma3 glm glm4
glm4_moe glm4_moe_lite glm_moe_dsa got_ocr2 gpt-sw3 gpt2 gpt_bigcode gpt_neo gpt_neox gpt_neox_japanese gptj
helium hrm_text hunyuan_v1_dense hunyuan_v1_moe hy_v3 hy_v4 internlm3 iquestcoder jais2 kimi_linear kolibri1
lfm2 lfm2_moe lfm3 llama llama4 llama4_text longcat_flash mamba mamba2 megatron-bert mimo_v2_flash ministral
ministral3 mistral mllama modernbert-decoder moshi moss_transcribe_diarize mpt nemotron nemotron_h olmo olmo2
olmo3 olmo_hybrid openai-gpt opt persimmon phi phi3 phi4_multimodal qwen2 qwen3 qwen3_5 qwen3_5_text reformer
rembert roberta roberta-prelayernorm roc_bert roformer rwkv seed_oss smollm3 solar_open stablelm starcoder2
xglm xlm-roberta xlm-roberta-xl xmod youtu zamba zamba2 zaya
apertus1p5_text ergo exaone kolibri1_1 minicpm5_moe param2moe sarvam_mla sarvam_moe
""".split()

_SOFTCAP_TYPES = """beam gemma2 gemma3_text gemma3n gemma3n_text gemma4 gemma4_text gemma4_unified
gemma4_unified_text nanochat vaultgemma""".split()

_AUX_TYPES = """dbrx deepseek_v4 ernie4_5_moe flex_olmo flint gpt_oss jamba laguna mellum minimax
minimax_m2 minimax_m3_vl_text mixtral olmoe phimoe qwen2_moe qwen3_5_moe_text qwen3_moe qwen3_next
qwen4_exp_text lara_mini""".split()

_UNSHIFTED_TYPES = """bart bigbird_pegasus blenderbot blenderbot-small cpmant marian mbart mvp pegasus plbart
trocr whisper""".split()

# Vision- and audio-language classes of the image-text-to-text / multimodal-LM mappings outside the causal-LM
# mapping (heads.LOSS_MAPPINGS): `logits = lm_head(hidden)` then the stock causal-LM loss on the text tokens.
_MULTIMODAL_PLAIN_TYPES = """
aria aya_vision cohere2_vision cosmos3_edge cosmos3_omni deepseek_ocr2 deepseek_vl deepseek_vl_hybrid
diffusion_gemma evolla exaone4_5 fast_vlm fun_asr_nano glm46v glm4v glm_ocr glmasr glmga hunyuan_vl idefics
idefics2 idefics3 instructblip instructblipvideo internvl janus kimi_k25 kyutai_speech_to_text lfm2_vl lfm3_vl
lighton_ocr llava llava_next llava_next_video llava_onevision minicpm_ocr minicpmv4_6 minicpmv4_7 mistral3
mistral4 molmo2 nemo_speechlm ovis2 paddleocr_vl paligemma perception_lm pp_chart2table qianfan_ocr
qwen2_5_omni_thinker qwen2_5_vl qwen2_vl qwen3_asr qwen3_vl shieldgemma2 smolvlm step3p7 blip-2 unlimited_ocr
vibevoice_asr video_llama_3 video_llava vipllava voxtral voxtral_realtime
apertus1p5 hy_v4_vl llava_onevision1_5 ovis2_5
""".split()
# MoE: the router loss coefficient is read from the text config (the multimodal classes have no attribute of it)
_MULTIMODAL_AUX_TYPES = """ernie4_5_vl_moe glm4v_moe glm5_next minimax_m3_vl qwen3_omni_moe_thinker qwen3_vl_moe
qwen3_5_moe qwen4_exp""".split()



def _from_release(version: str, newer: HeadSpec, older: HeadSpec) -> HeadSpec:
    """The entry of a family whose head changed in a transformers release: `newer` from `version` on."""
    from importlib.metadata import version as installed
    from packaging.version import Version
    return newer if Version(installed("transformers")) >= Version(version) else older


_MULTIMODAL_HEADS: dict[str, HeadSpec] = {
    **{t: PLAIN for t in _MULTIMODAL_PLAIN_TYPES},
    **{t: HeadSpec(router_aux="text_config.router_aux_loss_coef") for t in _MULTIMODAL_AUX_TYPES},
    "granite4_vision": HeadSpec(logit_div="text_config.logits_scaling"),
    "granite_docling": HeadSpec(logit_div="text_config.logits_scaling"),
    "hyperclovax_vision_v2": HeadSpec(logit_mul="text_config.logits_scaling"),
    "cohere_compass": HeadSpec(logit_mul="logit_scale"),
    # transformers 5.25 multiplies AyaVision's logits by text_config.logit_scale (5.23 did not)
    "aya_vision": _from_release("5.25.0", HeadSpec(logit_mul="text_config.logit_scale"), PLAIN),
    **dict.fromkeys(("muse_glimmer", "muse_spark"), HeadSpec(logit_mul="text_config.output_multiplier",
                                                             softcap="text_config.final_logit_softcapping")),
    "mistral_large4": HeadSpec(softcap="final_logit_softcapping"),
    "qwen2_audio": _MEAN_ONLY,
    "granite_speech": _MEAN_ONLY,
    "granite_speech_plus": _MEAN_ONLY,
}

HEADS: dict[str, HeadSpec] = {
    **{t: PLAIN for t in _PLAIN_TYPES},
    **{t: _SOFTCAP for t in _SOFTCAP_TYPES},
    **{t: _AUX for t in _AUX_TYPES},
    **{t: _UNSHIFTED for t in _UNSHIFTED_TYPES},
    "recurrent_gemma": HeadSpec(softcap="config.logits_soft_cap"),
    "cohere": HeadSpec(logit_mul="logit_scale"),
    "cohere2": HeadSpec(logit_mul="logit_scale"),
    "cohere2_moe": HeadSpec(logit_mul="logit_scale"),
    "cohere_compass_text": HeadSpec(logit_mul="logit_scale"),
    "hyperclovax": HeadSpec(logit_mul="config.logits_scaling"),
    "falcon_h1": HeadSpec(logit_mul="model.lm_head_multiplier"),
    "granite": HeadSpec(logit_div="config.logits_scaling"),
    "granite_swa": HeadSpec(logit_div="config.logits_scaling"),
    "granitemoe": HeadSpec(logit_div="config.logits_scaling", router_aux="router_aux_loss_coef"),
    "granitemoe_swa": HeadSpec(logit_div="config.logits_scaling", router_aux="router_aux_loss_coef"),
    "granitemoehybrid": HeadSpec(logit_div="config.logits_scaling", router_aux="router_aux_loss_coef"),
    "granitemoeshared": HeadSpec(logit_div="config.logits_scaling", router_aux="router_aux_loss_coef"),
    "minicpm3": HeadSpec(pre_head="hidden / config.logits_scaling"),
    "bamba": HeadSpec(z_loss="z_loss_coefficient"),
    "jetmoe": HeadSpec(router_aux="aux_loss_coef"),
    **_MULTIMODAL_HEADS,  # last: a type with a text class and a multimodal class takes the entry both satisfy
}

# Families whose loss head the table cannot express exactly: patching them is refused.
REFUSED: dict[str, str] = {
    "doge": "router aux loss called with an extra top-k argument (floor(sqrt(num_experts)))",
    "git": "loss skips image-token positions (num_image_tokens) before shifting",
    "musicgen": "several codebook heads stacked, loss averaged over codebooks",
    "musicgen_melody": "several codebook heads stacked, loss averaged over codebooks",
    "prophetnet": "n-gram prediction streams with its own smoothed loss",
    "xlm": "adaptive-softmax / prediction-layer loss inside the head module",
    "xlnet": "permutation-LM loss on unshifted labels with its own target mapping",
    "gemma4_assistant": "masked embedding head (`masked_embedding`) and no loss",
    "gemma4_unified_assistant": "masked embedding head (`masked_embedding`) and no loss",
    "inkling2_text": "learned logit soft-cap module and vocab slice",
    "inkling_text": "not importable in this transformers build",
    "xlstm": "soft cap applied in chunks with a training-dependent path",
    "chameleon": "the logits of image-vocabulary tokens are set to -inf after the head (a vocabulary mask)",
    "inkling2": "learned logit soft-cap module and vocab slice",
    "inkling_mm_model": "vocab slice to text_config.unpadded_vocab_size after the head (not proven)",
    "blip": "the loss is the text decoder's own (label smoothing 0.1, reduction inside BlipTextLMHeadModel)",
    "kosmos-2": "the loss is the inner text model's (Kosmos2TextForCausalLM), not this class's head",
    "kosmos-2.5": "the loss is the inner text model's (Kosmos2_5TextForCausalLM), not this class's head",
    "vision-encoder-decoder": "a generic wrapper: the loss is CrossEntropyLoss over whatever decoder it holds",
    "qwen2_5_omni": "a generation wrapper (thinker + talker); fine-tune its thinker (qwen2_5_omni_thinker)",
    "qwen3_omni_moe": "a generation wrapper (thinker + talker); fine-tune its thinker (qwen3_omni_moe_thinker)",
    **dict.fromkeys(("florence2", "pix2struct", "t5gemma2", "udop", "pp_formulanet"),
                    "encoder-decoder: stock builds the decoder inputs from the labels, which the captured forward "
                    "(labels=None) does not; waits for the seq2seq (unshifted) mapping support"),
    "nemotron_h_omni": "no output embeddings module (get_output_embeddings() is None)",
    "pi0": "an action model: no output embeddings module (get_output_embeddings() is None)",
    "pi05": "an action model: no output embeddings module (get_output_embeddings() is None)",
    "inkling2_loop": "learned logit soft-cap module and vocab slice",
    "dory": "a learned logit scale inside the head (lm_head.logit_scale, a trained parameter)",
    "omniasr": "a speech encoder-decoder in the multimodal mapping: its loss is not the causal-LM head's (not proven)",
    "inkling2_loop_text": "learned logit soft-cap module and vocab slice",
}

# transformers' auto mappings whose classes patch() accepts, -> the loss kind of their classes: "shifted" (the
# causal-LM loss; a HEADS entry may still declare shift=False) or "unshifted" (labels aligned with the logits, the
# decoder loss of an encoder-decoder). A class is fused when its forward's class is in one of these mappings AND
# its model type is in HEADS. Adding a mapping (seq2seq, masked LM) is one line here.
LOSS_MAPPINGS: dict[str, str] = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "shifted",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "shifted",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES": "shifted",
}


def mapping_entries() -> list[tuple[str, str, str]]:
    """(model type, class name, loss kind) of every entry of the LOSS_MAPPINGS mappings, in table order."""
    from transformers.models.auto import modeling_auto
    return [(model_type, name, kind) for mapping, kind in LOSS_MAPPINGS.items()
            for model_type, names in getattr(modeling_auto, mapping, {}).items()
            for name in ((names,) if isinstance(names, str) else names)]


@functools.lru_cache(maxsize=1)
def fused_classes() -> dict[str, tuple[str, str]]:
    """{class name: (model type, loss kind)} of every class of LOSS_MAPPINGS (a class several types map to, e.g.
    GPT2LMHeadModel for gpt2 and gpt-sw3, keeps the first type the table knows). Whether images / audio are fused too is decided by
    the proof (proof.media_proven_types)."""
    classes: dict[str, tuple[str, str]] = {}
    for model_type, name, kind in mapping_entries():
        # a class several types map to keeps the first type the table knows: transformers 5.25 maps `exaone` to
        # LlamaForCausalLM ahead of `llama`, which would otherwise hide the class from patch()
        if name not in classes or (classes[name][0] not in HEADS and model_type in HEADS):
            classes[name] = (model_type, kind)
    return classes


def resolve(model, path: str):
    """Value of a table path on a model instance (see module doc)."""
    head, *rest = path.split(".")
    obj = model.config.get_text_config() if head == "text_config" else getattr(model, head)
    return functools.reduce(getattr, rest, obj)


def model_type_of(model) -> str | None:
    """The table's model type for a model: its config's, or (for text sub-configs such as `mllama_text_model`)
    the mapping entry of its class (LOSS_MAPPINGS)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in HEADS or model_type in REFUSED:
        return model_type
    entry = fused_classes().get(type(model).__name__)  # the exact class: a subclass may have changed the forward
    return entry[0] if entry is not None and entry[0] in HEADS else model_type
