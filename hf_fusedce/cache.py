"""Where hf_fusedce keeps per-user files (re-proven families, native builds): HF_FUSEDCE_CACHE, else
$XDG_CACHE_HOME/hf_fusedce, else ~/.cache/hf_fusedce."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("HF_FUSEDCE_CACHE"):
        return Path(os.environ["HF_FUSEDCE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_fusedce"
