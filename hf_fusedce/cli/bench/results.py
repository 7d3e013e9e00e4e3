"""The jobs that record into results.json (+ results.md, results.png): the op matrix, the large-shape check,
the end-to-end training step, a profiler trace, and rewriting a report from its JSON."""
from __future__ import annotations

import os

from hf_fusedce.cli.bench.registry import (BadOption, case_of, common_options, dtype_keys_of, impls_of, ints_of,
                                           job, shapes_of)

_OUT = "hf_fusedce_bench/<device>"


def _config(args, session, cuda: bool):
    from hf_fusedce.bench.runner import BenchConfig

    return BenchConfig(warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
                       repeats=args.repeats if args.repeats is not None else (10 if cuda else 3),
                       max_seconds=args.max_seconds, ref=args.ref, seed=args.seed, deadline=session.deadline)


def _time_budget(p):
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="after this many seconds, record the remaining measurements as skipped and write the "
                        "report (keeps a run inside a hard time limit)")


def _op_options(p):
    from hf_fusedce.bench.impls import IMPLS

    common_options(p, _OUT)
    p.add_argument("--shapes", default=None,
                   help="comma list of names (llama3-8b, qwen2.5-7b, gemma2-2b, d2048-v32k, cpu-d256-v16k, "
                        "cpu-d512-v32k) or DxV (512x32000); default: on CUDA the heads of Llama-3-8B, Qwen2.5-7B, "
                        "Gemma-2-2B and D=2048 V=32000, on CPU two small ones")
    p.add_argument("--n", default=None, help="comma list of token counts (default CUDA 4096,8192,16384,65536; "
                                             "CPU 512,1024)")
    p.add_argument("--impls", default=None, help="comma list from: " + ", ".join(IMPLS))
    p.add_argument("--dtype", default=None,
                   help="comma list of bf16, amp-bf16 (fp32 weights + bf16 autocast), fp32 "
                        "(default CUDA bf16,amp-bf16; CPU fp32)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default CUDA 10, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default CUDA 2, CPU 1)")
    p.add_argument("--max-seconds", type=float, default=3.0,
                   help="stop timing an impl after this long, once 3 repeats are done (default 3)")
    p.add_argument("--ref", choices=("min", "all", "none"), default="min",
                   help="float64 reference errors at the smallest N of each shape (min), every N, or none")
    _time_budget(p)


@job("op", "the op matrix: shapes x N x dtype x implementation, time and memory vs stock, peers and the "
           "3-GEMM floor", _op_options)
def op(args, session) -> int:
    from hf_fusedce.bench.runner import run_matrix
    from hf_fusedce.bench.shapes import DEFAULT_DTYPES, DTYPE_MODES, default_ns, default_shapes

    device = session.device
    shapes = shapes_of(args.shapes) or default_shapes(device)
    ns = ints_of(args.n) or default_ns(device)
    impls = impls_of(args.impls)
    modes = [DTYPE_MODES[k] for k in dtype_keys_of(args.dtype) or DEFAULT_DTYPES.get(device.type, ("fp32",))]
    run_matrix(shapes, ns, modes, impls, device, _config(args, session, device.type == "cuda"),
               session.sink(args.out), explicit=bool(args.impls))
    return 0


def _verify_options(p):
    common_options(p, _OUT)
    p.add_argument("--at", action="append", default=None, metavar="SHAPE:N",
                   help="case to check (repeatable), e.g. qwen2.5-7b:16384 (default: N*V > 2^31 on CUDA, "
                        "smaller on CPU)")
    p.add_argument("--impls", default=None, help="comma list of implementations (default: ours)")
    _time_budget(p)


@job("verify", "bf16 correctness against float64 at large shapes (N*V > 2^31 on CUDA)", _verify_options)
def verify(args, session) -> int:
    from hf_fusedce.bench.impls import IMPLS
    from hf_fusedce.bench.runner import log
    from hf_fusedce.bench.verify import run_verify

    cases = [case_of(c) for c in args.at] if args.at else None
    impls = impls_of(args.impls) if args.impls else [i for i in IMPLS.values() if i.kind == "ours"]
    sink = session.sink(args.out)
    run_verify(session.device, impls, sink, cases=cases, seed=args.seed, explicit=bool(args.impls),
               out_of_time=session.out_of_time)
    failed = sorted({r["impl"] + "@" + r["shape"] for r in sink.records
                     if r.get("record") == "verify" and r.get("pass") is False})
    if failed:
        log(f"[verify] FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def _e2e_options(p):
    common_options(p, _OUT)
    p.add_argument("--dtype", dest="e2e_dtype", default=None, help="dtype modes (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seq", dest="e2e_seq", type=int, default=None,
                   help="sequence length timed (default CUDA 4096, CPU 1024)")
    p.add_argument("--max-seq", dest="e2e_max_seq", type=int, default=None,
                   help="cap of the longest-sequence search (default CUDA 262144, CPU 8192)")
    p.add_argument("--repeats", dest="e2e_repeats", type=int, default=3,
                   help="timed steps after the warm-up step (default 3)")
    p.add_argument("--no-search", dest="e2e_no_search", action="store_true", help="skip the longest-sequence search")
    p.add_argument("--no-grad-ckpt", dest="e2e_no_grad_ckpt", action="store_true",
                   help="disable gradient checkpointing")
    p.add_argument("--budget-mib", dest="e2e_budget_mib", type=float, default=None,
                   help="memory budget that defines 'fits' (CPU default 512 MiB; CUDA default: the device, OOM)")
    _time_budget(p)


@job("e2e", "one training step of a Llama-3.2-1B-shaped model (CPU: a tiny one), stock vs patched, and the "
            "longest sequence that fits", _e2e_options)
def e2e(args, session) -> int:
    from hf_fusedce.bench.e2e import run_e2e
    from hf_fusedce.bench.shapes import DTYPE_MODES

    keys = dtype_keys_of(args.e2e_dtype) or (["bf16"] if session.device.type == "cuda" else ["fp32"])
    run_e2e(session.device, [DTYPE_MODES[k] for k in keys], session.sink(args.out), seq=args.e2e_seq,
            grad_ckpt=not args.e2e_no_grad_ckpt, search=not args.e2e_no_search, max_seq=args.e2e_max_seq,
            repeats=max(1, args.e2e_repeats),
            budget_bytes=None if args.e2e_budget_mib is None else int(args.e2e_budget_mib * 2**20),
            seed=args.seed, out_of_time=session.out_of_time)
    return 0


def _profile_options(p):
    common_options(p, _OUT)
    p.add_argument("--at", default=None, metavar="SHAPE:N",
                   help="where to profile (default CUDA llama3-8b:8192 bf16; CPU cpu-d256-v16k:512 fp32)")
    p.add_argument("--impl", default=None, help="implementation (default ours-triton on CUDA, else ours-torch)")
    p.add_argument("--dtype", default=None, help="one dtype mode (default CUDA bf16, CPU fp32)")


@job("profile", "a torch.profiler chrome trace of one implementation at one shape", _profile_options)
def profile(args, session) -> int:
    from hf_fusedce.bench.impls import IMPLS
    from hf_fusedce.bench.profiling import profile_impl
    from hf_fusedce.bench.runner import log
    from hf_fusedce.bench.shapes import DTYPE_MODES, GPU_SHAPES, default_ns, default_shapes

    device, cuda = session.device, session.device.type == "cuda"
    if args.impl and args.impl not in IMPLS:
        raise BadOption(f"unknown impl {args.impl!r}; choose from {', '.join(IMPLS)}")
    shape, n = case_of(args.at) if args.at else \
        ((GPU_SHAPES["llama3-8b"], 8192) if cuda else (default_shapes(device)[0], default_ns(device)[0]))
    (key,) = (dtype_keys_of(args.dtype) or ["bf16" if cuda else "fp32"])[:1]
    names = [args.impl] if args.impl else (["ours-triton", "ours-torch"] if cuda else ["ours-torch"])
    for name in names:
        fn = IMPLS[name].resolve(device, explicit=bool(args.impl))
        if not isinstance(fn, str):
            break
        log(f"[profile] {name}: {fn}")
    else:
        return 1
    try:
        session.written += profile_impl(IMPLS[name], fn, shape, n, DTYPE_MODES[key], device,
                                        session.out_dir(args.out))
    except Exception as err:  # noqa: BLE001 - a failed trace is reported, the run's other jobs still write
        log(f"[profile] failed: {type(err).__name__}: {err}")
        return 1
    return 0


def _report_options(p):
    p.add_argument("json", metavar="RESULTS_JSON", help="a results.json written by `hf-fusedce bench op`")
    p.add_argument("--out", default=None, help="output folder (default: the JSON's folder)")


@job("report", "rewrite results.md and results.png from an existing results.json", _report_options)
def rewrite_report(args, session) -> int:
    from hf_fusedce.bench import report

    doc = report.load(args.json)
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out, exist_ok=True)
    report.annotate(doc["records"])
    session.written += [report.write_markdown(doc, out), report.write_plot(doc, out)]
    return 0

