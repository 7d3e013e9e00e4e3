"""Cross-entropy over a vocabulary sharded across ranks (tensor parallel heads): api."""
from .api import shard_range, vocab_parallel_linear_cross_entropy

__all__ = ["shard_range", "vocab_parallel_linear_cross_entropy"]
