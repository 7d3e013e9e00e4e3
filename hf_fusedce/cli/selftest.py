"""`hf-fusedce selftest`: on this machine, is the fused loss right, lean and fast, and does the patch train as
stock does. Writes selftest.json (the device, every check with its verdict and figures), selftest.md and a plot;
prints a one-screen summary; exits 1 on any wrong number. About 5 minutes on one GPU (--quick: about one)."""
from __future__ import annotations

import argparse


def register(subparsers):
    p = subparsers.add_parser("selftest", help="prove the op, the patch and the speed on this machine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and timings (about a minute)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="hf_fusedce_selftest", help="output folder")
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="run only the checks whose group/name contains TEXT (repeatable), e.g. numbers, patch/LoRA")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from hf_fusedce import selftest

    if args.device == "cuda" and not torch.cuda.is_available():
        print("hf-fusedce selftest: --device cuda but torch sees no CUDA device")
        return 2
    report = selftest.run(args.device, quick=args.quick, only=tuple(args.only or ()))
    paths = report.write(args.out)
    print(report.summary())
    for path in paths:
        print(path)
    return 1 if report.failed() else 0
