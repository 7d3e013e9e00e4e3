"""The memory callback for any `transformers.Trainer`, in parts: measuring (`meter`: each log interval;
`head_probe`: the loss head once), reporting (`report`: summary JSON, model-card section), and the callback that
routes the Trainer's events to them (`memory_callback`). Public names importable from here as before."""
from .config import METRIC_KEYS, MiB, FusedCEConfig  # noqa: F401
from .head_probe import fused_loss_head, probe_metrics, stock_loss_head  # noqa: F401
from .memory_callback import FusedCEMemoryCallback  # noqa: F401
from .meter import MAX_INTERVALS_KEPT  # noqa: F401
from .report import CARD_HEADING  # noqa: F401
