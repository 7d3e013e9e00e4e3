"""hf-fusedce: train Hugging Face causal LMs without materializing the [tokens x vocab] logits.

  demo           train a small Llama stock vs fused (offline) and compare loss curves and measured memory
  check          prove the patched loss and every gradient equal stock, per model family or for a checkpoint
  selftest       on this machine: is the op right, lean and fast; does the patch train as stock does
  bench          time and measure the loss head: ours vs stock vs peers vs the GEMM floor (one job each:
                 op, verify, e2e, profile, real-heads, distill, tp, mlm, ...)
  distill-cache  store a teacher's top-k log-probs for offline distillation

`hf-fusedce <command> --help` lists a command's options and their defaults.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "check", "bench", "selftest", "distill_cache")


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
    _use_help_formatter(parser)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action else {}


def _use_help_formatter(parser: argparse.ArgumentParser):
    """Every (sub)command's help states its defaults; `bench <job>` is one level further down."""
    for p in subcommands(parser).values():
        raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
        p.formatter_class = RawHelpFormatter if raw else HelpFormatter
        _use_help_formatter(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # A command may accept an older spelling argparse cannot express (`bench --matrix real-heads`).
    older = getattr(sys.modules.get(f"hf_fusedce.cli.{argv[0].replace('-', '_')}") if argv else None,
                    "run_older_spelling", None)
    code = older(parser, argv) if older else None
    if code is not None:
        return code
    args = parser.parse_args(argv)
    args.command_line = ["hf-fusedce", *argv]  # as typed, for the reports that record it
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
