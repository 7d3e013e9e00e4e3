"""The math: fused linear + cross-entropy, no transformers import."""
from .api import fused_linear_cross_entropy, triton_available
from .distill_api import fused_linear_distillation
from .distill_reference import reference_linear_distillation
from .reference import reference_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy", "fused_linear_distillation", "reference_linear_cross_entropy",
           "reference_linear_distillation", "triton_available"]
