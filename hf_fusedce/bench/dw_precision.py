"""How much precision a bf16/fp16 weight gradient loses when it is accumulated over chunks in its own dtype.

One logits gradient g (N x V, from the op's own torch row function, in the weight's dtype) and one hidden h; dW =
g^T h computed four ways and compared with float64 on the same inputs by relative error:
  stock:   one GEMM over all N rows (fp32 accumulation inside, one rounding), what materialized logits give;
  native:  the chunk loop's accumulation in the weight's dtype (`dw_accumulation="native"`), c chunks;
  fp32:    the chunk loop's fp32 accumulator, cast once at the end (`dw_accumulation="fp32"`), c chunks; on CPU
           an fp32 GEMM of the upcast operands (no mixed-dtype GEMM here);
  fp32 (CUDA): each chunk's product kept in fp32, as CUDA's mixed-dtype addmm does (emulated by an fp32 GEMM of
           the same low-precision inputs; not run on a GPU).
The chunked CPU variants run the loop's own `_accumulate_dw` / `_finish`.

    python -m hf_fusedce.bench.dw_precision [--out DIR]   (writes results.json and results.md)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform

import torch

from hf_fusedce.ops.ce import autograd, torch_impl
from hf_fusedce.ops.ce.spec import LossSpec, RowInputs
from hf_fusedce.testing import rel_err

CHUNKS = (4, 8, 16, 21, 64)


def _gradient(n, d, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) / d**0.25).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.25).to(dtype)
    z = h @ w.t()
    ids = torch.randint(0, v, (n, 1), generator=g)
    rows = RowInputs(ids, torch.ones(n, 1), torch.ones(n), torch.full((n,), 1.0 / n))  # mean reduction
    torch_impl.ce_rows(z, rows, LossSpec(), compute_grad=True)
    return z, h


def _chunked(g, h, c, acc_dtype, out_dtype):
    dw = torch.empty(g.shape[1], h.shape[1], dtype=acc_dtype)
    bounds = torch.linspace(0, g.shape[0], c + 1).round().long().tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        autograd._accumulate_dw(dw, g[a:b], h[a:b], first=i == 0)
    return autograd._finish(dw, out_dtype, None)


def measure(n=8192, d=256, v=2048, dtype=torch.bfloat16, chunks=CHUNKS) -> dict:
    g, h = _gradient(n, d, v, dtype)
    exact = g.double().t() @ h.double()
    stock = rel_err(g.t() @ h, exact)
    rows = []
    for c in chunks:
        native = rel_err(_chunked(g, h, c, dtype, dtype), exact)
        fp32 = rel_err(_chunked(g, h, c, torch.float32, dtype), exact)
        fp32_cuda = rel_err(_chunked(g.float(), h.float(), c, torch.float32, dtype), exact)
        rows.append({"chunks": c, "native": native, "fp32": fp32, "fp32_cuda": fp32_cuda,
                     "native_over_stock": native / stock})
    return {"n": n, "d": d, "v": v, "dtype": str(dtype).removeprefix("torch."), "stock": stock, "rows": rows}


COLUMNS = [("dtype", "dtype", None), ("N x D x V", "shape", None), ("chunks", "chunks", "d"),
           ("stock (1 GEMM)", "stock", ".2e"), ("native", "native", ".2e"), ("fp32 acc (CPU)", "fp32", ".2e"),
           ("fp32 acc (CUDA, emulated)", "fp32_cuda", ".2e"), ("native / stock", "native_over_stock", ".2f")]


def to_markdown(results: list[dict], meta: dict) -> str:
    import pandas as pd

    from hf_fusedce.bench.report import markdown_table
    rows = pd.DataFrame([{"dtype": r["dtype"], "shape": f"{r['n']} x {r['d']} x {r['v']}", "stock": r["stock"], **row}
                         for r in results for row in r["rows"]])
    return (f"dW relative error vs float64 (same g and h), {meta['device']}, torch {meta['torch']}, {meta['date']}"
            f"\n\n{markdown_table(rows, COLUMNS)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="model_cards/benchmarks/cpu/dw-accumulation")
    args = parser.parse_args(argv)
    meta = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": os.getloadavg()[0]}
    results = [measure(dtype=torch.bfloat16), measure(dtype=torch.float16)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = to_markdown(results, meta)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
