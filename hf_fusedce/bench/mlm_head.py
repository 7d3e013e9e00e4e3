"""The masked-LM loss head, patched vs stock: time and peak memory of loss + backward at a masking rate.

    python -m hf_fusedce.bench.mlm_head                      # XLM-R-shaped head: D=768, V=250002, 15% masked
    python -m hf_fusedce.bench.mlm_head --tokens 4096 --hidden 768 --vocab 50368 --out mlm_head.json  # ModernBERT

Stock is what BERT-style `*ForMaskedLM` do: logits for EVERY position (`decoder(h)` with its bias), then
`CrossEntropyLoss` over the ignored-or-not labels. Fused is the op the patched forward calls: ignored rows are
dropped before the GEMMs, logits are built chunk by chunk and never stored. Both: float32, the same hidden
states, weight, bias and labels (a random `mask_rate` of positions labelled, the rest -100); loss and gradients
compared (rel err), times interleaved (median of `reps`), peak = bytes of tensors alive during the step (CPU:
hf_fusedce.memory's tracker; CUDA: the allocator's peak).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ..memory import measure_peak
from ..ops import fused_linear_cross_entropy
from .shapes import Shape
from ..testing import rel_err


def _stock(h, w, b, labels):
    logits = F.linear(h, w, b)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1))


def _fused(h, w, b, labels):
    return fused_linear_cross_entropy(h, w, labels, bias=b)


def _step(fn, h, w, b, labels, device):
    for t in (h, w, b):
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with measure_peak(device) as peak:
        loss = fn(h, w, b, labels)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, peak.peak_bytes, loss.detach(), [t.grad.clone() for t in (h, w, b)]


def run(tokens: int, hidden: int, vocab: int, mask_rate: float, reps: int, device: str = "cpu",
        seed: int = 0) -> dict:
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.02).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels = labels.masked_fill(torch.rand(tokens, generator=g) >= mask_rate, -100).to(device)
    times = {"stock": [], "fused": []}
    peaks, results = {}, {}
    for _ in range(reps):  # interleaved: the machine's load affects both alike
        for name, fn in (("stock", _stock), ("fused", _fused)):
            seconds, peak, loss, grads = _step(fn, h, w, b, labels, device)
            times[name].append(seconds)
            peaks[name] = peak
            results[name] = (loss, grads)
    (ls, gs), (lf, gf) = results["stock"], results["fused"]
    stock_t, fused_t = statistics.median(times["stock"]), statistics.median(times["fused"])
    return {
        "shape": {"tokens": tokens, "hidden": hidden, "vocab": vocab, "mask_rate": mask_rate,
                  "labelled": int((labels != -100).sum())},
        "device": str(device), "dtype": "float32", "reps": reps, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "stock": {"seconds": stock_t, "peak_mib": peaks["stock"] / 2**20},
        "fused": {"seconds": fused_t, "peak_mib": peaks["fused"] / 2**20},
        "speedup": stock_t / fused_t, "memory_ratio": peaks["stock"] / max(peaks["fused"], 1),
        "rel_err": {"loss": rel_err(lf, ls), "d_hidden": rel_err(gf[0], gs[0]), "d_weight": rel_err(gf[1], gs[1]),
                    "d_bias": rel_err(gf[2], gs[2])},
    }


_XLMR = Shape("xlmr", 768, 250002)  # XLM-R's head: the default of `hf-fusedce bench mlm`


def run_bench(args, device, shapes, ns, command) -> int:
    """`hf-fusedce bench mlm [--shapes DxV,...] [--n N,...] [--repeats R] [--out DIR]`: every shape x N at
    15% masking, written to DIR/mlm_head.json and DIR/mlm_head.md."""
    import pandas as pd
    out = args.out or os.path.join("hf_fusedce_bench", "mlm")
    os.makedirs(out, exist_ok=True)
    runs = [run(n, shape.d, shape.v, 0.15, args.repeats or 3, str(device), seed=args.seed)
            for shape in (shapes or [_XLMR]) for n in (ns or [1024])]
    with open(os.path.join(out, "mlm_head.json"), "w") as f:
        json.dump({"command": command, "results": runs}, f, indent=1)
    rows = [{"D": r["shape"]["hidden"], "V": r["shape"]["vocab"], "positions": r["shape"]["tokens"],
             "labelled": r["shape"]["labelled"], "stock s": round(r["stock"]["seconds"], 2),
             "fused s": round(r["fused"]["seconds"], 2), "stock MiB": round(r["stock"]["peak_mib"], 1),
             "fused MiB": round(r["fused"]["peak_mib"], 1), "speedup": round(r["speedup"], 2),
             "memory ratio": round(r["memory_ratio"], 2), "max rel err": max(r["rel_err"].values())} for r in runs]
    with open(os.path.join(out, "mlm_head.md"), "w") as f:
        f.write(f"`{' '.join(command)}` ({runs[0]['device']}, torch {runs[0]['torch']}, "
                f"{runs[0]['threads']} threads)\n\n{pd.DataFrame(rows).to_markdown(index=False)}\n")
    print(f"wrote {out}/mlm_head.json and mlm_head.md")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hf_fusedce.bench.mlm_head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="positions in the batch (batch x sequence)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=250002, help="XLM-R's vocabulary by default")
    p.add_argument("--mask-rate", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    res = run(args.tokens, args.hidden, args.vocab, args.mask_rate, args.reps, args.device)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
