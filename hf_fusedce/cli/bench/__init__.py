"""`hf-fusedce bench <job>`: time and memory of the loss head, ours vs stock vs peers vs the 3-GEMM floor.

Each job has its own options: `hf-fusedce bench <job> --help`. The results-table jobs (op, verify, e2e,
profile) write results.json (one record per measurement), results.md and results.png into --out.
The one-command spelling of earlier releases (`bench --matrix real-heads`, `bench --op distill`,
`bench --e2e --verify --skip-matrix`, ...) keeps working: it runs the same jobs.
"""
from __future__ import annotations

import argparse
import sys

from hf_fusedce.cli.bench import registry, results, studies  # noqa: F401 - importing a job module registers its jobs
from hf_fusedce.cli.bench.legacy import is_older_spelling, translate
from hf_fusedce.cli.bench.registry import BadOption, Session


def register(subparsers):
    p = subparsers.add_parser(
        "bench", help="benchmark the fused loss head against stock, peers and the GEMM floor",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = p.add_subparsers(dest="job", metavar="<job>", required=True)
    for job in registry.JOBS.values():
        sub = jobs.add_parser(job.name, help=job.help, description=job.help)
        job.options(sub)
        sub.set_defaults(func=run, bench_job=job.name)
    return p


def run(args) -> int:
    return run_jobs([args], args.command_line)


def run_older_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """`hf-fusedce bench --option ...` as written before the jobs: the jobs it ran, sharing one results.json.
    None when `argv` is the current spelling."""
    if not is_older_spelling(argv[1:]):
        return None
    try:
        steps = translate(argv[1:])
    except BadOption as err:
        print(f"hf-fusedce bench: {err}", file=sys.stderr)
        return 2
    return run_jobs([parser.parse_args(["bench", *step]) for step in steps], ["hf-fusedce", *argv])


def run_jobs(steps: list[argparse.Namespace], command: list[str]) -> int:
    """Runs each job in order on one device and session; prints the files written; the worst exit code."""
    codes, name = [], "bench"
    try:
        session = Session.start(steps[0] if steps else None, command, budget=_time_budget(steps))
        for args in steps:
            name = f"bench {args.bench_job}"
            codes.append(registry.JOBS[args.bench_job].run(args, session))
    except BadOption as err:
        print(f"hf-fusedce {name}: {err}", file=sys.stderr)
        return 2
    for path in session.finish():
        print(path)
    return max(codes, default=0)


def _time_budget(steps) -> float | None:
    """One deadline for the whole run, as the older spelling's single --time-budget meant."""
    return next((s.time_budget for s in steps if getattr(s, "time_budget", None) is not None), None)
