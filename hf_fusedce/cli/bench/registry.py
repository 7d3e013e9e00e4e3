"""The bench jobs' registry and what one run shares: the device, the command as typed, the results sink.

A job is a name, a help line, a function adding its options and a function running it. Adding a job is one
`@job(...)`-decorated function (and its options function) in any module `hf_fusedce.cli.bench` imports.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable


class BadOption(ValueError):
    """An option value the job cannot use: reported as `hf-fusedce bench <job>: <reason>`, exit code 2."""


@dataclass(frozen=True)
class Job:
    name: str
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, "Session"], int]


JOBS: dict[str, Job] = {}


def job(name: str, help: str, options: Callable[[argparse.ArgumentParser], None]):
    """Registers the decorated `run(args, session) -> exit code` as `hf-fusedce bench <name>`."""
    def register(run):
        JOBS[name] = Job(name, help, options, run)
        return run
    return register


def common_options(p: argparse.ArgumentParser, out_default: str):
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None, help=f"output folder (default {out_default})")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")


@dataclass
class Session:
    """One `hf-fusedce bench` run: one or more jobs on one device, writing into one results.json when they record
    into it (the op matrix, verify, e2e; an older spelling may run several of them together)."""
    device: object
    command: list[str]
    deadline: float | None = None
    written: list[str] = field(default_factory=list)
    _sink: object = None

    @classmethod
    def start(cls, args, command: list[str], budget: float | None = None) -> "Session":
        return cls(resolve_device(getattr(args, "device", None)), command,
                   deadline=None if budget is None else time.perf_counter() + budget)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def sink(self, out: str | None):
        """The results.json collector, opened by the first job that records into it."""
        if self._sink is None:
            from hf_fusedce.bench import report
            from hf_fusedce.bench.runner import environment, log

            out = out or default_out(self.device)
            self._sink = report.ResultSink(out, self.command, environment(self.device))
            log(f"[bench] device {self._sink.doc['environment']['device']}; writing to {out}")
        return self._sink

    def out_dir(self, out: str | None) -> str:
        """Where a job's own files go: beside the run's results.json when one is open."""
        path = self._sink.out_dir if self._sink is not None else out or default_out(self.device)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def records(self) -> list[dict]:
        return self._sink.records if self._sink is not None else []

    def finish(self) -> list[str]:
        return (self._sink.finish() if self._sink is not None else []) + self.written


def resolve_device(name: str | None):
    import torch

    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadOption("--device cuda but torch sees no CUDA device")
    return device


def default_out(device) -> str:
    import torch

    if device.type == "cuda":
        tag = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    else:
        tag = "cpu"
    return os.path.join("hf_fusedce_bench", tag)


def csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def checked(parse, text):
    """`parse(text)`, its ValueError reported as a bad option."""
    try:
        return parse(text)
    except ValueError as err:
        raise BadOption(str(err)) from err


def shapes_of(text: str | None):
    from hf_fusedce.bench.shapes import parse_shape

    return [checked(parse_shape, s) for s in csv(text)] if text else None


def ints_of(text: str | None) -> list[int] | None:
    return [checked(int, x) for x in csv(text)] if text else None


def impls_of(text: str | None):
    from hf_fusedce.bench.impls import parse_impls

    return checked(parse_impls, text)


def dtype_keys_of(text: str | None) -> list[str] | None:
    from hf_fusedce.bench.shapes import DTYPE_MODES

    keys = csv(text)
    for k in keys or []:
        if k not in DTYPE_MODES:
            raise BadOption(f"unknown dtype {k!r}; choose from {', '.join(DTYPE_MODES)}")
    return keys


def case_of(text: str):
    """SHAPE:N, e.g. llama3-8b:8192 or 512x32000:4096."""
    from hf_fusedce.bench.shapes import parse_shape

    shape, _, n = text.rpartition(":")
    if not shape or not n.isdigit():
        raise BadOption(f"expected SHAPE:N such as llama3-8b:8192, got {text!r}")
    return checked(parse_shape, shape), int(n)
