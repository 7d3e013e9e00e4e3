"""The selftest's record: one Check per question asked, written as selftest.json, selftest.md and a plot, and a
one-screen summary. A check is "pass", "fail" (a wrong number: the command exits non-zero), "skipped" (with the
reason) or "info" (a figure with no verdict: timings on a shared machine, the kernel's registers)."""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field

VERDICTS = ("pass", "fail", "skipped", "info")


@dataclass
class Check:
    group: str  # machine | numbers | memory | time | patch
    name: str
    status: str
    figures: dict = field(default_factory=dict)
    detail: str = ""

    def __post_init__(self):
        assert self.status in VERDICTS, self.status


@dataclass
class Report:
    machine: dict
    mode: str  # "quick" | "full"
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def run(self, group: str, name: str, fn) -> Check:
        """`fn() -> Check`; an exception becomes a failed check naming it (a crash is a wrong number too)."""
        start = time.perf_counter()
        try:
            check = fn()
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on to the other checks
            check = Check(group, name, "fail", detail=f"{type(err).__name__}: {err}\n"
                                                      + "".join(traceback.format_exc(limit=-3)))
        for c in check if isinstance(check, list) else [check]:
            c.figures.setdefault("seconds", round(time.perf_counter() - start, 2))
        self.checks.append(check)
        return check

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict:
        counts = {v: sum(c.status == v for c in self.checks) for v in VERDICTS}
        return {"schema": 1, "mode": self.mode, "seconds": round(self.seconds, 1), "ok": not self.failed(),
                "counts": counts, "machine": self.machine, "checks": [asdict(c) for c in self.checks]}

    def write(self, out: str) -> list[str]:
        os.makedirs(out, exist_ok=True)
        paths = [os.path.join(out, "selftest.json"), os.path.join(out, "selftest.md")]
        with open(paths[0], "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)
        with open(paths[1], "w") as f:
            f.write(self.markdown())
        plot = write_plot(self, os.path.join(out, "selftest.png"))
        return paths + ([plot] if plot else [])

    def markdown(self) -> str:
        m = self.machine
        lines = [f"# hf-fusedce selftest ({self.mode}): {'PASS' if not self.failed() else 'FAIL'}", "",
                 f"{m.get('device')}, {m.get('memory_gib')} GiB; {m.get('runtime')}; torch {m.get('torch')}, "
                 f"triton {m.get('triton')}, transformers {m.get('transformers')}; {self.seconds:.0f} s", "",
                 "| group | check | verdict | figures | detail |", "|---|---|---|---|---|"]
        for c in self.checks:
            figs = ", ".join(f"{k} {_fmt(v)}" for k, v in c.figures.items())
            lines.append(f"| {c.group} | {c.name} | {c.status} | {figs} | {c.detail.splitlines()[0] if c.detail else ''} |")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One screen: the verdict, the machine, each group's counts, every failure, the headline figures."""
        d = self.to_dict()
        lines = [f"hf-fusedce selftest ({self.mode}) on {self.machine.get('device')}: "
                 f"{'PASS' if d['ok'] else 'FAIL'} ({d['counts']['pass']} pass, {d['counts']['fail']} fail, "
                 f"{d['counts']['skipped']} skipped, {d['counts']['info']} info) in {self.seconds:.0f} s"]
        for group in ("machine", "numbers", "memory", "time", "patch"):
            mine = [c for c in self.checks if c.group == group]
            if mine:
                lines.append(f"  {group:<8} " + ", ".join(f"{v} {sum(c.status == v for c in mine)}"
                                                        for v in VERDICTS if any(c.status == v for c in mine)))
        for c in self.checks:
            if c.status == "fail":
                lines.append(f"  FAIL {c.group}/{c.name}: {c.detail.splitlines()[0] if c.detail else c.figures}")
            elif c.group in ("memory", "time") and c.status != "skipped":
                lines.append(f"  {c.group}/{c.name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in c.figures.items()))
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_plot(report: Report, path: str) -> str | None:
    """Memory above inputs and time per implementation from the memory/time checks (none: no plot)."""
    mem = [c for c in report.checks if c.group == "memory" and "peak_above_inputs_mib" in c.figures]
    if not mem:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [c.name for c in mem]
    axes[0].barh(names, [c.figures["peak_above_inputs_mib"] for c in mem])
    axes[0].set_xlabel("peak above inputs + gradients (MiB)")
    timed = [c for c in mem if c.figures.get("fwd_bwd_ms")]
    axes[1].barh([c.name for c in timed], [c.figures["fwd_bwd_ms"] for c in timed])
    axes[1].set_xlabel("forward + backward (ms; shared machines are noisy)")
    fig.suptitle(f"hf-fusedce selftest: {report.machine.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
