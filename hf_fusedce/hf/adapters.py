"""The lm_head as (hidden', weight, bias) with logits = hidden' @ weight.T + bias, adapters included, exactly.

A PEFT layer's `.weight` is the frozen base weight: reading it silently drops the adapter. Instead:
- LoRA: logits = h W^T + b + sum_a s_a * dropout_a(h) A_a^T B_a^T = [h, s_a dropout_a(h) A_a^T, ...] @ [W, B_a, ...]^T
  (concatenated along the hidden dim: still one fused GEMM per chunk; the layer's own dropout modules are
  called in the stock order, so the random stream matches).
- modules_to_save: the active copy of the head. Trainable tokens: the merged weight (base rows replaced by the
  trainable deltas), exactly what PEFT's forward uses.
Anything else (DoRA, mixed-batch adapters, unknown wrappers) is reported by `unsupported_reason` so the caller
falls back to the stock forward with a warning instead of training a different loss.
"""
from __future__ import annotations

import torch
from torch import nn


def _lora_active(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _is_lora(m) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "base_layer")


def _is_modules_to_save(m) -> bool:
    return hasattr(m, "modules_to_save") and hasattr(m, "original_module")


def _is_trainable_tokens(m) -> bool:
    return hasattr(m, "token_adapter") or hasattr(m, "trainable_tokens_delta")


def _token_layer(m):
    """TrainableTokensWrapper holds the layer in `token_adapter`; a tied head is the layer itself."""
    return getattr(m, "token_adapter", m)


def _select(m) -> nn.Module:
    """The module that really computes the head for a modules_to_save wrapper (active copy or original)."""
    while _is_modules_to_save(m):
        active = [a for a in m.active_adapters if a in m.modules_to_save]
        m = m.original_module if (m.disable_adapters or not active) else m.modules_to_save[active[0]]
    return m


def unsupported_reason(head: nn.Module) -> str | None:
    """Why this head cannot be fused exactly, or None."""
    m = _select(head)
    if _is_lora(m):
        if any(m.use_dora.get(a, False) for a in _lora_active(m)):
            return "DoRA adapter on the output embeddings"
        return unsupported_reason(m.base_layer) if not isinstance(m.base_layer, nn.Linear) else None
    if _is_trainable_tokens(m):
        base = _token_layer(m).base_layer
        return None if isinstance(base, nn.Linear) else "trainable tokens on a non-Linear head"
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return f"output embeddings module {type(m).__name__} has no 2-D weight"
    if not isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward:
        return f"output embeddings module {type(m).__name__} is not a plain Linear"
    return None


def weight_modules(head: nn.Module) -> list[nn.Module]:
    """The modules whose own parameters `linear_parts` reads directly (instead of calling them): under ZeRO-3
    each must be entered through its hooks so its parameters are gathered (gather.call_through does that)."""
    m = _select(head)
    if _is_trainable_tokens(m):
        tok = _token_layer(m)
        return [tok, tok.base_layer, tok.trainable_tokens_delta]  # the deltas' ParameterDict is never called
    if _is_lora(m):
        if m.disable_adapters or m.merged:
            return [m.base_layer]
        return [m.base_layer, *(m.lora_B[a] for a in _lora_active(m))]
    return [m]


def linear_parts(head: nn.Module, hidden: torch.Tensor):
    """(hidden', weight, bias) with head(hidden) == hidden' @ weight.T + bias."""
    m = _select(head)
    if _is_trainable_tokens(m):
        tok = _token_layer(m)
        active = [a for a in tok.active_adapters if a in tok.trainable_tokens_delta]
        if tok.disable_adapters or not active or tok.merged:
            return hidden, tok.base_layer.weight, tok.base_layer.bias
        return hidden, tok.get_merged_weights(active), None  # PEFT's own forward drops the bias here too
    if _is_lora(m):
        return _lora_parts(m, hidden)
    return hidden, m.weight, getattr(m, "bias", None)


def _lora_parts(layer, hidden):
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    active = _lora_active(layer)
    if layer.disable_adapters or layer.merged or not active:
        return hidden, weight, bias
    hs, ws = [hidden], [weight]
    for name in active:
        a, b = layer.lora_A[name], layer.lora_B[name]
        s = layer.scaling[name]
        x = hidden.to(a.weight.dtype) if hidden.dtype != a.weight.dtype and not torch.is_autocast_enabled(hidden.device.type) else hidden
        hs.append((s * a(layer.lora_dropout[name](x))).to(hidden.dtype))
        ws.append(b.weight.to(weight.dtype))
        if b.bias is not None:  # lora_bias=True: B carries a bias scaled like the rest of the update
            bias = (0 if bias is None else bias) + s * b.bias.to(weight.dtype)
    return torch.cat(hs, -1), torch.cat(ws, 1), bias
