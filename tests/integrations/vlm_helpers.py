"""Tiny vision-language models (Qwen2-VL, LLaVA) and their processors, built offline: the tokenizer hf_fusedce
ships (plus the family's image special tokens), the family's image processor at its defaults, a chat template that
places the image, and image + text rows with PIL images generated here. Used by the VLM integration tests (TRL,
PEFT, compile)."""
from __future__ import annotations

import functools

import numpy as np
import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The demo's Llama-2 format; a message's content is a string or Qwen-style blocks (image placeholders, text), and
# TRL's generation markers wrap the assistant turn.
_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {% for p in parts %}{% if p['type'] == 'image' %}"
    "IMAGE{% else %}{{ p['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% elif message['role'] == 'assistant' %}{% generation %} {% for p in parts %}{{ p['text'] }}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)
CHAT_TEMPLATE = _TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
LLAVA_TEMPLATE = _TEMPLATE.replace("IMAGE", "<image>\n")
LLAVA_PATCH = 28  # the processor's (and vision tower's) patch size: 64 image tokens for CLIP's 224-pixel crop


@functools.lru_cache(maxsize=1)
def qwen2_vl_processor():
    """Qwen2VLProcessor over the shipped 32k tokenizer + vision tokens and Qwen2VLImageProcessor's defaults (its PIL
    backend: no torchvision). Without torchvision there is no video processor, which Qwen2VLProcessor's
    constructor insists on: the subclass below declares the two parts it has (its images path is Qwen2-VL's)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from hf_fusedce.demo.tokenizer import load_demo_tokenizer

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    tok = load_demo_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok,
                                     chat_template=CHAT_TEMPLATE)


def tiny_qwen2_vl(processor, seed=0, tie=False, hidden=32, layers=1):
    """A one-layer Qwen2-VL (vision tower of depth 1) sized to the processor's tokenizer, float32, train mode."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    ids = dict(zip(["vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"],
                   tok.convert_tokens_to_ids(VISION_TOKENS)))
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_window_layers=layers,
                layer_types=["full_attention"] * layers, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(depth=1, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).float().train()


@functools.lru_cache(maxsize=1)
def llava_processor():
    """LlavaProcessor over the shipped 32k tokenizer + `<image>` (id 32000, LLaVA's default image_token_index) and
    CLIPImageProcessor's defaults (PIL backend)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from hf_fusedce.demo.tokenizer import load_demo_tokenizer

    tok = load_demo_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = LLAVA_TEMPLATE
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tok, patch_size=LLAVA_PATCH,
                          num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" feature strategy
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE)


def tiny_llava(processor, seed=0, tie=False, hidden=32):
    """A one-layer Llama with a one-layer CLIP vision tower (224-pixel images, patch 28), float32, train mode."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=processor.image_processor.crop_size["height"], patch_size=LLAVA_PATCH)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
                         vision_feature_layer=-1, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).float().train()


def images(n, seed=0):
    """`n` random RGB PIL images of 56x56 or 56x84 pixels (4 or 6 image tokens each at the processor defaults)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (56, 56 + 28 * (i % 2), 3), dtype=np.uint8)) for i in range(n)]


def vision_records(records, seed=0):
    """The demo's SFT conversations, each with one image (TRL places it before the first user turn)."""
    pics = images(len(records), seed)
    return [{"images": [p], "messages": r["messages"]} for p, r in zip(pics, records)]


def image_batch(processor, records, seed=0):
    """A processed image + text batch of the conversations (one image each), as TRL's assistant-only collator
    makes it: labels are the assistant tokens, -100 on the prompt, the image tokens and the padding."""
    from trl.data_utils import prepare_multimodal_messages

    pics = images(len(records), seed)
    messages = [prepare_multimodal_messages(r["messages"], images=[p]) for r, p in zip(records, pics)]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True,
                                        processor_kwargs={"padding": True, "padding_side": "right"})
    labels = out["input_ids"].masked_fill(out.pop("assistant_masks") == 0, -100)
    return {**out, "labels": labels}


FAMILIES = {"qwen2_vl": (qwen2_vl_processor, tiny_qwen2_vl), "llava": (llava_processor, tiny_llava)}


def vision_tower(model):
    """The model's vision encoder module (Qwen2-VL: `visual`, LLaVA: `vision_tower`)."""
    inner = model.model
    return getattr(inner, "visual", None) or inner.vision_tower
