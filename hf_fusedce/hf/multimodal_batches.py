"""Image and audio batches for the proof of the multimodal families, one DATA entry per model type.

An entry says what a processor would hand the model: the config edits a tiny model of the family needs (nested
dicts merge into the sub-configs), and a builder making the media inputs (pixel values with their grid / sizes /
masks, or audio features with their mask) for a batch of `BATCH` rows. The media tokens in the text are then laid
out like a chat sample: a 2-token prompt, the media tokens, a 6-token answer; labels are -100 on the prompt and
the media tokens (only the answer is trained). How many media tokens a row carries is what the model's own
`get_image_features` / `get_audio_features` returns for those inputs (the processor computes the same number).

Facts (shapes, grids, token ids) read from transformers' tests/models/<family>/test_modeling_<family>.py and the
modeling code of transformers 5.23. Families whose batch is not here are "proven on text only" with the reason of
`TEXT_ONLY` (or the default one): listed, never silently skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

BATCH = 2
PROMPT, ANSWER = 2, 6


@dataclasses.dataclass(frozen=True)
class MediaBatch:
    inputs: Callable  # (model, generator) -> {input name: tensor} for BATCH rows (one image / clip per row)
    token: str  # config path of the media token id placed in the text ("image_token_id", "text_config.x", ...)
    config: dict = dataclasses.field(default_factory=dict)  # edits of the tiny config (dicts merge into sub-configs)
    kind: str = "image"  # "image" | "audio": the proof variant recorded
    per_row: Callable | None = None  # (model, ids, media mask) -> extra per-token inputs (mm_token_type_ids...)
    features: Callable | None = None  # (model, inputs) -> media tokens per row, when get_*_features cannot tell


def _pixels(g, *shape):
    return torch.randn(*shape, generator=g)


# ---- per-family input builders ------------------------------------------------------------------------------

def _square(model, g):  # LLaVA, PaliGemma, InternVL, ...: (B, 3, S, S)
    size = _vision_size(model)
    return {"pixel_values": _pixels(g, BATCH, 3, size, size)}


def _vision_size(model) -> int:
    size = model.config.vision_config.image_size
    return size[0] if isinstance(size, (list, tuple)) else size


def _with_sizes(model, g):  # Mistral3 / Pixtral: square pixels + their (h, w)
    size = _vision_size(model)
    return {"pixel_values": _pixels(g, BATCH, 3, size, size), "image_sizes": torch.tensor([[size, size]] * BATCH)}


def _grid(h, w, flat: bool = True):  # Qwen2-VL family, GLM-4V: flattened patches + (t, h, w) per image
    def make(model, g):
        v = model.config.vision_config
        temporal = getattr(v, "temporal_patch_size", None) or getattr(v, "patch_temporal", 1)
        patch = (getattr(v, "in_channels", 3) * temporal * v.patch_size ** 2,) if flat else \
            (3, v.patch_size, v.patch_size)  # patches kept as images
        return {"pixel_values": _pixels(g, BATCH * h * w, *patch),
                "image_grid_thw": torch.tensor([[1, h, w]] * BATCH)}
    return make


def _mllama(model, g):  # one tile of 4 per image, aspect ratio 1:1 (id 1), cross-attending from the image token
    v = model.config.vision_config
    tiles = v.max_num_tiles
    mask = torch.zeros(BATCH, 1, tiles, dtype=torch.long)
    mask[..., 0] = 1
    return {"pixel_values": _pixels(g, BATCH, 1, tiles, 3, v.image_size, v.image_size),
            "aspect_ratio_ids": torch.ones(BATCH, 1, dtype=torch.long), "aspect_ratio_mask": mask}


def _mllama_cross_mask(model, ids, media):  # text from the image token on attends to the image's first tile
    mask = torch.zeros(*ids.shape, 1, model.config.vision_config.max_num_tiles, dtype=torch.long)
    mask[:, PROMPT:, 0, 0] = 1
    return {"cross_attention_mask": mask}


def _named(make, name: str):  # the same pixels under another input name (Video-LLaVA: pixel_values_images)
    def renamed(model, g):
        out = make(model, g)
        out[name] = out.pop("pixel_values")
        return out
    return renamed


def _merged_grid(h, w):  # VideoLLaMA3: the grid plus each image's merge size
    grid = _grid(h, w)

    def make(model, g):
        return {**grid(model, g), "image_merge_sizes": torch.tensor([2] * BATCH)}
    return make


def _hybrid(model, g):  # DeepSeek-VL hybrid: a low- and a high-resolution view of each image
    low, high = _vision_size(model), model.config.high_res_vision_config.image_size
    return {"pixel_values": _pixels(g, BATCH, 3, low, low), "high_res_pixel_values": _pixels(g, BATCH, 3, high, high)}


def _fuyu(model, g):  # Fuyu: each image as a row of flattened patches
    patch = model.config.patch_size
    return {"pixel_values": _pixels(g, BATCH, 4, model.config.num_channels * patch * patch)}


def _navit(h, w):  # SigLIP2 NaViT (LFM2-VL): padded patch rows, each image's (h, w) patch grid and a patch mask
    def make(model, g):
        v = model.config.vision_config
        return {"pixel_values": _pixels(g, BATCH, h * w, v.num_channels * v.patch_size ** 2),
                "spatial_shapes": torch.tensor([[h, w]] * BATCH),
                "pixel_attention_mask": torch.ones(BATCH, h * w, dtype=torch.bool)}
    return make


def _frames(n: int):  # Granite Speech: (B, frames, features) and a mask over the projected audio tokens
    def make(model, g):
        tokens = n // model.config.downsample_rate
        return {"input_features": _pixels(g, BATCH, n, model.config.encoder_config.input_dim),
                "input_features_mask": torch.ones(BATCH, tokens, dtype=torch.bool)}
    return make


def _mm_token_types(model, ids, media):  # 1 on image tokens, 0 on text
    return {"mm_token_type_ids": media.long()}


def _anyres(model, g):  # LLaVA-NeXT: base image + the tiles of its best pinpoint resolution, and its size
    size = _vision_size(model)
    return {"pixel_values": _pixels(g, BATCH, 3, 3, size, size),
            "image_sizes": torch.tensor([[size, 2 * size]] * BATCH)}


def _tiled_with_mask(model, g):  # Idefics2/3, SmolVLM: (B, images, 3, S, S) + a pixel attention mask
    size = _vision_size(model)
    mask = torch.ones(BATCH, 1, size, size, dtype=torch.bool)
    return {"pixel_values": _pixels(g, BATCH, 1, 3, size, size), "pixel_attention_mask": mask}


def _llama4_pixels(model, g):  # one tile per image: (images, 3, S, S)
    size = _vision_size(model)
    return {"pixel_values": _pixels(g, BATCH, 3, size, size)}


def _whisper_pooled(frames: int) -> int:  # conv stride 2, then average pool 2 (Qwen2-Audio's feature lengths)
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _mel(frames_field: str, mask: str | None):  # Whisper-like encoders: (B, mels, 2 * max_source_positions)
    def make(model, g):
        a = model.config.audio_config
        frames = 2 * getattr(a, frames_field)
        out = {"input_features": _pixels(g, BATCH, a.num_mel_bins, frames)}
        if mask:
            out[mask] = torch.ones(BATCH, frames, dtype=torch.long)
        return out
    return make


# ---- the tiny configs' sub-config edits (beyond proof.tiny_config's generic shrink) -----------------------------

_QWEN_ROPE = {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}}
_QWEN2_VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 8}
_QWEN25_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "num_heads": 4,
                  "patch_size": 8, "window_size": 32, "fullatt_block_indexes": [1]}
_QWEN3_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "num_heads": 4,
                 "patch_size": 8, "num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
_GLM4V_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "num_heads": 4,
                 "patch_size": 8, "image_size": 32}
_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8, "projection_dim": 32}

BATCHES: dict[str, MediaBatch] = {
    "gemma3": MediaBatch(_square, "image_token_id", {"mm_tokens_per_image": 4},  # 4x4 patches pooled to 2x2
                         per_row=lambda model, ids, media: {"token_type_ids": media.long()}),
    "qwen2_vl": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _QWEN2_VISION, "text_config": _QWEN_ROPE},
                           per_row=_mm_token_types),
    "qwen2_5_vl": MediaBatch(_grid(4, 8), "image_token_id",
                             {"vision_config": _QWEN25_VISION, "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "qwen3_vl": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _QWEN3_VISION, "text_config": _QWEN_ROPE},
                           per_row=_mm_token_types),
    "qwen3_vl_moe": MediaBatch(_grid(4, 4), "image_token_id",
                               {"vision_config": _QWEN3_VISION, "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "glm4v": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _GLM4V_VISION, "text_config": _QWEN_ROPE},
                        per_row=_mm_token_types),
    "glm4v_moe": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _GLM4V_VISION, "text_config": {
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5}}}, per_row=_mm_token_types),
    "llava": MediaBatch(_square, "image_token_id", {"vision_config": _CLIP}),
    "llava_next": MediaBatch(_anyres, "image_token_id",
                             {"vision_config": _CLIP, "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}),
    "internvl": MediaBatch(_square, "image_token_id",
                           {"vision_config": {"image_size": [32, 32], "patch_size": [8, 8]}}),
    "idefics3": MediaBatch(_tiled_with_mask, "image_token_id", {"scale_factor": 2}),
    "smolvlm": MediaBatch(_tiled_with_mask, "image_token_id", {"scale_factor": 2}),
    "paligemma": MediaBatch(_square, "image_token_id"),
    "mistral3": MediaBatch(_with_sizes, "image_token_id", {"spatial_merge_size": 2}),
    "llama4": MediaBatch(_llama4_pixels, "image_token_id",
                         {"vision_config": {"intermediate_size": 128, "projector_input_dim": 32,  # 128 = 32 x 4:
                                            "projector_output_dim": 32, "vision_output_dim": 32}}),  # pixel shuffle
    "mllama": MediaBatch(_mllama, "image_token_id", {
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
                          "attention_heads": 4, "image_size": 32, "patch_size": 8, "intermediate_layers_indices": [0],
                          "vision_output_dim": 64},
        "text_config": {"cross_attention_layers": [1]}}, per_row=_mllama_cross_mask, features=lambda *a: 1),
    "muse_glimmer": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
        "layer_types": ["window_attention", "full_attention"], "pos_emb_height": 8, "pos_emb_width": 8},
        "out_hidden_size": 128, "projector_hidden_size": 32}),  # 128 = 32 x merge 2 x 2
    "qwen2_5_omni_thinker": MediaBatch(_grid(4, 8), "image_token_id", {
        "vision_config": _QWEN25_VISION, "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "qwen3_omni_moe_thinker": MediaBatch(_grid(4, 4), "image_token_id", {
        "vision_config": _QWEN3_VISION, "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "qwen3_5": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _QWEN3_VISION}, per_row=_mm_token_types),
    "qwen3_5_moe": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _QWEN3_VISION},
                              per_row=_mm_token_types),
    "qwen4_exp": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _QWEN3_VISION}, per_row=_mm_token_types),
    "cosmos3_omni": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _QWEN3_VISION,
                                                               "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "hyperclovax_vision_v2": MediaBatch(_grid(4, 8), "image_token_id", {"vision_config": _QWEN25_VISION}),
    "exaone4_5": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": {"patch_size": 8, "depth": 2}}),
    "minimax_m3_vl": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": {"patch_size": 8}}),
    "video_llama_3": MediaBatch(_merged_grid(4, 4), "image_token_id", {"vision_config": {"patch_size": 8}}),
    "mistral_large4": MediaBatch(_with_sizes, "image_token_id"),
    "pp_chart2table": MediaBatch(_square, "image_token_id"),
    "qianfan_ocr": MediaBatch(_square, "image_token_id"),
    "qwen3_asr": MediaBatch(_mel("max_source_positions", "input_features_mask"), "audio_token_id",  # 100 frames:
                            {"audio_config": {"max_source_positions": 50, "num_mel_bins": 16}}, kind="audio"),  # 2 windows
    "glmasr": MediaBatch(_mel("max_source_positions", "input_features_mask"), "audio_token_id",
                         {"audio_config": {"max_source_positions": 16, "num_mel_bins": 16}}, kind="audio"),
    "deepseek_vl_hybrid": MediaBatch(_hybrid, "image_token_id", {"high_res_vision_config": {
        "image_size": 64, "patch_size": 8, "hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "global_attn_indexes": [1], "mlp_dim": 64}}),
    "fuyu": MediaBatch(_fuyu, "image_token_id"),
    "lfm2_vl": MediaBatch(_navit(4, 4), "image_token_id"),
    "lfm3_vl": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": {"patch_size": 8}}),
    "granite_speech": MediaBatch(_frames(30), "audio_token_id", {
        "encoder_config": {"hidden_dim": 32, "num_heads": 4, "dim_head": 8, "context_size": 8, "input_dim": 16},
        "projector_config": {"hidden_size": 32, "encoder_hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "intermediate_size": 64}}, kind="audio"),
    "muse_spark": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
        "layer_types": ["window_attention", "full_attention"], "pos_emb_height": 8, "pos_emb_width": 8},
        "out_hidden_size": 128, "projector_hidden_size": 32}),
    "paddleocr_vl": MediaBatch(_grid(4, 4, flat=False), "image_token_id", {
        "vision_config": {"patch_size": 8}, "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "vipllava": MediaBatch(_square, "image_token_id", {"vision_config": _CLIP, "vision_feature_layers": [-1, -2]}),
    "video_llava": MediaBatch(_named(_square, "pixel_values_images"), "image_token_id", {"vision_config": _CLIP}),
    "llava_next_video": MediaBatch(_anyres, "image_token_id", {
        "vision_config": _CLIP, "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}),
    "llava_onevision": MediaBatch(_anyres, "image_token_id", {"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}),
    "aya_vision": MediaBatch(_square, "image_token_id"),
    "cohere2_vision": MediaBatch(_with_sizes, "image_token_id"),
    "idefics2": MediaBatch(_tiled_with_mask, "image_token_id", {"perceiver_config": {"resampler_n_latents": 4}}),
    "lighton_ocr": MediaBatch(_with_sizes, "image_token_id"),
    "glm46v": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _GLM4V_VISION, "text_config": _QWEN_ROPE},
                         per_row=_mm_token_types),
    "glm_ocr": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": _GLM4V_VISION, "text_config": _QWEN_ROPE},
                          per_row=_mm_token_types),
    "cosmos3_edge": MediaBatch(_grid(4, 4), "image_token_id", {"vision_config": {"patch_size": 8},
                                                               "text_config": _QWEN_ROPE}, per_row=_mm_token_types),
    "deepseek_vl": MediaBatch(_square, "image_token_id"),
    "janus": MediaBatch(_square, "image_token_id"),
    "got_ocr2": MediaBatch(_square, "image_token_id"),
    "ovis2": MediaBatch(_square, "image_token_id"),
    "qwen2_audio": MediaBatch(_mel("max_source_positions", "feature_attention_mask"), "audio_token_id",
                              {"audio_config": {"max_source_positions": 16, "num_mel_bins": 16}}, kind="audio",
                              features=lambda model, inputs, kind: _whisper_pooled(inputs["input_features"].shape[-1])),
    "voxtral": MediaBatch(_mel("max_source_positions", None), "audio_token_id",
                          {"audio_config": {"max_source_positions": 16, "num_mel_bins": 16}, "audio_token_id": 90},
                          kind="audio"),
}

BATCHES["glmga"] = BATCHES["glm46v"]  # the same class (Glm46VForConditionalGeneration)
BATCHES["shieldgemma2"] = BATCHES["gemma3"]  # Gemma3ForConditionalGeneration
BATCHES["granite_speech_plus"] = BATCHES["granite_speech"]  # the same speech encoder and Q-Former projector

# Pixtral-12B is a LlavaForConditionalGeneration with a Pixtral vision tower (Liger patches it as "pixtral"): proven
# as its own entry on the llava class (`base`), not a model type of the mappings.
PIXTRAL = MediaBatch(_with_sizes, "image_token_id", {"vision_config": {
    "model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "head_dim": 8, "image_size": 32, "patch_size": 8},
    "vision_feature_select_strategy": "full", "vision_feature_layer": -1})  # as Pixtral-12B's config
EXTRA = {"pixtral": ("llava", PIXTRAL)}

# Families of the multimodal mappings proven on text only, with the reason (the default reason otherwise).
TEXT_ONLY: dict[str, str] = {
    "evolla": "a protein-text model: its other input is a protein sequence (protein_input_ids), not an image",
    **dict.fromkeys(("gemma4", "gemma4_unified"), "the config class's defaults have no vision or audio sub-config: "
                    "a media batch cannot be built from the config alone"),
    "emu3": "images enter as VQ-VAE codes: the tiny VQ-GAN of the default vq_config is not shrunk by the proof yet",
    "moss_transcribe_diarize": "its audio features also need a raw-audio padding_mask; no builder yet",
    "glm5_next": "its image batch on the tiny config failed to allocate under the proof's 6 GB per-worker limit "
                 "(and took 218 s without it): the vision tower's sizes are not shrunk yet",
    "kimi_k25": "its vision projector's normalized width (1152) is not derived from the shrunk vision config; no "
                "builder yet",
}
_DEFAULT_REASON = "no image/audio batch builder in hf_fusedce/hf/multimodal_batches.py yet; its media inputs run stock"


def text_only_reason(model_type: str) -> str:
    return TEXT_ONLY.get(model_type, _DEFAULT_REASON)


# ---- building the tiny model and its batch ----------------------------------------------------------------------

# Tiny-config edits of families without a media batch yet, so that their text batches can be proven (the
# family's own validators or modeling code need them; checkpoints set them).
CONFIGS: dict[str, dict] = {
    "cohere_compass": {"text_config": {"rope_parameters": {"full_attention": {"rope_type": "default",
                                                                              "rope_theta": 10000.0}}}},
    "glm5_next": {"text_config": {"index_topk": 16}},  # a multiple of index_kpool
    "granite_docling": {"vision_config": {"out_hidden_size": 32}},  # = the text hidden size
    "step3p7": {"text_config": {"sliding_window": 16}},
    "fun_asr_nano": {"adaptor_config": {"intermediate_size": 8}},  # = text hidden size // 4
    "muse_spark": {"audio_config": {"out_hidden_size": 32}},  # = the text hidden size
}


def config_edits(model_type: str) -> dict:
    """The family's edits of the tiny config (proof.tiny_config applies them: text and media proofs share it)."""
    entry = BATCHES.get(model_type)
    return {**CONFIGS.get(model_type, {}), **(entry.config if entry is not None else {})}


def media_entry(model_type: str):
    """(the family whose class and tiny config are built, its batch entry): EXTRA's towers ride a base family."""
    return EXTRA.get(model_type, (model_type, BATCHES.get(model_type)))


def media_inputs(model, entry, special_ids: set, seed: int = 1):
    """(ids, labels, extra inputs) of the entry's media batch for the built tiny model (hf.proof builds it)."""
    g = torch.Generator().manual_seed(seed)
    extra = entry.inputs(model, g)
    n_media = (entry.features or _n_features)(model, extra, entry.kind)
    token = int(_token_id(model, entry.token))
    ids, labels = _text(model, n_media, token, g, special_ids)
    if entry.per_row is not None:
        extra.update(entry.per_row(model, ids, ids == token))
    return ids, labels, extra


def merged(kw: dict, edits: dict) -> dict:
    return {**kw, **{k: {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
                     for k, v in edits.items()}}


def _token_id(model, path: str):
    from .heads import resolve
    if "." in path:
        return resolve(model, path)
    return getattr(model.config, path, None) if getattr(model.config, path, None) is not None else \
        getattr(model.config, path.replace("_id", "_index"))


@torch.no_grad()
def _n_features(model, inputs: dict, kind: str) -> int:
    """Media tokens one row needs: the rows the model's own feature extractor returns for the batch / BATCH."""
    get = getattr(model, f"get_{kind}_features", None) or getattr(model.model, f"get_{kind}_features")
    out = get(**inputs)
    feats = getattr(out, "pooler_output", None)
    if feats is None:
        feats = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    width = model.config.get_text_config().hidden_size
    total = sum(f.numel() for f in feats) if isinstance(feats, (list, tuple)) else feats.numel()
    assert total % (width * BATCH) == 0, f"{total} media features not a multiple of {BATCH} rows x {width}"
    return total // (width * BATCH)


def _text(model, n_media: int, token: int, g, special_ids: set):
    """Rows of PROMPT random tokens, n_media media tokens, ANSWER random tokens; labels on the answer only."""
    vocab = model.config.get_text_config().vocab_size
    allowed = torch.tensor([i for i in range(vocab) if i not in special_ids])
    length = PROMPT + n_media + ANSWER
    ids = allowed[torch.randint(0, len(allowed), (BATCH, length), generator=g)]
    ids[:, PROMPT:PROMPT + n_media] = token
    labels = ids.clone()
    labels[:, :PROMPT + n_media] = -100
    labels[1, -2] = -100
    return ids, labels
