"""Float64 references that never hold the whole [N x V] logits, and the error metrics the records carry.

`chunked_reference` is written out independently of the op (plain float64 GEMMs, logsumexp, softmax, row
by row chunks) for the plain mean cross-entropy the bench measures: loss, dL/dh and dL/dW.
`subset_reference` is what `--verify` uses at shapes where even float64 dL/dW or a full float64 pass is
too large: the exact float64 loss over ALL tokens (chunked logsumexp), dL/dh on a random subset of token
rows, and dL/dW on a subset of vocabulary rows (the target ids present plus random ones) using the float64
logsumexp of every token, so each compared entry is exact, not an approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_fusedce.testing import rel_err

_F64 = torch.float64


def _chunk_rows(n: int, v: int, budget_bytes: int) -> int:
    return max(1, min(n, budget_bytes // (8 * max(1, v) * 3)))


@dataclass
class Reference:
    loss: float
    dh: torch.Tensor | None  # float64 (N, D), or rows `dh_rows` only
    dw: torch.Tensor | None  # float64 (V, D), or rows `dw_rows` only
    dh_rows: torch.Tensor | None = None  # int64 index of the token rows dh holds (None: all)
    dw_rows: torch.Tensor | None = None  # int64 index of the vocab rows dw holds (None: all)


@torch.no_grad()
def chunked_reference(h, w, y, *, ignore_index: int = -100, budget_bytes: int = 256 << 20) -> Reference:
    """Exact float64 mean cross-entropy of softmax(h W^T) and its gradients, chunk by chunk over tokens."""
    n, _ = h.shape
    v = w.shape[0]
    w64 = w.to(_F64)
    valid = y != ignore_index
    n_valid = max(int(valid.sum()), 1)
    dh = torch.zeros(h.shape, dtype=_F64, device=h.device)
    dw = torch.zeros(w.shape, dtype=_F64, device=w.device)
    total = torch.zeros((), dtype=_F64, device=h.device)
    step = _chunk_rows(n, v, budget_bytes)
    for s in range(0, n, step):
        hc = h[s:s + step].to(_F64)
        yc, vc = y[s:s + step], valid[s:s + step]
        z = hc @ w64.t()
        lse = torch.logsumexp(z, 1)
        safe = torch.where(vc, yc, 0)
        picked = z.gather(1, safe[:, None]).squeeze(1)
        total += torch.where(vc, lse - picked, 0).sum()
        g = torch.softmax(z, 1)
        g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
        g *= (vc.to(_F64) / n_valid)[:, None]
        dh[s:s + step] = g @ w64
        dw += g.t() @ hc
        del z, g
    return Reference(float(total / n_valid), dh, dw)


@torch.no_grad()
def subset_reference(h, w, y, *, n_rows: int = 256, n_vocab_rows: int = 512, ignore_index: int = -100,
                     budget_bytes: int = 1 << 30, seed: int = 0) -> Reference:
    """Exact float64 loss over all tokens; dh on `n_rows` random token rows; dW on `n_vocab_rows` vocab rows
    (half target ids that occur, half random). Costs one float64 pass of logits chunks; holds no N x V."""
    n, _ = h.shape
    v = w.shape[0]
    dev = h.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    valid = y != ignore_index
    n_valid = max(int(valid.sum()), 1)
    w64 = w.to(_F64)
    # vocab rows: target ids that occur (their gradient has the -1 term) and random ids
    present = torch.unique(y[valid]).cpu()
    pick_t = present[torch.randperm(present.numel(), generator=gen)[: n_vocab_rows // 2]]
    pick_r = torch.randperm(v, generator=gen)[: n_vocab_rows - pick_t.numel()]
    vrows = torch.unique(torch.cat([pick_t, pick_r])).to(dev)
    trows = torch.sort(torch.randperm(n, generator=gen)[: min(n_rows, n)]).values.to(dev)
    w_sub = w64.index_select(0, vrows)
    lse = torch.empty(n, dtype=_F64, device=dev)
    total = torch.zeros((), dtype=_F64, device=dev)
    dw = torch.zeros((vrows.numel(), w.shape[1]), dtype=_F64, device=dev)
    step = max(1, min(n, budget_bytes // (8 * v * 2)))
    for s in range(0, n, step):
        hc = h[s:s + step].to(_F64)
        yc, vc = y[s:s + step], valid[s:s + step]
        z = hc @ w64.t()
        lse_c = torch.logsumexp(z, 1)
        lse[s:s + step] = lse_c
        safe = torch.where(vc, yc, 0)
        total += torch.where(vc, lse_c - z.gather(1, safe[:, None]).squeeze(1), 0).sum()
        del z
        # dW rows: (softmax - onehot) restricted to the chosen vocab rows, from this chunk's exact lse
        g = torch.exp(hc @ w_sub.t() - lse_c[:, None])
        hit = (safe[:, None] == vrows[None, :]) & vc[:, None]
        g = (g - hit.to(_F64)) * (vc.to(_F64) / n_valid)[:, None]
        dw += g.t() @ hc
    ht = h.index_select(0, trows).to(_F64)
    zt = ht @ w64.t()
    yt, vt = y.index_select(0, trows), valid.index_select(0, trows)
    g = torch.exp(zt - lse.index_select(0, trows)[:, None])
    g[torch.arange(g.shape[0], device=dev), torch.where(vt, yt, 0)] -= 1.0
    g *= (vt.to(_F64) / n_valid)[:, None]
    dh = g @ w64
    return Reference(float(total / n_valid), dh, dw, dh_rows=trows, dw_rows=vrows)


def compare(ref: Reference, loss: float | None, dh: torch.Tensor | None, dw: torch.Tensor | None) -> dict:
    return {
        "loss_rel_err": None if loss is None else abs(loss - ref.loss) / max(abs(ref.loss), 1e-30),
        "dh_rel_err": _max_rel_err(dh, ref.dh, ref.dh_rows),
        "dw_rel_err": _max_rel_err(dw, ref.dw, ref.dw_rows),
    }


def _max_rel_err(got: torch.Tensor | None, ref: torch.Tensor | None, rows: torch.Tensor | None) -> float | None:
    """max|got - ref| / max|ref| over `rows` of got (None when either is missing)."""
    if got is None or ref is None:
        return None
    return rel_err(got, ref, norm="max", rows=rows)
