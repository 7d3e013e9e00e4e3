"""`hf-fusedce demo`: stock vs fused loss head on a small Llama with a real 32k vocabulary, offline."""
from __future__ import annotations

import sys


def register(subparsers):
    from ..demo.runner import DemoOptions

    d = DemoOptions()
    p = subparsers.add_parser(
        "demo", help="train a small Llama stock vs fused (offline), compare loss curves and measured memory",
        description="Builds a small Llama-shaped model with a real 32k tokenizer (shipped), loads the shipped SFT "
                    "data through `datasets`, trains it with the stock loss head and with the fused one for the "
                    "same steps, prints both loss curves' agreement and the memory each used (measured), and "
                    "writes a PNG plot. No download. About two minutes on a 2-core CPU with the defaults.")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="model vocabulary (default %(default)s = the shipped tokenizer; larger pads the "
                        "embedding like real checkpoints; smaller trains a BPE on the shipped data)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help="default %(default)s")
    p.add_argument("--layers", type=int, default=d.layers, help="default %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="default %(default)s")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device,
                   help="default %(default)s: a GPU if there is one")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (looser agreement tolerance)")
    p.add_argument("--out", default=d.out, help="output directory for the plot and JSON (default ./%(default)s)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from ..demo.runner import DemoOptions, resolve_device, run_demo

    opt = DemoOptions(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, vocab_size=args.vocab_size,
                      hidden_size=args.hidden_size, layers=args.layers, lr=args.lr, grad_accum=args.grad_accum,
                      seed=args.seed, out=args.out, device=args.device, bf16=args.bf16, plot=not args.no_plot,
                      quiet=args.quiet)
    try:
        resolve_device(opt)
    except ValueError as err:  # --device cuda without CUDA
        print(f"hf-fusedce demo: error: {err}", file=sys.stderr)
        return 2
    res = run_demo(opt)
    return 0 if res["agree"] else 1
