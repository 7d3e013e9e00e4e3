"""The README's headline table ("Measured"), rendered from a bench results.json: the README's figures are this
function's output on the results file it links (tests/docs/test_figures.py compares them), and the bench writes
the same snippet beside its results (headline.md), ready to paste."""
from __future__ import annotations

import re

NAME = "headline.md"
_MiB = 2**20
# impl -> the row's first cell; ours gets its chunk budget from the record (see _ours_label)
LABELS = {
    "stock": "stock (logits, `.float()`, `F.cross_entropy`)",
    "stock-compiled": "`torch.compile` of the stock loss (inductor; compile time not counted)",
    "torch-lce": "`F.linear_cross_entropy(options=LinearCrossEntropyOptions())`",
    "floor": "the three GEMMs alone (floor)",
}
HEADER = ["| implementation | fwd+bwd | peak above inputs | above inputs + gradients |",
          "|---|---:|---:|---:|"]


def _ours_label(rec: dict) -> str:
    """The chunk budget as the record states it: a fixed number, or the CPU cost model's pick."""
    strategy = rec.get("strategy", "")
    fixed = re.search(r"chunk budget ([\d.]+) MiB", strategy)
    budget = f"{fixed.group(1)} MiB chunks" if fixed else (
        "chunk budget picked per shape by the CPU plan" if "CPU cost-model" in strategy else "chunk budget per shape")
    return f"**hf_fusedce** (`backend=\"{rec['impl'].split('-')[-1]}\"`, {budget})"


def _row(rec: dict, stock: dict | None) -> str:
    peak, above = rec["peak_mem_bytes"] / _MiB, rec["peak_above_grads_bytes"] / _MiB
    if rec.get("kind") != "ours":
        how = " (peak RSS)" if rec.get("mem_method") == "rss_peak" else ""  # compiled code: not the tracker
        return (f"| {LABELS.get(rec['impl'], rec['impl'])} | {rec['fwd_bwd_ms']:.0f} ms | {peak:.1f} MiB{how} | "
                f"{above:.1f} MiB{how} |")
    share = ("", "") if stock is None else (
        f" ({100 * rec['peak_mem_bytes'] / stock['peak_mem_bytes']:.1f}% of stock)",
        f" ({100 * rec['peak_above_grads_bytes'] / stock['peak_above_grads_bytes']:.1f}%)")
    return (f"| {_ours_label(rec)} | **{rec['fwd_bwd_ms']:.0f} ms** | **{peak:.1f} MiB**{share[0]} | "
            f"**{above:.1f} MiB**{share[1]} |")


def table(doc: dict) -> list[str]:
    """The table's lines: one row per implementation measured ok at the run's first (shape, N, dtype)."""
    ops = [r for r in doc["records"] if r.get("record") == "op" and r.get("status") == "ok"]
    if not ops:
        raise ValueError("no op measured ok in this results file: nothing for the headline table")
    first = ops[0]
    ops = [r for r in ops if (r["shape"], r["N"], r["dtype"]) == (first["shape"], first["N"], first["dtype"])]
    stock = next((r for r in ops if r["impl"] == "stock"), None)
    order = sorted(ops, key=lambda r: (r["impl"] == "floor", r.get("kind") == "ours", r["impl"] != "stock"))
    ours = [r for r in order if r.get("kind") == "ours"]
    rest = [r for r in order if r.get("kind") != "ours" and r["impl"] != "floor"]
    floor = [r for r in order if r["impl"] == "floor"]
    return HEADER + [_row(r, stock) for r in rest + ours + floor]


def caption(doc: dict) -> str:
    """What the README's sentence above the table must name: shape, dtype, device, torch and date."""
    env, first = doc["environment"], next(r for r in doc["records"] if r.get("record") == "op")
    return (f"N={first['N']} tokens, D={first['D']}, V={first['V']}, {_dtype_name(first['dtype'])}, "
            f"{env['device']}, torch {env['torch']}, {env['date'][:10]}")


def _dtype_name(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)


def render(doc: dict) -> str:
    return "\n".join([f"Measured: {caption(doc)}.", "", *table(doc), "",
                      f"Written by `{' '.join(doc.get('command', []))}`.", ""])
