"""Reporting what was measured: the summary written as `fusedce_summary.json` and the "Training memory" section
of the model card (`<output_dir>/README.md`)."""
from __future__ import annotations

import os
from dataclasses import asdict

from .config import METRIC_KEYS, MiB, FusedCEConfig
from .head_probe import probe_metrics
from .meter import IntervalMeter

CARD_HEADING = "## Training memory"


def build_summary(config: FusedCEConfig, meter: IntervalMeter, probe: dict | None, patched: bool, args,
                  state) -> dict:
    import hf_fusedce

    probe = dict(probe or {})
    for k in ("stock_peak_bytes", "stock_formula_bytes", "fused_peak_bytes"):
        if probe.get(k) is not None:
            probe[k.replace("_bytes", "_mib")] = probe[k] / MiB
    saved = probe_metrics(probe).get("fusedce/head_saved_mib")
    if saved is not None:
        probe["saved_mib"] = saved
    cfg = asdict(config)
    cfg["patch_options"] = {k: repr(v) for k, v in cfg["patch_options"].items()}
    return {
        "hf_fusedce_version": hf_fusedce.__version__,
        "patched": patched,
        "config": cfg,
        "device": str(meter.device),
        "world_size": int(args.world_size),
        "global_step": int(state.global_step),
        "train_loss": next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), None),
        "loss_head_probe": probe,
        "training": meter.training_totals(),
        "logged_intervals": meter.n_intervals,
        "intervals": meter.intervals,  # the last MAX_INTERVALS_KEPT
        "metric_keys": METRIC_KEYS,
    }


def add_model_card_section(output_dir: str, markdown: str) -> bool:
    """Append `markdown` to `output_dir/README.md` unless its section is there. False when there is no card."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        if CARD_HEADING in f.read():
            return True
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + markdown)
    return True


def _mib(b):
    return "n/a" if b is None else f"{b / MiB:,.1f} MiB"


def memory_report_markdown(summary: dict | None, probe: dict | None) -> str:
    import hf_fusedce

    s = summary or {}
    probe = s.get("loss_head_probe") or probe or {}
    head = "fused (the [tokens x vocab] logits were never materialized)" if s.get("patched") else "stock"
    lines = [CARD_HEADING, "", f"Trained with `hf_fusedce` {hf_fusedce.__version__}; training loss head {head}.", ""]
    if probe.get("fused_peak_bytes") is not None:
        stock = (f"{_mib(probe['stock_peak_bytes'])} (measured)" if probe.get("stock_peak_bytes") is not None
                 else f"{_mib(probe.get('stock_formula_bytes'))} (exact allocation formula, not run)")
        lines += ["| loss head (lm_head + cross-entropy, forward + backward) | peak memory |", "|---|---|",
                  f"| stock | {stock} |", f"| fused | {_mib(probe['fused_peak_bytes'])} (measured) |", "",
                  f"On the first training batch ({probe.get('tokens')} tokens, vocab {probe.get('vocab_size')}, "
                  f"{probe.get('compute_dtype')}), measured with `{probe.get('method')}` on "
                  f"{probe.get('device')}.", ""]
    else:
        lines += [f"Loss-head probe: {probe.get('status', 'not run')}.", ""]
    t = s.get("training") or {}
    described = {"peak_alloc_mib_max": "Peak allocated device memory during training",
                 "rss_peak_mib_max": "Peak process RSS during training",
                 "rss_mib_max": "Process RSS at logging steps (max)",
                 "step_peak_tensor_mib_max": "Peak tensor memory inside a training step"}
    lines += [f"- {text}: {t[k]:,.1f} MiB" for k, text in described.items() if t.get(k) is not None]
    if t.get("tokens_per_sec"):
        lines.append(f"- Throughput: {t['tokens_per_sec']:,.0f} tokens/s over {s.get('world_size', 1)} "
                     "process(es)")
    return "\n".join(lines) + "\n"
