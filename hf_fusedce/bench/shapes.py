"""The benchmark matrix: lm_head shapes, token counts and precision modes, per device."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    d: int  # hidden size
    v: int  # vocabulary size
    softcap: float | None = None  # final-logit softcapping (Gemma 2: 30)


# The GPU matrix: the heads of Llama-3-8B, Qwen2.5-7B, Gemma-2-2B and a D=2048 V=32000 one.
GPU_SHAPES = {
    "llama3-8b": Shape("llama3-8b", 4096, 128256),
    "qwen2.5-7b": Shape("qwen2.5-7b", 3584, 152064),
    "gemma2-2b": Shape("gemma2-2b", 2304, 256000),
    "d2048-v32k": Shape("d2048-v32k", 2048, 32000),
}
GPU_NS = (4096, 8192, 16384, 65536)
# CPU: small enough that the whole default run takes ~1-3 minutes on 2 cores.
CPU_SHAPES = {
    "cpu-d256-v16k": Shape("cpu-d256-v16k", 256, 16384),
    "cpu-d512-v32k": Shape("cpu-d512-v32k", 512, 32000),
}
CPU_NS = (512, 1024)
# The heads of models people fine-tune, timed on CPU too (`hf-fusedce bench real-heads`).
REAL_HEADS = {
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", 896, 151936),
    "llama3.2-1b": Shape("llama3.2-1b", 2048, 128256),
    "qwen2.5-7b": Shape("qwen2.5-7b", 3584, 152064),
    "gemma2-2b-softcap": Shape("gemma2-2b-softcap", 2304, 256000, softcap=30.0),
}
REAL_NS = (1024, 4096, 16384)
REAL_DTYPES = ("fp32", "bf16")
KNOWN_SHAPES = {**GPU_SHAPES, **CPU_SHAPES, **REAL_HEADS}


def real_heads_cells(shapes=None, ns=None, dtypes=None) -> list[tuple[str, Shape, int]]:
    """(dtype key, shape, N) of the real-heads matrix in priority order: N=4096 first (Qwen2.5-0.5B and
    Llama-3.2-1B, then the others), then N=1024, then N=16384; fp32 before bf16 within each."""
    shapes = shapes or list(REAL_HEADS.values())
    ns, dtypes = ns or REAL_NS, dtypes or REAL_DTYPES
    n_order = sorted(ns, key=lambda n: (n != 4096, n))
    return [(dt, shape, n) for n in n_order for shape in shapes for dt in dtypes]


@dataclass(frozen=True)
class DtypeMode:
    name: str  # as written in the records
    param_dtype: torch.dtype  # dtype of hidden and weight (and their gradients)
    autocast_dtype: torch.dtype | None  # forward runs under torch.autocast(dtype=...) when set

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.param_dtype


DTYPE_MODES = {
    "bf16": DtypeMode("bf16", torch.bfloat16, None),
    # HF mixed precision: fp32 master weights and fp32 hidden states, the head's GEMM under bf16 autocast.
    "amp-bf16": DtypeMode("fp32-weights+bf16-autocast", torch.float32, torch.bfloat16),
    "fp32": DtypeMode("fp32", torch.float32, None),
}
DEFAULT_DTYPES = {"cuda": ("bf16", "amp-bf16"), "cpu": ("fp32",)}


def parse_shape(text: str) -> Shape:
    """A known name (llama3-8b, qwen2.5-7b, gemma2-2b, d2048-v32k, cpu-...) or DxV, e.g. 512x32000."""
    text = text.strip()
    if text in KNOWN_SHAPES:
        return KNOWN_SHAPES[text]
    try:
        d, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: use a name ({', '.join(KNOWN_SHAPES)}) or DxV such as 512x32000") from None
    if d <= 0 or v <= 0:
        raise ValueError(f"shape {text!r}: D and V must be positive")
    return Shape(f"d{d}-v{v}", d, v)


def default_shapes(device: torch.device) -> list[Shape]:
    return list((GPU_SHAPES if device.type == "cuda" else CPU_SHAPES).values())


def default_ns(device: torch.device) -> list[int]:
    return list(GPU_NS if device.type == "cuda" else CPU_NS)
