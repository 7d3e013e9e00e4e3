"""The roofline model behind the default CUDA chunk budget (a model: no GPU ever ran it)."""
from __future__ import annotations

import torch

from hf_fusedce.ops.planning import cost_model as cm

BF16 = torch.bfloat16
GiB, MB = 1 << 30, 10**6


def test_default_budget_is_within_the_time_goal_at_every_listed_shape():
    for n, d, v in cm.SHAPES.values():
        for policy in ("auto", "native"):
            e = cm.estimate(n, d, v, BF16, cm.choose_budget(n, d, v, BF16, dw_accumulation=policy),
                            dw_accumulation=policy)
            assert e.x_floor <= 1.15, (n, d, v, policy, e)


def test_overheads_the_readme_states():
    n, d, v = cm.SHAPES["CCE paper (Gemma 2)"]
    native = cm.estimate(n, d, v, BF16, cm.choose_budget(n, d, v, BF16, dw_accumulation="native"),
                         dw_accumulation="native")
    assert native.overhead_bytes <= 313 * MB  # Liger's +313 MB in the CCE paper
    n, d, v = cm.SHAPES["Llama-3 8B, 64k tokens"]
    auto = cm.estimate(n, d, v, BF16, cm.choose_budget(n, d, v, BF16))
    assert auto.dw_dtype == "float32" and auto.overhead_bytes > GiB  # the fp32 accumulator's price (README)
    native = cm.estimate(n, d, v, BF16, cm.choose_budget(n, d, v, BF16, dw_accumulation="native"),
                         dw_accumulation="native")
    assert native.overhead_bytes <= GiB


def test_small_chunks_are_slower_in_the_model():
    """dW read-modify-write per chunk: below ~400 rows GEMM 3 turns memory-bound on an H100."""
    n, d, v = cm.SHAPES["Llama-3 8B"]
    small, large = (cm.estimate(n, d, v, BF16, b << 20, dw_accumulation="native") for b in (64, 512))
    assert small.seconds > 1.2 * large.seconds and large.x_floor < 1.1
