"""The fused linear + cross-entropy op: api (validation, options, backend choice), autograd (the chunk loop and its
autograd function, shared by every op here), spec (loss options, row inputs), reference (float64-able eager
oracle), torch_impl / triton_impl (the row math written twice: plain PyTorch and the Triton kernel)."""
from .api import fused_linear_cross_entropy, triton_available
from .reference import reference_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy", "reference_linear_cross_entropy", "triton_available"]
