"""The math: fused linear + cross-entropy, no transformers import."""
from .api import fused_linear_cross_entropy, triton_available
from .reference import reference_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy", "reference_linear_cross_entropy", "triton_available"]
