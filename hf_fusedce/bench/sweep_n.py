"""`hf-fusedce bench sweep-n`: time over the 3-GEMM floor and memory against the token count N, ours and peers.

Two regimes, both written to one results.json / sweep.md / sweep.png:

- up to `full_d_max_n` tokens every head runs at its real (D, V), each cell through the real-heads runner
  (bench/real_heads.run_cells: one memory round, then interleaved timed rounds, the floor timed in the same rounds);
  peers (stock, torch.compile of the stock loss, torch's linear_cross_entropy, TRL's chunked head) run up to
  `peer_max_n` tokens or until their N x V tensors no longer fit the RAM available;
- above it the head keeps its vocabulary and its hidden size is cut to `reduced_d` (stated in every record), so the
  largest N stays within the run's time: ours runs once, cold, inside the memory tracker; the floor is the three
  GEMMs timed on `floor_rows` rows and scaled by N / floor_rows (the blocked GEMMs are linear in N); and since no
  float64 reference of the whole call fits, `row_samples` sampled rows are checked against float64: each row's loss
  (reduction "none") and its hidden-state gradient (exact per row: dh_t = W^T (p_t - onehot_t) / N).
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from hf_fusedce.memory import measure_peak, reset_rss_peak, rss_bytes, rss_peak_bytes

from .impls import IMPLS
from .real_heads import run_cells
from .runner import _impl_fields, _step, environment, free_memory, log, make_inputs, record_peak_and_loss, sync
from .shapes import DTYPE_MODES, REAL_HEADS, Shape

SWEEP_HEADS = ("qwen2.5-0.5b", "llama3.2-1b")
SWEEP_NS = (512, 1024, 2048, 4096, 16384, 65536, 262144, 1048576)
SWEEP_IMPLS = ("ours-torch", "floor-blocked", "floor", "stock", "stock-compiled", "torch-lce", "trl-chunked")
FULL_D_MAX_N = 16384
PEER_MAX_N = 16384
REDUCED_D = 64
FLOOR_ROWS = 65536
ROW_SAMPLES = 64


@dataclasses.dataclass
class SweepConfig:
    heads: tuple[str, ...] = SWEEP_HEADS
    ns: tuple[int, ...] = SWEEP_NS
    impls: tuple[str, ...] = SWEEP_IMPLS
    dtype: str = "fp32"
    full_d_max_n: int = FULL_D_MAX_N
    peer_max_n: int = PEER_MAX_N
    reduced_d: int = REDUCED_D
    floor_rows: int = FLOOR_ROWS
    row_samples: int = ROW_SAMPLES
    rounds: int = 2


def cells(cfg: SweepConfig) -> list[tuple[str, Shape, int]]:
    """(dtype key, shape, N) in run order: per head, N ascending; the hidden size cut above full_d_max_n."""
    out = []
    for name in cfg.heads:
        head = REAL_HEADS[name]
        for n in sorted(cfg.ns):
            shape = head if n <= cfg.full_d_max_n else reduced(head, cfg.reduced_d)
            out.append((cfg.dtype, shape, n))
    return out


def reduced(head: Shape, d: int) -> Shape:
    return dataclasses.replace(head, name=f"{head.name}@d{d}", d=d)


def impls_for(cfg: SweepConfig, n: int) -> list:
    """ours and the floors at every N; the peers up to peer_max_n."""
    return [IMPLS[name] for name in cfg.impls
            if IMPLS[name].kind in ("ours", "floor") or n <= cfg.peer_max_n]


def run(cfg: SweepConfig, device: torch.device, bench_cfg, sink) -> None:
    for dt_key, shape, n in cells(cfg):
        if n <= cfg.full_d_max_n:
            run_cells([(dt_key, shape, n)], impls_for(cfg, n), device, bench_cfg, sink, rounds=cfg.rounds,
                      explicit=True, ref_max_n=1024)
            continue
        base = {"full_d": REAL_HEADS[shape.name.split("@")[0]].d,
                "regime": f"hidden size cut to {shape.d} (from the head's "
                          f"{REAL_HEADS[shape.name.split('@')[0]].d}) to keep the largest N within the run's time"}
        if bench_cfg.out_of_time():
            for name in ("ours-torch", "floor-blocked"):
                sink({**environment(device), **base, "record": "op", "shape": shape.name, "N": n, "D": shape.d,
                      "V": shape.v, "dtype": DTYPE_MODES[dt_key].name, **_impl_fields(IMPLS[name], device),
                      "status": "skipped: time budget (--time-budget) spent"})
            continue
        for rec in large_n_cell(shape, n, DTYPE_MODES[dt_key], device, cfg, bench_cfg.seed):
            sink({**rec, **base})


def large_n_cell(shape: Shape, n: int, mode, device, cfg: SweepConfig, seed: int) -> list[dict]:
    """Ours once (memory, time, sampled rows vs float64) and the floor scaled from a slice, at one large N."""
    env = environment(device)
    base = {**env, "record": "op", "shape": shape.name, "N": n, "D": shape.d, "V": shape.v, "dtype": mode.name,
            "logits_bytes_bf16": n * shape.v * 2}
    log(f"[sweep] {mode.name} {shape.name} N={n} D={shape.d} V={shape.v}")
    h, w, y = make_inputs(shape, n, mode, device, seed)
    ours = IMPLS["ours-torch"]
    fn = ours.resolve(device, explicit=True)
    rec = {**base, **_impl_fields(ours, device), "status": "ok"}
    reset_rss_peak()
    rss0 = rss_bytes()
    sync(device)
    t0 = time.perf_counter()
    with measure_peak(device) as reading:
        loss = _step(fn, h, w, y, mode, device)
    sync(device)
    rec.update(fwd_bwd_ms=(time.perf_counter() - t0) * 1e3, repeats=1, warmup=0,
               timing="one cold call inside the memory tracker")
    record_peak_and_loss(rec, reading, loss, ours, h, w, None)
    peak_rss = rss_peak_bytes()
    if peak_rss is not None:
        rec["peak_rss_above_start_bytes"] = peak_rss - rss0  # start: inputs built, before the call
    rec.update(sampled_rows(h, w, y, h.grad, cfg.row_samples, seed))
    h.grad = w.grad = None
    del loss
    free_memory(device)
    log(f"[sweep]   ours-torch {rec['fwd_bwd_ms'] / 1e3:.1f} s, tracker peak above inputs + grads "
        f"{rec['peak_above_grads_bytes'] / 2**20:.0f} MiB, rows vs float64: loss {rec['rows_loss_max_abs_err']:.1e}, "
        f"dh {rec['rows_dh_max_rel_err']:.1e}")
    floor = floor_from_slice(h, w, mode, device, min(cfg.floor_rows, n))
    floor_rec = {**base, **_impl_fields(IMPLS["floor-blocked"], device), "status": "ok",
                 "fwd_bwd_ms": floor * n / min(cfg.floor_rows, n), "repeats": 1, "warmup": 1,
                 "timing": f"the three GEMMs in 1024-row blocks timed on {min(cfg.floor_rows, n)} rows, "
                           f"scaled by N / {min(cfg.floor_rows, n)}"}
    del h, w, y
    free_memory(device)
    return [rec, floor_rec]


def floor_from_slice(h, w, mode, device, rows: int) -> float:
    """ms of the blocked three GEMMs on the first `rows` rows (after one warm-up call)."""
    fn = IMPLS["floor-blocked"].resolve(device, explicit=True)
    hs = h.detach()[:rows].clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    _step(fn, hs, ws, None, mode, device)
    sync(device)
    t0 = time.perf_counter()
    _step(fn, hs, ws, None, mode, device)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def sampled_rows(h, w, y, dh, samples: int, seed: int) -> dict:
    """Errors of `samples` random rows against float64: per-row loss of a reduction="none" forward of ours, and
    the rows of dh from the mean-reduced backward that produced `dh` (all targets valid: the mean is over N)."""
    from hf_fusedce.ops import fused_linear_cross_entropy

    n = h.shape[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    with torch.no_grad():
        per_row = fused_linear_cross_entropy(h.detach(), w.detach(), y, reduction="none", backend="torch")[rows]
        h64, w64 = h.detach()[rows].double(), w.detach().double()
        logits = h64 @ w64.t()
        ref_loss = torch.logsumexp(logits, -1) - logits.gather(1, y[rows, None]).squeeze(1)
        g = torch.softmax(logits, -1)
        g[torch.arange(len(rows)), y[rows]] -= 1
        ref_dh = g @ w64 / n
    dh_rows = dh[rows].double()
    return {"rows_checked": len(rows), "rows_reference": "float64, the sampled rows' logits in full",
            "rows_loss_max_abs_err": float((per_row.double() - ref_loss).abs().max()),
            "rows_dh_max_rel_err": float((dh_rows - ref_dh).norm(dim=1).div(ref_dh.norm(dim=1)).max())}


# ---------------------------------------------------------------- the report: one table, one chart
SWEEP_MD, SWEEP_PNG = "sweep.md", "sweep.png"
PLOT_IMPLS = ("ours-torch", "stock", "stock-compiled", "torch-lce", "trl-chunked")


def head_of(shape_name: str) -> str:
    return shape_name.split("@")[0]


def write_report(doc: dict, out: str) -> list[str]:
    from .report import annotate

    annotate(doc["records"])
    ok = [r for r in doc["records"] if r.get("record") == "op" and r.get("status") == "ok"]
    md, png = os.path.join(out, SWEEP_MD), os.path.join(out, SWEEP_PNG)
    with open(md, "w") as f:
        f.write(markdown(doc, ok))
    plot(ok, png)
    return [md, png]


def markdown(doc: dict, ok: list[dict]) -> str:
    env = doc["environment"]
    lines = ["# Time over the 3-GEMM floor and memory vs N", "",
             f"`{' '.join(doc['command'])}` on {env['device']}, torch {env['torch']}, {env['date']}. Time: x the "
             "three GEMMs alone timed in the same run (best of the blocked and unblocked floors); memory: peak of "
             "live tensors above the inputs and the gradients every implementation returns. Rows where the hidden "
             "size was cut say so; there the floor is scaled from a slice and ours ran once, cold.", ""]
    for head in dict.fromkeys(head_of(r["shape"]) for r in ok):
        lines += [f"## {head}", "", "| N | D | impl | fwd+bwd s | x 3-GEMM | memory above inputs + grads MiB | "
                  "first call s | rows vs float64 (loss abs / dh rel) |", "|---:|---:|---|---:|---:|---:|---:|---|"]
        for r in sorted((r for r in ok if head_of(r["shape"]) == head and r["kind"] != "floor"),
                        key=lambda r: (r["N"], r["impl"])):
            rows = (f"{r['rows_loss_max_abs_err']:.1e} / {r['rows_dh_max_rel_err']:.1e}"
                    if "rows_loss_max_abs_err" in r else "")
            first = f"{r['first_call_ms'] / 1e3:.1f}" if r.get("first_call_ms") else ""
            x = f"{r['x_3gemm']:.2f}" if r.get("x_3gemm") else ""
            lines.append(f"| {r['N']} | {r['D']} | {r['impl']} | {r['fwd_bwd_ms'] / 1e3:.2f} | {x} | "
                         f"{r['peak_above_grads_bytes'] / 2**20:,.0f} | {first} | {rows} |")
        skipped = sorted({(r["N"], r["impl"], r["status"]) for r in doc["records"]
                          if head_of(r.get("shape", "")) == head and r.get("status") != "ok"})
        if skipped:
            lines += ["", "Not measured: " + "; ".join(f"{impl} at N={n} ({status})" for n, impl, status in skipped)]
        lines.append("")
    return "\n".join(lines)


def plot(ok: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(dict.fromkeys(head_of(r["shape"]) for r in ok))
    fig, axes = plt.subplots(2, len(heads), figsize=(6 * len(heads), 7), squeeze=False, sharex=True)
    for col, head in enumerate(heads):
        for impl in PLOT_IMPLS:
            rs = sorted((r for r in ok if head_of(r["shape"]) == head and r["impl"] == impl), key=lambda r: r["N"])
            if not rs:
                continue
            ns = [r["N"] for r in rs]
            axes[0][col].plot(ns, [r.get("x_3gemm") for r in rs], marker="o", label=impl)
            axes[1][col].plot(ns, [max(r["peak_above_grads_bytes"], 1) / 2**20 for r in rs], marker="o", label=impl)
        full_d = next((r["D"] for r in ok if r["shape"] == head), None)
        axes[0][col].set_title(f"{head} (D={full_d}; D cut where marked in sweep.md), fp32")
        axes[0][col].set_ylabel("time / 3-GEMM floor")
        axes[0][col].set_yscale("log")  # peers run up to ~20x the floor; ours sits near 1
        axes[0][col].axhline(1.0, color="grey", lw=0.8)
        axes[1][col].set_ylabel("MiB above inputs + gradients")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("tokens N")
        for row in axes:
            row[col].set_xscale("log", base=2)
            row[col].grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the command (`hf-fusedce bench sweep-n`)
DEFAULT_OUT = os.path.join("model_cards", "benchmarks", "cpu", "sweep-n")


def add_arguments(p) -> None:
    p.add_argument("--heads", default=",".join(SWEEP_HEADS), help="comma list of real heads: " + ", ".join(REAL_HEADS))
    p.add_argument("--n", default=",".join(map(str, SWEEP_NS)), help="comma list of token counts")
    p.add_argument("--impls", default=",".join(SWEEP_IMPLS), help="comma list of implementations")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or amp-bf16")
    p.add_argument("--full-d-max-n", type=int, default=FULL_D_MAX_N,
                   help="above this N the head's hidden size is cut to --reduced-d")
    p.add_argument("--reduced-d", type=int, default=REDUCED_D, help="hidden size above --full-d-max-n")
    p.add_argument("--peer-max-n", type=int, default=PEER_MAX_N, help="peers run up to this N")
    p.add_argument("--floor-rows", type=int, default=FLOOR_ROWS,
                   help="above --full-d-max-n, the rows the floor's GEMMs are timed on (then scaled to N)")
    p.add_argument("--row-samples", type=int, default=ROW_SAMPLES,
                   help="above --full-d-max-n, rows checked against float64")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after the memory/warm-up round")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="after this many seconds, record what is left as skipped and write the report")


def config_of(args) -> SweepConfig:
    """The sweep's configuration from its options; ValueError names an unknown head, implementation or dtype."""
    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    unknown = [h for h in split(args.heads) if h not in REAL_HEADS] + \
        [i for i in split(args.impls) if i not in IMPLS] + ([args.dtype] if args.dtype not in DTYPE_MODES else [])
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}")
    return SweepConfig(heads=split(args.heads), ns=tuple(int(n) for n in split(args.n)), impls=split(args.impls),
                       dtype=args.dtype, full_d_max_n=args.full_d_max_n, peer_max_n=args.peer_max_n,
                       reduced_d=args.reduced_d, floor_rows=args.floor_rows, row_samples=args.row_samples,
                       rounds=max(0, args.rounds))
