"""Writing what the bench measured: results.json (every record), results.md (tables), results.png (plot)."""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch

SCHEMA = "hf_fusedce.bench/1"
JSON_NAME, MD_NAME, PNG_NAME = "results.json", "results.md", "results.png"
_MiB = 2**20
# The op's memory figure, the same on the console, in the PNG and in the table: the head's own working memory
# (peak above the inputs and the gradients every implementation must return).
MEMORY_KEY, MEMORY_LABEL = "peak_above_grads_bytes", "peak memory above inputs + gradients"


class ResultSink:
    """Collects records and rewrites results.json after each one, so an interrupted run keeps its numbers."""

    def __init__(self, out_dir: str, command: list[str], environment: dict):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.doc = {"schema": SCHEMA, "command": command, "environment": environment, "records": []}

    def __call__(self, record: dict):
        self.doc["records"].append(record)
        self.write_json()

    @property
    def records(self) -> list[dict]:
        return self.doc["records"]

    def write_json(self):
        annotate(self.records)
        path = os.path.join(self.out_dir, JSON_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, path)

    def finish(self) -> list[str]:
        self.write_json()
        return [os.path.join(self.out_dir, JSON_NAME), write_markdown(self.doc, self.out_dir),
                write_plot(self.doc, self.out_dir)]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def annotate(records: list[dict]):
    """Adds x_floor (time / floor time at the same dtype, shape, N) and TFLOP/s counted as 6*N*D*V."""
    floors = {(r["dtype"], r["shape"], r["N"]): r["fwd_bwd_ms"] for r in records
              if r.get("record") == "op" and r.get("impl") == "floor" and r.get("status") == "ok"}
    for r in records:
        if r.get("record") != "op" or r.get("status") != "ok":
            continue
        r["tflops_6ndv"] = 6.0 * r["N"] * r["D"] * r["V"] / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        f = floors.get((r["dtype"], r["shape"], r["N"]))
        r["x_3gemm"] = r["fwd_bwd_ms"] / f if f else None
        rate = r.get("gemm_tflops")  # 6*N*D*V at the GEMM rate measured in the same run: the true floor
        r["x_floor"] = r["tflops_6ndv"] and rate / r["tflops_6ndv"] if rate else None


def _mib(x):
    return "" if x is None else f"{x / _MiB:,.1f}"


def _err(x):
    return "" if x is None else f"{x:.1e}"


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def _rates_and_model(rs, d, v) -> list[str]:
    """The measured GEMM rate per N, and the roofline model's bf16 H100 / A100 time of ours at each N."""
    from hf_fusedce.ops import cost_model

    out = []
    for n in sorted({r["N"] for r in rs}):
        rate = next((r.get("gemm_tflops") for r in rs if r["N"] == n and r.get("gemm_tflops")), None)
        if rate:
            out.append(f"- N={n}: the N x D x V GEMM (best of row blocks 256, 1024, all) measured at {rate:.3g} TFLOP/s "
                       f"in this run; floor "
                       f"6*N*D*V at that rate = {6 * n * d * v / rate / 1e9:.1f} ms")
        est = {g.name: cost_model.estimate(n, d, v, torch.bfloat16, cost_model.choose_budget(
            n, d, v, torch.bfloat16, g), g) for g in (cost_model.H100, cost_model.A100)}
        out.append(f"- N={n}, model estimate (bf16, default budget, never run): " + "; ".join(
            f"{k} {e.seconds * 1e3:.1f} ms = {e.x_floor:.2f}x its floor, overhead {e.overhead_bytes / _MiB:,.0f} MiB"
            for k, e in est.items()))
    return out + [""]


def write_markdown(doc: dict, out_dir: str) -> str:
    env = doc.get("environment", {})
    recs = doc["records"]
    lines = [
        "# hf-fusedce bench",
        "",
        f"- device: {env.get('device')}  ",
        f"- date: {env.get('date')}  ",
        f"- torch {env.get('torch')}, cuda {env.get('cuda')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, liger-kernel {env.get('liger_kernel')}, "
        f"cut-cross-entropy {env.get('cut_cross_entropy')}  ",
        f"- command: `{' '.join(doc.get('command', []))}`",
        "",
        "Time: forward+backward, median of the repeats (CUDA events on GPU, perf_counter on CPU). "
        "x floor: time over 6*N*D*V FLOPs at the best rate of the N x D x V GEMM (timed in row blocks of 256, "
        "1024 and in one piece) measured in the same run (the floor "
        "of any exact head); x 3-GEMM: time over the three bare, unchunked GEMMs' time. TFLOP/s counts 6*N*D*V. "
        "Roofline lines are a model (hf_fusedce/ops/cost_model.py), never run on a GPU. "
        "Memory: peak allocated above the inputs (hidden, weight, targets); 'above grads' subtracts the "
        "hidden and weight gradients every implementation returns. Errors: max|x - ref| / max|ref| against a "
        "float64 chunked reference on the same inputs (blank where not computed).",
        "",
    ]
    groups = defaultdict(list)
    for r in recs:
        if r.get("record") == "op":
            groups[(r["dtype"], r["shape"], r["D"], r["V"])].append(r)
    for (dtype, shape, d, v), rs in groups.items():
        lines += [f"## {shape} (D={d}, V={v}), {dtype}", "",
                  "| N | impl | fwd+bwd ms | x floor | x 3-GEMM | TFLOP/s | peak above inputs MiB "
                  "| above inputs+grads MiB | loss err | dh err | dW err | status |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        skipped = {}
        for r in rs:
            if str(r.get("status", "")).startswith("skipped"):
                skipped.setdefault(r["impl"], r["status"])
                continue
            lines.append(
                f"| {r['N']} | {r['impl']} | {_num(r.get('fwd_bwd_ms'), '.2f')} | {_num(r.get('x_floor'), '.2f')} "
                f"| {_num(r.get('x_3gemm'), '.2f')} | {_num(r.get('tflops_6ndv'), '.3g')} | {_mib(r.get('peak_mem_bytes'))} "
                f"| {_mib(r.get('peak_above_grads_bytes'))} | {_err(r.get('loss_rel_err'))} "
                f"| {_err(r.get('dh_rel_err'))} | {_err(r.get('dw_rel_err'))} | {r.get('status')} |")
        lines += [""] + _rates_and_model(rs, d, v)
        if skipped:
            lines += ["Not measured: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()), ""]
    e2e = [r for r in recs if r.get("record") == "e2e"]
    if e2e:
        lines += ["## End to end: one training step", "",
                  "| model | variant | dtype | seq | grad ckpt | step ms | tokens/s | peak MiB | step peak above state MiB "
                  "| fwd+bwd peak above state MiB | longest seq that fits | status |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for r in e2e:
            lines.append(
                f"| {r.get('model')} | {r.get('variant')} | {r.get('dtype')} | {r.get('seq')} "
                f"| {r.get('gradient_checkpointing')} | {_num(r.get('step_ms'), '.1f')} "
                f"| {_num(r.get('tokens_per_s'), ',.0f')} | {_mib(r.get('peak_mem_bytes'))} "
                f"| {_mib(r.get('peak_above_state_bytes'))} | {_mib(r.get('peak_fwd_bwd_above_state_bytes'))} "
                f"| {r.get('max_seq_note') or ''} | {r.get('status')} |")
        notes = ["state = weights + AdamW state, resident between steps; 'step peak' includes the optimizer "
                 "update, 'fwd+bwd peak' stops before it. Longest seq: doubling then bisection, batch 1."]
        notes += sorted({r.get("memory_note") for r in e2e if r.get("memory_note")})
        lines += [""] + [f"- {n}" for n in notes] + [""]
    ver = [r for r in recs if r.get("record") == "verify"]
    if ver:
        lines += ["## Correctness at large shapes vs float64", "",
                  "| impl | dtype | N | D | V | N*V | loss err | dh err (rows) | dW err (vocab rows) "
                  "| stock-like baseline loss / dh / dW | pass | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for r in ver:
            base = r.get("baseline") or {}
            lines.append(
                f"| {r['impl']} | {r['dtype']} | {r['N']} | {r['D']} | {r['V']} | {r['N'] * r['V']:,} "
                f"| {_err(r.get('loss_rel_err'))} | {_err(r.get('dh_rel_err'))} | {_err(r.get('dw_rel_err'))} "
                f"| {_err(base.get('loss_rel_err'))} / {_err(base.get('dh_rel_err'))} / "
                f"{_err(base.get('dw_rel_err'))} | {r.get('pass')} | {r.get('status')} |")
        lines += ["", ver[0].get("method", ""), ""]
    path = os.path.join(out_dir, MD_NAME)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


_STYLE = {"floor": ("black", "--"), "stock": ("tab:red", "-"), "torch-lce": ("tab:purple", "-"),
          "liger": ("tab:orange", "-"), "liger-fp32acc": ("tab:orange", ":"), "cce": ("tab:green", ":"),
          "cce-exact": ("tab:green", "-"), "ours-torch": ("tab:blue", ":"), "ours-triton": ("tab:blue", "-")}


def _minor_label(y, _pos) -> str:
    """Label the 2x and 5x minor ticks of a log axis, so spans under a decade still read."""
    if y <= 0:
        return ""
    lead = f"{y:.0e}"[0]
    return f"{y:g}" if lead in "25" else ""


def _plot_e2e(axes, recs):
    """Bars per (variant, dtype): tokens/s, and peak memory (total and above the resident state)."""
    ax_s, ax_m = axes
    labels = [f"{r['variant']}\n{r['dtype']}" for r in recs]
    colors = ["tab:red" if r["variant"] == "stock" else "tab:blue" for r in recs]
    x = range(len(recs))
    ax_s.bar(x, [r["tokens_per_s"] for r in recs], color=colors)
    ax_s.set_ylabel("tokens/s")
    ax_s.set_title(f"end to end: {recs[0]['model']}, seq {recs[0]['seq']}", fontsize=9)
    total = [r["peak_mem_bytes"] / _MiB for r in recs]
    above = [r["peak_above_state_bytes"] / _MiB for r in recs]
    ax_m.bar(x, total, color=colors, alpha=0.35, label="peak (total)")
    ax_m.bar(x, above, color=colors, label="peak above weights+optimizer state")
    for i, r in enumerate(recs):
        if r.get("max_seq_note"):
            ax_m.annotate(f"longest seq {r['max_seq_note']}", (i, total[i]), ha="center", va="bottom", fontsize=7)
    ax_m.set_ylabel("MiB")
    ax_m.set_title("end to end: peak memory of one training step", fontsize=9)
    ax_m.set_ylim(0, max(total) * 1.25)
    ax_m.legend(fontsize=7, loc="upper right")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)


def write_plot(doc: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    env = doc.get("environment", {})
    groups = defaultdict(list)
    for r in doc["records"]:
        if r.get("record") == "op" and r.get("status") == "ok":
            groups[(r["dtype"], r["shape"], r["D"], r["V"])].append(r)
    path = os.path.join(out_dir, PNG_NAME)
    e2e = [r for r in doc["records"] if r.get("record") == "e2e" and r.get("status") == "ok"]
    rows = len(groups) + (1 if e2e else 0)
    fig, axes = plt.subplots(max(1, rows), 2, figsize=(12, 3.4 * max(1, rows)), squeeze=False)
    if not rows:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no successful op or e2e measurement (see results.md)", ha="center")
            ax.set_axis_off()
    if e2e:
        _plot_e2e(axes[len(groups)], e2e)
    for row, ((dtype, shape, d, v), rs) in enumerate(groups.items()):
        ax_t, ax_m = axes[row]
        by_impl = defaultdict(list)
        for r in rs:
            by_impl[r["impl"]].append(r)
        for impl, pts in by_impl.items():
            pts.sort(key=lambda r: r["N"])
            color, ls = _STYLE.get(impl, (None, "-"))
            ns = [r["N"] for r in pts]
            ax_t.plot(ns, [r["fwd_bwd_ms"] for r in pts], ls, marker="o", color=color, label=impl)
            if impl != "floor":
                ax_m.plot(ns, [max(r[MEMORY_KEY], 0) / _MiB + 1e-3 for r in pts], ls, marker="o",
                          color=color, label=impl)
        for ax, title, ylabel in ((ax_t, "fwd+bwd time", "ms (median)"),
                                  (ax_m, MEMORY_LABEL, "MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape} D={d} V={v} {dtype}: {title}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_label))
        ax_t.legend(fontsize=7)
    fig.suptitle(f"hf-fusedce bench — {env.get('device')} — {env.get('date')} — torch {env.get('torch')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
