"""The one-command spelling of `hf-fusedce bench` from before the jobs (`bench --matrix real-heads`, `bench --op
distill`, `bench --e2e --verify --skip-matrix`, ...), mapped onto the jobs it ran, in the order it ran them, each
with the options it read. Both spellings are supported; neither is deprecated."""
from __future__ import annotations

from hf_fusedce.cli.bench.registry import BadOption

_ALL = ("op", "verify", "e2e", "profile", "distill", "tp", "mlm", "real-heads", "e2e-rss", "sweep-n")
_HEAD_JOBS = ("op", "distill", "tp", "mlm", "real-heads")

# older option -> {job: its option there}; None where the older option was a switch without a value
_VALUED = {
    "--device": {j: "--device" for j in _ALL}, "--seed": {j: "--seed" for j in _ALL},
    "--out": {**{j: "--out" for j in _ALL}, "report": "--out"},
    "--shapes": {**{j: "--shapes" for j in _HEAD_JOBS}, "sweep-n": "--heads"},
    "--n": {j: "--n" for j in (*_HEAD_JOBS, "sweep-n")},
    "--impls": {j: "--impls" for j in ("op", "verify", "real-heads", "sweep-n")},
    "--dtype": {j: "--dtype" for j in ("op", "distill", "real-heads", "sweep-n")},
    "--repeats": {j: "--repeats" for j in ("op", "distill", "tp", "mlm")},
    "--warmup": {j: "--warmup" for j in ("op", "distill", "tp")},
    "--max-seconds": {"op": "--max-seconds"}, "--ref": {"op": "--ref", "real-heads": "--ref"},
    "--time-budget": {j: "--time-budget" for j in ("op", "verify", "e2e", "real-heads", "sweep-n")},
    "--rounds": {"real-heads": "--rounds", "sweep-n": "--rounds"}, "--peer-rounds": {"real-heads": "--peer-rounds"},
    "--e2e-rss-steps": {"e2e-rss": "--steps"}, "--e2e-rss-limit-gib": {"e2e-rss": "--limit-gib"},
    "--e2e-dtype": {"e2e": "--dtype"}, "--e2e-seq": {"e2e": "--seq"}, "--e2e-max-seq": {"e2e": "--max-seq"},
    "--e2e-repeats": {"e2e": "--repeats"}, "--e2e-budget-mib": {"e2e": "--budget-mib"},
    "--verify-at": {"verify": "--at"}, "--profile-at": {"profile": "--at"}, "--profile-impl": {"profile": "--impl"},
    "--beta": {"distill": "--beta"}, "--temperature": {"distill": "--temperature"},
    "--teacher-dim": {"distill": "--teacher-dim"}, "--tp": {"tp": "--tp"}, "--tp-threads": {"tp": "--tp-threads"},
}
_SWITCHES = {"--gemm-floor": {"real-heads": "--gemm-floor"}, "--e2e-no-search": {"e2e": "--no-search"},
             "--e2e-no-grad-ckpt": {"e2e": "--no-grad-ckpt"}}
_SELECTORS_VALUED = ("--op", "--matrix", "--e2e-rss", "--from-json")
_SELECTORS = ("--skip-matrix", "--e2e", "--verify", "--profile", "--sweep-n")


def is_older_spelling(args: list[str]) -> bool:
    """`bench` followed by an option (or nothing) rather than a job name or a help request."""
    return not args or (args[0].startswith("--") and args[0] not in ("--help",))


def translate(args: list[str]) -> list[list[str]]:
    """The jobs the older spelling `hf-fusedce bench ARGS` ran, each as `[job, its options...]`."""
    given = _read(args)
    return [[name, *_positional(name, given), *_options(name, given)] for name in _jobs(given)]


def _read(args: list[str]) -> list[tuple[str, str | None]]:
    given, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in _SWITCHES or flag in _SELECTORS:
            given.append((flag, None))
        elif flag in _VALUED or flag in _SELECTORS_VALUED:
            if not eq:
                i += 1
                if i == len(args):
                    raise BadOption(f"{flag} expects a value")
                value = args[i]
            given.append((flag, value))
        else:
            raise BadOption(f"unrecognized option {args[i]!r}; see `hf-fusedce bench --help` for the jobs and "
                            "`hf-fusedce bench <job> --help` for their options")
        i += 1
    return given


def _jobs(given) -> list[str]:
    seen = dict(given)
    if "--from-json" in seen:
        return ["report"]
    op = seen.get("--op", "ce")
    if op not in ("ce", "distill", "tp", "mlm"):
        raise BadOption(f"--op {op!r}: choose from ce, distill, tp, mlm")
    if op in ("distill", "mlm"):
        return [op]
    if "--sweep-n" in seen:
        return ["sweep-n"]
    if seen.get("--matrix", "default") not in ("default", "real-heads"):
        raise BadOption(f"--matrix {seen['--matrix']!r}: choose from default, real-heads")
    if seen.get("--matrix") == "real-heads" or "--e2e-rss" in seen:
        return [j for j, on in (("real-heads", seen.get("--matrix") == "real-heads"),
                                ("e2e-rss", "--e2e-rss" in seen)) if on]
    if op == "tp":
        return ["tp"]
    return [j for j, on in (("verify", "--verify" in seen), ("profile", "--profile" in seen),
                            ("e2e", "--e2e" in seen), ("op", "--skip-matrix" not in seen)) if on]


def _positional(name: str, given) -> list[str]:
    seen = dict(given)
    return {"report": [seen.get("--from-json", "")], "e2e-rss": [seen.get("--e2e-rss", "")]}.get(name, [])


def _options(name: str, given) -> list[str]:
    out = []
    for flag, value in given:
        new = (_VALUED.get(flag) or _SWITCHES.get(flag) or {}).get(name)
        if new:
            out += [new] if value is None else [new, value]
    return out
