"""Fused linear distillation (student vs teacher heads, chunked): api, spec, reference, torch_impl / triton_impl
row functions; runs on the cross-entropy op's chunk loop (ops/ce/autograd.py)."""
from .api import fused_linear_distillation
from .reference import reference_linear_distillation

__all__ = ["fused_linear_distillation", "reference_linear_distillation"]
