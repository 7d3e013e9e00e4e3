"""The memory callback for any `transformers.Trainer`; its public names, importable from here as before."""
from .memory_callback import (  # noqa: F401
    CARD_HEADING,
    MAX_INTERVALS_KEPT,
    METRIC_KEYS,
    MiB,
    FusedCEConfig,
    FusedCEMemoryCallback,
    fused_loss_head,
    probe_metrics,
    stock_loss_head,
)
