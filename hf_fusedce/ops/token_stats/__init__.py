"""Per-token outputs of the head (entropy, top-1, ... beside the loss), chunked: api, and the torch_impl /
triton_impl row functions (torch_impl also holds the TokenSpec / TokenRows / STAT_COLUMNS they share)."""
from .api import TOKEN_OUTPUTS, fused_linear_token_stats

__all__ = ["TOKEN_OUTPUTS", "fused_linear_token_stats"]
