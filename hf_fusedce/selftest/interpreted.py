"""On a machine without a GPU: the Triton row kernel through Triton's interpreter (TRITON_INTERPRET=1), in a
subprocess because the interpreter must be switched on before triton is imported. fp32 only: the interpreter's
bf16 tl.dot is wrong, and fp32 is what it checks exactly. The same option checks as on a GPU, at the same small
shape, plus the twin check against the torch backend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

from .report import Check

QUICK_CASES = ("plain", "soft targets", "all together")


def checks(quick: bool, timeout: float = 600.0) -> list[Check]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return [Check("numbers", "triton kernel, interpreted", "skipped", detail=f"triton not installed ({err})")]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "hf_fusedce.selftest.interpreted"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        return [Check("numbers", "triton kernel, interpreted", "fail",
                      detail=f"the interpreter run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")]
    return [Check(**c) for c in json.loads(proc.stdout.strip().splitlines()[-1])]


def main(argv=None) -> int:
    import torch

    from . import numbers

    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    cpu = torch.device("cpu")
    cases = QUICK_CASES if quick else tuple(numbers.option_cases())
    out = [numbers.option_check(case, "fp32", "triton", cpu) for case in cases]
    out.append(numbers.twin_check("fp32", cpu, n=48, vocab=1031, dim=32))
    for c in out:
        c.name += " (interpreted)"
    print(json.dumps([asdict(c) for c in out], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
