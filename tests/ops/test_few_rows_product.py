"""dh of a chunk with few rows: BLAS may take its matrix-vector path there, which sums the V-long products in one
sequence (8x the error at V = 32000 on MKL's paths); the chunk loop sums short products instead."""
from __future__ import annotations

import pytest
import torch

from hf_fusedce.ops.ce.autograd import FEW_ROWS, _few_rows_product
from hf_fusedce.testing import accuracy_bound, rel_err


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS - 1])
def test_few_rows_product_is_as_accurate_as_a_blocked_gemm(rows):
    """Rows of a softmax gradient (each sums to ~0: the cancelling case) times a head, V = 32000 (not a multiple
    of the block): within 4x the error of the same rows inside a 64-row GEMM (BLAS's blocked path)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32000 + 77, 48, generator=g) * 0.02
    p, q = (torch.softmax(torch.randn(64, w.shape[0], generator=g) * 0.15, -1) for _ in range(2))
    z = (p - q).float()
    exact = z.double() @ w.double()
    blocked = (z @ w)[:rows]
    got = _few_rows_product(z[:rows].contiguous(), w)
    assert got.shape == (rows, 48) and got.dtype == torch.float32
    assert rel_err(got, exact[:rows]) <= accuracy_bound(exact[:rows], blocked)
