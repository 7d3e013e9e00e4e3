"""The math: fused linear + cross-entropy, no transformers import."""
from .ce.api import fused_linear_cross_entropy, triton_available
from .distill.api import fused_linear_distillation
from .distill.reference import reference_linear_distillation
from .ce.reference import reference_linear_cross_entropy, reference_token_stats
from .token_stats.api import TOKEN_OUTPUTS, fused_linear_token_stats

__all__ = ["fused_linear_cross_entropy", "fused_linear_distillation", "reference_linear_cross_entropy",
           "reference_linear_distillation", "triton_available", "fused_linear_token_stats",
           "reference_token_stats", "TOKEN_OUTPUTS"]
