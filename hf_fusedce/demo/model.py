"""Tiny Llama-shaped causal LMs built offline from a config (random init, seeded)."""
from __future__ import annotations


def tiny_llama_config(vocab_size: int = 32000, hidden_size: int = 256, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int | None = None, max_position: int = 2048,
                      tie_word_embeddings: bool = False, bos_token_id: int = 1, eos_token_id: int = 2,
                      pad_token_id: int = 0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       intermediate_size=intermediate_size or int(hidden_size * 8 / 3 // 32 * 32),
                       max_position_embeddings=max_position, tie_word_embeddings=tie_word_embeddings,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       attn_implementation="sdpa")


def build_tiny_llama(seed: int = 0, dtype=None, **config_kwargs):
    """A randomly initialised `LlamaForCausalLM` (same weights for the same seed and config)."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
