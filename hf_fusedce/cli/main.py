"""`hf-fusedce {demo,check,bench,distill-cache}`: each subcommand module exposes `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "check", "bench", "distill_cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fusedce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"hf_fusedce.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
