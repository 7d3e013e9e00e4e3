"""`hf-fusedce demo`: train a small Llama-shaped model (32k real vocabulary) on the shipped SFT data twice,
stock loss head and fused, same seed and steps; show that the loss curves agree and what memory each used."""
from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass

MiB = 2**20
SHIPPED_VOCAB = 32000


@dataclass
class DemoOptions:
    steps: int = 20
    seq_len: int = 256
    batch_size: int = 4
    vocab_size: int = SHIPPED_VOCAB
    hidden_size: int = 256
    layers: int = 2
    lr: float = 1e-3
    grad_accum: int = 1
    seed: int = 0
    out: str = "hf_fusedce_demo"
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False
    plot: bool = True
    quiet: bool = False


def resolve_device(opt: DemoOptions) -> str:
    import torch

    if opt.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if opt.device == "cuda" and not torch.cuda.is_available():  # else it would train on CPU and report "CUDA"
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__}); use --device cpu "
                         "or auto")
    return opt.device


def build_tokenizer(vocab_size: int):
    """The shipped 32k tokenizer (the model's vocabulary may be padded above it, as real checkpoints do);
    for a smaller vocabulary, a BPE trained on the shipped data."""
    from .data import make_sft_records
    from .tokenizer import load_demo_tokenizer, train_bpe_tokenizer

    if vocab_size >= SHIPPED_VOCAB:
        return load_demo_tokenizer()
    texts = [m["content"] for r in make_sft_records(600) for m in r["messages"]]
    return train_bpe_tokenizer(texts, vocab_size)


def build_dataset(tokenizer, seq_len: int, min_sequences: int = 1):
    """The shipped SFT data, tokenized (labels on responses) and packed into `seq_len` blocks; when that gives
    fewer than `min_sequences` blocks (long sequences), more records are generated with the same templates."""
    import datasets

    from .data import build_sft_dataset, make_sft_records, pack_sft, tokenize_chat

    chats = build_sft_dataset(tokenizer, max_length=seq_len)
    seed = 1
    while sum(len(x) for x in chats["input_ids"]) < min_sequences * seq_len and seed < 1000:
        extra = datasets.Dataset.from_list(make_sft_records(600, seed=seed))
        extra = extra.map(tokenize_chat, fn_kwargs={"tokenizer": tokenizer, "max_length": seq_len},
                          remove_columns=extra.column_names)
        chats = datasets.concatenate_datasets([chats, extra])
        seed += 1
    return chats.map(pack_sft, batched=True, batch_size=len(chats), remove_columns=chats.column_names,
                     fn_kwargs={"block_size": seq_len}, desc="pack")


def _progress_callback(label: str, total: int, quiet: bool):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=total, desc=f"{label:>5}", unit="step", disable=quiet, dynamic_ncols=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return _Bar()


def run_one(label: str, fused: bool, opt: DemoOptions, dataset, vocab_size: int) -> dict:
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..callback import FusedCEConfig
    from ..trainer import FusedCETrainer
    from .model import build_tiny_llama

    device = resolve_device(opt)
    model = build_tiny_llama(seed=opt.seed, vocab_size=vocab_size, hidden_size=opt.hidden_size,
                             num_layers=opt.layers, num_heads=max(opt.hidden_size // 64, 1),
                             num_kv_heads=max(opt.hidden_size // 128, 1), max_position=max(opt.seq_len, 256))
    args = TrainingArguments(
        output_dir=os.path.join(opt.out, label), max_steps=opt.steps, per_device_train_batch_size=opt.batch_size,
        gradient_accumulation_steps=opt.grad_accum, learning_rate=opt.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", seed=opt.seed,
        data_seed=opt.seed, use_cpu=device == "cpu", bf16=opt.bf16, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True)
    # The loss-head probe (stock vs fused head in isolation) runs once, in the fused run.
    cfg = FusedCEConfig(enabled=fused, track_step_tensors=device == "cpu", memory_probe=fused, stock_head="measure")
    trainer = FusedCETrainer(model=model, args=args, train_dataset=dataset, fusedce_config=cfg)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(label, opt.steps, opt.quiet))
    if device == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = trainer.fusedce_summary
    del trainer, model  # free this run's weights and optimizer before the next run measures its peak
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    training = summary["training"]
    step_peak = training.get("step_peak_tensor_mib_max") if device == "cpu" else training.get("peak_alloc_mib_max")
    return {
        "label": label, "fused": fused, "seconds": seconds, "losses": [h["loss"] for h in logs],
        "steps": [h["step"] for h in logs], "probe": summary["loss_head_probe"],
        "step_peak_mib": step_peak,
        "step_peak_kind": ("peak tensor memory inside a training step (live-tensor tracker)" if device == "cpu"
                           else "peak allocated CUDA memory during training (weights, optimizer included)"),
        "tokens_per_sec": training.get("tokens_per_sec"),
    }


def _stock_skip_reason(opt: DemoOptions, vocab: int) -> str | None:
    """On CPU a stock run whose loss head cannot fit in RAM would be killed by the kernel (no catchable OOM):
    skip it, saying why (the head's exact allocation formula). On CUDA an OOM is an exception."""
    from .. import memory

    if resolve_device(opt) == "cuda":
        return None
    need = memory.stock_head_peak_bytes(opt.batch_size * opt.seq_len, vocab, opt.hidden_size,
                                        2 if opt.bf16 else 4, autocast=opt.bf16)
    avail = memory.available_host_bytes()
    if avail is not None and need > 0.7 * avail:
        return (f"its loss head needs {need / 2**30:.2f} GiB (formula) with {avail / 2**30:.2f} GiB of RAM "
                f"available")
    return None


def compare(stock: dict, fused: dict) -> dict:
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], fused["losses"])]
    return {"max_rel_loss_diff": max(rel) if rel else float("nan"), "n_steps": len(rel)}


def format_table(res: dict) -> str:
    s, f, probe = res["stock"], res["fused"], res["fused"]["probe"]

    def mib(x):
        return "does not fit" if x is None else f"{x:,.1f} MiB"

    def loss(r, i):
        return f"{r['losses'][i]:.5f}" if r["losses"] else "not run"

    head_stock = probe.get("stock_peak_mib") if probe.get("stock_fits", True) else None
    rows = [
        ("", "stock", "fused"),
        ("steps", str(len(s["losses"])), str(len(f["losses"]))),
        ("first loss", loss(s, 0), loss(f, 0)),
        ("final loss", loss(s, -1), loss(f, -1)),
        ("loss head peak (measured)", mib(head_stock), mib(probe.get("fused_peak_mib"))),
        ("training step peak", "not run" if s.get("skipped") else mib(s["step_peak_mib"]), mib(f["step_peak_mib"])),
        ("tokens / s", f"{s['tokens_per_sec'] or 0:,.0f}", f"{f['tokens_per_sec'] or 0:,.0f}"),
        ("wall time", f"{s['seconds']:.1f} s", f"{f['seconds']:.1f} s"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c:>14}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    c = res["compare"]
    lines.append("")
    if s.get("skipped"):
        lines.append(f"stock run skipped: {s['skipped']}")
    else:
        lines.append(f"max relative loss difference over {c['n_steps']} steps: {c['max_rel_loss_diff']:.2e} "
                     f"({'curves agree' if res['agree'] else 'CURVES DIFFER'}, tolerance {res['tolerance']:.0e})")
    if probe.get("stock_fits") is False:
        lines.append(f"loss head probe: {probe.get('status')}")
    if probe.get("stock_peak_mib") is not None:
        lines.append(f"loss head memory saved: {probe['saved_mib']:,.1f} MiB "
                     f"({probe['stock_peak_mib'] / max(probe['fused_peak_mib'], 1e-9):.1f}x less) on "
                     f"{probe['tokens']} tokens x {probe['vocab_size']} vocab, measured with {probe['method']}")
    elif probe.get("stock_formula_mib") is not None:
        lines.append(f"stock loss head (not run): {probe['stock_formula_mib']:,.1f} MiB by its exact allocation "
                     f"formula, on {probe['tokens']} tokens x {probe['vocab_size']} vocab")
    lines.append(f"training step peak: {f['step_peak_kind']}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, f, probe = res["stock"], res["fused"], res["fused"]["probe"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.35, 1]})
    if s["losses"]:
        ax1.plot(s["steps"], s["losses"], "-", color="tab:blue", lw=2.5, alpha=0.6, label="stock head")
    else:
        ax1.text(0.5, 0.9, "stock run skipped: it does not fit in memory", transform=ax1.transAxes,
                 ha="center", color="tab:red")
    ax1.plot(f["steps"], f["losses"], "--o", color="tab:orange", lw=1.3, ms=3, label="fused head (hf_fusedce)")
    from matplotlib.ticker import MaxNLocator

    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss")
    ax1.set_title(f"Loss curves (max relative difference {res['compare']['max_rel_loss_diff']:.1e})"
                  if s["losses"] else "Loss curve (fused only)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    groups = ["loss head alone\n(lm_head + CE, fwd+bwd)", "training step\n(model fwd+bwd)"]
    stock_vals = [probe.get("stock_peak_mib") or 0.0, s["step_peak_mib"] or 0.0]
    fused_vals = [probe.get("fused_peak_mib") or 0.0, f["step_peak_mib"] or 0.0]
    x = range(len(groups))
    w = 0.36
    b1 = ax2.bar([i - w / 2 for i in x], stock_vals, w, color="tab:blue", alpha=0.75, label="stock")
    b2 = ax2.bar([i + w / 2 for i in x], fused_vals, w, color="tab:orange", alpha=0.9, label="fused")
    for bars in (b1, b2):
        for bar in bars:
            if bar.get_height() <= 0:
                continue
            ax2.annotate(f"{bar.get_height():,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    if not probe.get("stock_fits", True):
        ax2.annotate("stock head\ndoes not fit", (-w / 2, 0), ha="center", va="bottom", color="tab:red",
                     xytext=(0, 14), textcoords="offset points")
    if s.get("skipped"):
        ax2.annotate("stock\nnot run", (1 - w / 2, 0), ha="center", va="bottom", color="tab:red",
                     xytext=(0, 14), textcoords="offset points")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(groups)
    ax2.set_ylabel("peak memory (MiB, measured)")
    ax2.set_title(f"Memory ({probe.get('method', '?')}, {res['device']})")
    ax2.margins(y=0.15)
    ax2.legend()
    opt = res["options"]
    fig.suptitle(f"hf_fusedce demo: Llama {opt['layers']}x{opt['hidden_size']}, vocab {res['vocab_size']:,}, "
                 f"batch {opt['batch_size']} x seq {opt['seq_len']}, {opt['steps']} steps", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(opt: DemoOptions) -> dict:
    import torch

    import datasets

    t_start = time.perf_counter()
    resolve_device(opt)  # refuses a device that is not there before any work
    os.makedirs(opt.out, exist_ok=True)
    datasets.disable_progress_bars()  # data prep takes a second; keep the output to the two training bars
    if resolve_device(opt) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tok = build_tokenizer(opt.vocab_size)
    vocab = max(opt.vocab_size, len(tok))
    dataset = build_dataset(tok, opt.seq_len, min_sequences=opt.batch_size * opt.grad_accum)
    if not opt.quiet:
        print(f"hf_fusedce demo on {resolve_device(opt)}: tokenizer {len(tok):,} tokens, model vocab {vocab:,}, "
              f"{len(dataset)} packed SFT sequences of {opt.seq_len} tokens (labels on responses only)")
    skip = _stock_skip_reason(opt, vocab)
    if skip is None:
        stock = run_one("stock", False, opt, dataset, vocab)
    else:
        stock = {"label": "stock", "fused": False, "skipped": skip, "seconds": 0.0, "losses": [], "steps": [],
                 "probe": {}, "step_peak_mib": None, "step_peak_kind": "not run", "tokens_per_sec": None}
        if not opt.quiet:
            print(f"stock run skipped: {skip}")
    fused = run_one("fused", True, opt, dataset, vocab)
    tol = 2e-2 if opt.bf16 else 1e-3
    res = {"options": asdict(opt), "device": resolve_device(opt), "vocab_size": vocab, "tokenizer_size": len(tok),
           "stock": stock, "fused": fused, "compare": compare(stock, fused), "tolerance": tol}
    finite = all(map(math.isfinite, fused["losses"]))
    res["agree"] = finite if skip else bool(res["compare"]["max_rel_loss_diff"] <= tol) and finite
    if opt.plot:
        res["plot"] = plot(res, os.path.join(opt.out, "hf_fusedce_demo.png"))
    res["total_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(opt.out, "demo_results.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=str)
    if not opt.quiet:
        print()
        print(format_table(res))
        if opt.plot:
            print(f"plot: {res['plot']}")
        print(f"results: {os.path.join(opt.out, 'demo_results.json')}  (total {res['total_seconds']:.0f} s)")
    return res
