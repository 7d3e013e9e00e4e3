"""What the fused head saves on a vision-language batch whose sequence is mostly image tokens.

A VLM's labels are -100 on its image tokens and its prompt: stock transformers still computes the logits of
every position (and their gradient) and only then drops the ignored ones in the cross-entropy. hf_fusedce's op
compacts the ignored rows away before its GEMMs. This script measures, for one loss head forward + backward of
a Qwen2-VL-2B-shaped head (hidden 1536, vocabulary 151936, fp32 by default) on a batch of `--tokens` positions
laid out as [prompt | image | prompt | answer]:

- head FLOPs: 2*m*n*k of every matmul actually dispatched (mm, addmm and its in-place form, bmm, baddbmm), counted
  by a dispatch mode (torch's FlopCounterMode skips the in-place addmm_ the op accumulates dW with);
- head memory: peak bytes of tensors created during forward + backward, counted by hf_fusedce.memory's live-tensor
  tracker (CPU; the CUDA allocator's peak on GPU), and that peak above the gradients dh and dW every head returns
  (the V x D weight gradient alone is 890 MiB at this shape in fp32);
- time: wall clock of one forward + backward (noisy on a shared CPU: read it as a ratio);
- correctness: loss and gradients of the fused head against stock (relative error).

Rows: stock (transformers' ForCausalLMLoss on materialized logits), fused on the same batch, and fused on the same
shape with every position labelled (no compaction possible), which separates the fusion's memory saving from the
compaction's FLOP saving.

    python examples/vlm_image_tokens.py                       # 1024 positions, 80% image tokens
    python examples/vlm_image_tokens.py --tokens 4096 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

QWEN2_VL_2B = dict(hidden=1536, vocab=151936)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="positions in the batch (one row)")
    p.add_argument("--image_fraction", type=float, default=0.8, help="share of positions that are image tokens")
    p.add_argument("--prompt_fraction", type=float, default=0.05, help="share of positions that are prompt text")
    p.add_argument("--hidden", type=int, default=QWEN2_VL_2B["hidden"])
    p.add_argument("--vocab", type=int, default=QWEN2_VL_2B["vocab"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def make_batch(tokens, image_fraction, prompt_fraction, hidden, vocab, dtype, device, seed=0):
    """hidden (tokens, D), weight (V, D) and labels (1, tokens): [prompt/2 | image | prompt/2 | answer], labels
    -100 on everything but the answer (what a VLM collator with a completion-only loss produces)."""
    g = torch.Generator().manual_seed(seed)
    n_image = int(round(tokens * image_fraction))
    n_prompt = int(round(tokens * prompt_fraction))
    n_answer = tokens - n_image - n_prompt
    if n_answer < 2:
        raise SystemExit(f"--image_fraction + --prompt_fraction leave {n_answer} answer tokens; need at least 2")
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden ** -0.5
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[0, :tokens - n_answer] = -100  # prompt, image tokens, prompt
    return h.to(device, dtype), w.to(device, dtype), labels.to(device), dict(image=n_image, prompt=n_prompt,
                                                                              answer=n_answer)


def stock_head(h, w, labels):
    """transformers' causal-LM head: logits = lm_head(h), then ForCausalLMLoss (float32 upcast, shift, CE)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    logits = torch.nn.functional.linear(h, w).unsqueeze(0)
    return ForCausalLMLoss(logits, labels, vocab_size=w.shape[0])


def fused_head(h, w, labels):
    """hf_fusedce's op on the same shifted targets (the patched forward calls it exactly so)."""
    from hf_fusedce.ops import fused_linear_cross_entropy
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[0, 1:]
    return fused_linear_cross_entropy(h, w, targets)


class MatmulFlops(TorchDispatchMode):
    """2*m*n*k per matmul dispatched while active."""
    OPS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2), "baddbmm_": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        which = self.OPS.get(func.overloadpacket.__name__)
        if which is not None:
            a, b = args[which[0]], args[which[1]]
            self.flops += 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))


def measure(head, h, w, labels, device):
    """(loss, grads, FLOPs, peak bytes, seconds) of forward + backward; the inputs exist before measuring."""
    from hf_fusedce.memory import measure_peak

    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    counter = MatmulFlops()
    with counter:
        head(h, w, labels).backward()  # a first run counts the FLOPs
    h.grad = w.grad = None
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with measure_peak(device) as peak:
        sync()
        start = time.perf_counter()
        loss = head(h, w, labels)
        loss.backward()
        sync()
        seconds = time.perf_counter() - start
    return loss.detach(), (h.grad, w.grad), counter.flops, peak.peak_bytes, seconds


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    h, w, labels, layout = make_batch(args.tokens, args.image_fraction, args.prompt_fraction, args.hidden,
                                      args.vocab, dtype, args.device)
    all_labelled = torch.randint(0, args.vocab, labels.shape, generator=torch.Generator().manual_seed(1))
    rows = {}
    for name, head, lab in (("stock", stock_head, labels), ("fused", fused_head, labels),
                            ("fused, every position labelled", fused_head, all_labelled.to(args.device))):
        loss, grads, flops, peak, seconds = measure(head, h, w, lab, args.device)
        rows[name] = dict(loss=loss.item(), flops=flops, peak_bytes=peak, seconds=seconds, grads=grads)
    grads_bytes = (h.numel() + w.numel()) * h.element_size()  # dh and dW: every variant returns them
    for r in rows.values():
        r["peak_above_grads_bytes"] = r["peak_bytes"] - grads_bytes
    stock, fused = rows["stock"], rows["fused"]
    result = {
        "shape": dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                      device=args.device, **{f"{k}_tokens": v for k, v in layout.items()},
                      scored_tokens=int((labels[0, 1:] != -100).sum())),
        "rows": {k: {f: v[f] for f in ("loss", "flops", "peak_bytes", "peak_above_grads_bytes", "seconds")}
                 for k, v in rows.items()},
        "loss_rel_err": abs(fused["loss"] - stock["loss"]) / abs(stock["loss"]),
        "grad_rel_err": max(_rel(a, b) for a, b in zip(fused["grads"], stock["grads"])),
        "flops_saved": 1 - fused["flops"] / stock["flops"],
        "memory_saved": 1 - fused["peak_bytes"] / stock["peak_bytes"],
        "memory_above_grads_saved": 1 - fused["peak_above_grads_bytes"] / stock["peak_above_grads_bytes"],
        "versions": dict(torch=torch.__version__, threads=torch.get_num_threads()),
    }
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _print(result):
    s = result["shape"]
    print(f"head N={s['tokens']} (image {s['image_tokens']}, prompt {s['prompt_tokens']}, answer "
          f"{s['answer_tokens']}; {s['scored_tokens']} scored after the shift), D={s['hidden']}, V={s['vocab']}, "
          f"{s['dtype']} on {s['device']}")
    print("| head | GFLOP (fwd+bwd) | peak MiB | peak above dh + dW, MiB | seconds | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['flops'] / 1e9:,.1f} | {r['peak_bytes'] / 2**20:,.1f} | "
              f"{r['peak_above_grads_bytes'] / 2**20:,.1f} | {r['seconds']:.2f} | {r['loss']:.6f} |")
    print(f"fused vs stock: {result['flops_saved']:.1%} fewer FLOPs, {result['memory_saved']:.1%} less peak memory "
          f"({result['memory_above_grads_saved']:.1%} less above the gradients); loss rel err "
          f"{result['loss_rel_err']:.1e}, gradients {result['grad_rel_err']:.1e}")


if __name__ == "__main__":
    main()
