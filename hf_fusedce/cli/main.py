"""hf-fusedce: train Hugging Face causal LMs without materializing the [tokens x vocab] logits.

  demo           train a small Llama stock vs fused (offline) and compare loss curves and measured memory
  check          prove the patched loss and every gradient equal stock, per model family or for a checkpoint
  bench          time and measure the loss head: ours vs stock vs peers vs the GEMM floor
  distill-cache  store a teacher's top-k log-probs for offline distillation

`hf-fusedce <command> --help` lists a command's options and their defaults.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "check", "bench", "distill_cache")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default its text does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The same, with the description kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fusedce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in SUBCOMMANDS:
        importlib.import_module(f"hf_fusedce.cli.{name}").register(sub)
    for p in sub.choices.values():
        raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
        p.formatter_class = RawHelpFormatter if raw else HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
