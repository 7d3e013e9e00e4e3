"""Writing what the bench measured: results.json (every record), results.md (tables), results.png (plot).
Tables and plots are pandas frames of the records: `DataFrame.to_markdown` (tabulate) and `DataFrame.plot`."""
from __future__ import annotations

import json
import os

import pandas as pd
import torch

SCHEMA = "hf_fusedce.bench/1"
JSON_NAME, MD_NAME, PNG_NAME = "results.json", "results.md", "results.png"
_MiB = 2**20
# The op's memory figure, the same on the console, in the PNG and in the table: the head's own working memory
# (peak above the inputs and the gradients every implementation must return).
MEMORY_KEY, MEMORY_LABEL = "peak_above_grads_bytes", "peak memory above inputs + gradients"
GROUP = ["dtype", "shape", "D", "V"]  # one table and one row of plots per shape and precision


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
        written = [os.path.join(self.out_dir, JSON_NAME), write_markdown(self.doc, self.out_dir),
                   write_plot(self.doc, self.out_dir), write_headline(self.doc, self.out_dir)]
        return [path for path in written if path]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def annotate(records: list[dict]):
    """Adds x_floor (time / floor time at the same dtype, shape, N) and TFLOP/s counted as 6*N*D*V."""
    floors = {}  # the fastest 3-GEMM floor measured at (dtype, shape, N): "floor" or "floor-blocked"
    for r in records:
        if r.get("record") == "op" and r.get("kind", r.get("impl")) == "floor" and r.get("status") == "ok":
            key = (r["dtype"], r["shape"], r["N"])
            floors[key] = min(floors.get(key, float("inf")), r["fwd_bwd_ms"])
    for r in records:
        if r.get("record") != "op" or r.get("status") != "ok":
            continue
        r["tflops_6ndv"] = 6.0 * r["N"] * r["D"] * r["V"] / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        f = floors.get((r["dtype"], r["shape"], r["N"]))
        r["x_3gemm"] = r["fwd_bwd_ms"] / f if f else None
        rate = r.get("gemm_tflops")  # 6*N*D*V at the GEMM rate measured in the same run: the true floor
        r["x_floor"] = r["tflops_6ndv"] and rate / r["tflops_6ndv"] if rate else None


def frame(doc: dict, kind: str, ok_only: bool = False) -> pd.DataFrame:
    """The records of one kind ("op", "e2e", "verify") as a frame, in the order they were measured."""
    return pd.DataFrame.from_records([r for r in doc["records"] if r.get("record") == kind
                                      and (not ok_only or r.get("status") == "ok")])


ERR = ".1e"


def mib(x) -> str:
    """Bytes as MiB, one decimal."""
    return f"{x / _MiB:,.1f}"


def _baseline(b: dict) -> str:
    return " / ".join(_cell(b.get(k), ERR) for k in ("loss_rel_err", "dh_rel_err", "dw_rel_err"))


# A table is (header, record key, format): a format spec or function right-aligns the column; None writes the
# value as text, left-aligned. A missing value is a blank cell.
OP_COLUMNS = [
    ("N", "N", ".0f"), ("impl", "impl", None), ("fwd+bwd ms", "fwd_bwd_ms", ".2f"), ("x floor", "x_floor", ".2f"),
    ("x 3-GEMM", "x_3gemm", ".2f"), ("TFLOP/s", "tflops_6ndv", ".3g"), ("peak above inputs MiB", "peak_mem_bytes", mib),
    (f"{MEMORY_LABEL} MiB", MEMORY_KEY, mib), ("loss err", "loss_rel_err", ERR), ("dh err", "dh_rel_err", ERR),
    ("dW err", "dw_rel_err", ERR), ("status", "status", None)]
E2E_COLUMNS = [
    ("model", "model", None), ("variant", "variant", None), ("dtype", "dtype", None), ("seq", "seq", ".0f"),
    ("grad ckpt", "gradient_checkpointing", None), ("step ms", "step_ms", ".1f"), ("tokens/s", "tokens_per_s", ",.0f"),
    ("peak MiB", "peak_mem_bytes", mib), ("step peak above state MiB", "peak_above_state_bytes", mib),
    ("fwd+bwd peak above state MiB", "peak_fwd_bwd_above_state_bytes", mib),
    ("longest seq that fits", "max_seq_note", None), ("status", "status", None)]
VERIFY_COLUMNS = [
    ("impl", "impl", None), ("dtype", "dtype", None), ("N", "N", ".0f"), ("D", "D", ".0f"), ("V", "V", ".0f"),
    ("N*V", "N*V", ",.0f"), ("loss err", "loss_rel_err", ERR), ("dh err (rows)", "dh_rel_err", ERR),
    ("dW err (vocab rows)", "dw_rel_err", ERR), ("stock-like baseline loss / dh / dW", "baseline", _baseline),
    ("pass", "pass", None), ("status", "status", None)]


def _cell(value, fmt) -> str:
    if pd.isna(value):  # absent from the record (NaN in the frame) or None
        return ""
    return str(value) if fmt is None else fmt(value) if callable(fmt) else format(value, fmt)


def markdown_table(rows: pd.DataFrame, columns) -> str:
    rows = rows.reindex(columns=[key for _, key, _ in columns])
    cells = pd.DataFrame({head: rows[key].map(lambda v, f=fmt: _cell(v, f)) for head, key, fmt in columns})
    return cells.to_markdown(index=False, disable_numparse=True,
                             colalign=["left" if fmt is None else "right" for _, _, fmt in columns])


def _rates_and_model(rs: pd.DataFrame, d: int, v: int) -> str:
    """The measured GEMM rate per N, and the roofline model's bf16 H100 / A100 time of ours at each N."""
    from hf_fusedce.ops.planning import cost_model

    rates = rs.reindex(columns=["N", "gemm_tflops"]).groupby("N")["gemm_tflops"].first()  # first measured
    out = []
    for n, rate in rates.items():
        n = int(n)
        if rate > 0:
            out.append(f"- N={n}: the N x D x V GEMM (best of row blocks 256, 1024, all) measured at {rate:.3g} TFLOP/s "
                       f"in this run; floor 6*N*D*V at that rate = {6 * n * d * v / rate / 1e9:.1f} ms")
        est = {g.name: cost_model.estimate(n, d, v, torch.bfloat16, cost_model.choose_budget(
            n, d, v, torch.bfloat16, g), g) for g in (cost_model.H100, cost_model.A100)}
        out.append(f"- N={n}, model estimate (bf16, default budget, never run): " + "; ".join(
            f"{k} {e.seconds * 1e3:.1f} ms = {e.x_floor:.2f}x its floor, overhead {e.overhead_bytes / _MiB:,.0f} MiB"
            for k, e in est.items()))
    return "\n".join(out)


def write_headline(doc: dict, out_dir: str) -> str | None:
    """headline.md: the README's "Measured" table from these records (None when no op ran)."""
    from .headline import NAME, render

    if not any(r.get("record") == "op" and r.get("status") == "ok" for r in doc["records"]):
        return None
    path = os.path.join(out_dir, NAME)
    with open(path, "w") as f:
        f.write(render(doc))
    return path


def write_markdown(doc: dict, out_dir: str) -> str:
    env = doc.get("environment", {})
    blocks = [
        "# hf-fusedce bench",
        f"- device: {env.get('device')}  \n- date: {env.get('date')}  \n"
        f"- torch {env.get('torch')}, cuda {env.get('cuda')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, liger-kernel {env.get('liger_kernel')}, "
        f"cut-cross-entropy {env.get('cut_cross_entropy')}"
        + (f", native CPU softcap rows: {env['cpu_native_softcap_rows']}" if env.get("cpu_native_softcap_rows") else "")
        + "  \n"
        f"- command: `{' '.join(doc.get('command', []))}`",
        "Time: forward+backward, median of the repeats (CUDA events on GPU, perf_counter on CPU). "
        "x floor: time over 6*N*D*V FLOPs at the best rate of the N x D x V GEMM (timed in row blocks of 256, "
        "1024 and in one piece) measured in the same run (the floor "
        "of any exact head); x 3-GEMM: time over the three bare, unchunked GEMMs' time. TFLOP/s counts 6*N*D*V. "
        "Roofline lines are a model (hf_fusedce/ops/planning/cost_model.py), never run on a GPU. "
        f"Memory: peak allocated above the inputs (hidden, weight, targets); '{MEMORY_LABEL}' subtracts the "
        "hidden and weight gradients every implementation returns. Errors: max|x - ref| / max|ref| against a "
        "float64 chunked reference on the same inputs (blank where not computed)."]
    ops = frame(doc, "op")
    for (dtype, shape, d, v), rs in (ops.groupby(GROUP, sort=False) if len(ops) else ()):
        skipped = rs["status"].astype(str).str.startswith("skipped")
        blocks += [f"## {shape} (D={d}, V={v}), {dtype}", markdown_table(rs[~skipped], OP_COLUMNS),
                   _rates_and_model(rs, int(d), int(v))]
        if skipped.any():
            first = rs[skipped].drop_duplicates("impl")
            blocks.append("Not measured: " + "; ".join(f"{i} ({s})" for i, s in zip(first["impl"], first["status"])))
    e2e = frame(doc, "e2e")
    if len(e2e):
        notes = ["state = weights + AdamW state, resident between steps; 'step peak' includes the optimizer "
                 "update, 'fwd+bwd peak' stops before it. Longest seq: doubling then bisection, batch 1.",
                 *sorted(e2e.reindex(columns=["memory_note"])["memory_note"].dropna().unique())]
        blocks += ["## End to end: one training step", markdown_table(e2e, E2E_COLUMNS),
                   "\n".join(f"- {n}" for n in notes)]
    ver = frame(doc, "verify")
    if len(ver):
        blocks += ["## Correctness at large shapes vs float64",
                   markdown_table(ver.assign(**{"N*V": ver["N"] * ver["V"]}), VERIFY_COLUMNS),
                   _cell(ver.reindex(columns=["method"])["method"].iloc[0], None)]
    path = os.path.join(out_dir, MD_NAME)
    with open(path, "w") as f:
        f.write("\n\n".join(b for b in blocks if b) + "\n")
    return path


_STYLE = {"floor": ("black", "--"), "stock": ("tab:red", "-"), "torch-lce": ("tab:purple", "-"),
          "trl-chunked": ("tab:brown", "-"), "liger": ("tab:orange", "-"), "liger-fp32acc": ("tab:orange", ":"),
          "cce": ("tab:green", ":"), "cce-exact": ("tab:green", "-"), "ours-torch": ("tab:blue", ":"),
          "ours-triton": ("tab:blue", "-")}
_FONTS = {"axes.titlesize": 9, "legend.fontsize": 7, "figure.titlesize": 10}


def _minor_label(y, _pos) -> str:
    """Label the 2x and 5x minor ticks of a log axis, so spans under a decade still read."""
    return f"{y:g}" if y > 0 and f"{y:.0e}"[0] in "25" else ""


def _plot_lines(ax, rs: pd.DataFrame, values: pd.Series, title: str, ylabel: str, legend: bool):
    """One line per implementation (in measured order) against N, on log-log axes."""
    from matplotlib.ticker import FuncFormatter

    table = rs.assign(y=values).pivot_table(index="N", columns="impl", values="y", aggfunc="first")  # a repeat: 1st
    table = table.reindex(columns=list(rs["impl"].unique())).rename_axis(columns=None)  # measured order, no title
    table.plot(ax=ax, marker="o", legend=legend, logy=True, title=title, xlabel="N tokens", ylabel=ylabel,
               style={i: _STYLE.get(i, ("tab:gray", "-"))[1] for i in table},
               color={i: _STYLE.get(i, ("tab:gray", "-"))[0] for i in table})
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))


def _plot_e2e(axes, e2e: pd.DataFrame):
    """Bars per (variant, dtype): tokens/s, and peak memory (total and above the resident state)."""
    ax_s, ax_m = axes
    e2e = e2e.set_index(e2e["variant"] + "\n" + e2e["dtype"])
    bars = {"color": ["tab:red" if v == "stock" else "tab:blue" for v in e2e["variant"]], "width": 0.8, "rot": 0}
    e2e["tokens_per_s"].plot.bar(ax=ax_s, ylabel="tokens/s", **bars,
                                 title=f"end to end: {e2e['model'].iloc[0]}, seq {e2e['seq'].iloc[0]}")
    total = e2e["peak_mem_bytes"] / _MiB
    total.plot.bar(ax=ax_m, alpha=0.35, label="peak (total)", **bars)
    (e2e["peak_above_state_bytes"] / _MiB).plot.bar(ax=ax_m, ylabel="MiB", label="peak above weights+optimizer state",
                                                     title="end to end: peak memory of one training step", **bars)
    notes = e2e.reindex(columns=["max_seq_note"])["max_seq_note"]
    ax_m.bar_label(ax_m.containers[0], [f"longest seq {n}" if isinstance(n, str) else "" for n in notes], fontsize=7)
    ax_m.set_ylim(0, total.max() * 1.25)
    ax_m.legend(loc="upper right")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)


def figure(doc: dict):
    """Per shape and precision: time and MEMORY_LABEL against N; then the end-to-end bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = doc.get("environment", {})
    ops, e2e = frame(doc, "op", ok_only=True), frame(doc, "e2e", ok_only=True)
    groups = list(ops.groupby(GROUP, sort=False)) if len(ops) else []
    rows = max(1, len(groups) + (1 if len(e2e) else 0))
    with matplotlib.rc_context(_FONTS):
        fig, axes = plt.subplots(rows, 2, figsize=(12, 3.4 * rows), squeeze=False)
        for ((dtype, shape, d, v), rs), (ax_t, ax_m) in zip(groups, axes):
            name, mem = f"{shape} D={d} V={v} {dtype}", rs[rs["impl"] != "floor"]
            _plot_lines(ax_t, rs, rs["fwd_bwd_ms"], f"{name}: fwd+bwd time", "ms (median)", legend=True)
            _plot_lines(ax_m, mem, mem[MEMORY_KEY].clip(lower=0) / _MiB + 1e-3, f"{name}: {MEMORY_LABEL}", "MiB",
                        legend=False)
        if len(e2e):
            _plot_e2e(axes[len(groups)], e2e)
        elif not groups:
            for ax in axes[0]:
                ax.text(0.5, 0.5, "no successful op or e2e measurement (see results.md)", ha="center")
                ax.set_axis_off()
        fig.suptitle(f"hf-fusedce bench — {env.get('device')} — {env.get('date')} — torch {env.get('torch')}")
        fig.tight_layout()
    return fig


def write_plot(doc: dict, out_dir: str) -> str:
    import matplotlib.pyplot as plt

    fig, path = figure(doc), os.path.join(out_dir, PNG_NAME)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
