"""hf_fusedce: train Hugging Face causal LMs without materializing the [tokens x vocab] logits."""
from .ops import fused_linear_cross_entropy, fused_linear_distillation

__version__ = "0.1.0"

_LAZY = {
    "patch": "hf_fusedce.integrations",
    "unpatch": "hf_fusedce.integrations",
    "patched": "hf_fusedce.integrations",
    "is_patched": "hf_fusedce.hf.patching",
    "supported_model_types": "hf_fusedce.hf.patching",
    "FusedCETrainer": "hf_fusedce.trainer",
    "FusedCEConfig": "hf_fusedce.callback",
    "FusedCEMemoryCallback": "hf_fusedce.callback",
}

__all__ = ["fused_linear_cross_entropy", "fused_linear_distillation", *_LAZY]


def __getattr__(name):  # transformers is imported only when the HF layer is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_fusedce' has no attribute {name!r}")
