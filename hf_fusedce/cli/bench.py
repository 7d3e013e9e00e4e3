"""`hf-fusedce bench`: time and memory of the loss head, ours vs stock vs peers vs the 3-GEMM floor.

One process, one run: the op matrix (shapes x N x dtype x implementation), optionally the large-shape
correctness check (--verify), the end-to-end training step (--e2e) and a profiler trace (--profile).
Writes results.json (one record per measurement), results.md and results.png into --out.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def register(subparsers):
    p = subparsers.add_parser(
        "bench", help="benchmark the fused loss head against stock, peers and the GEMM floor",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--shapes", default=None,
                   help="comma list of names (llama3-8b, qwen2.5-7b, gemma2-2b, d2048-v32k, cpu-d256-v16k, "
                        "cpu-d512-v32k) or DxV (512x32000); default: the issue-5 matrix on CUDA, small on CPU")
    p.add_argument("--n", default=None, help="comma list of token counts (default CUDA 4096,8192,16384,65536; "
                                             "CPU 512,1024)")
    p.add_argument("--impls", default=None, help="comma list from: " + _impl_names())
    p.add_argument("--dtype", default=None,
                   help="comma list of bf16, amp-bf16 (fp32 weights + bf16 autocast), fp32 "
                        "(default CUDA bf16,amp-bf16; CPU fp32)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default CUDA 10, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default CUDA 2, CPU 1)")
    p.add_argument("--max-seconds", type=float, default=3.0,
                   help="stop timing an impl after this long, once 3 repeats are done (default 3)")
    p.add_argument("--ref", choices=("min", "all", "none"), default="min",
                   help="float64 reference errors at the smallest N of each shape (min), every N, or none")
    p.add_argument("--out", default=None, help="output folder (default hf_fusedce_bench/<device>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="after this many seconds, record the remaining measurements as skipped and write the "
                        "report (keeps a run inside a hard time limit)")
    p.add_argument("--skip-matrix", action="store_true", help="skip the op matrix (only --e2e/--verify/--profile)")
    p.add_argument("--matrix", choices=("default", "real-heads"), default="default",
                   help="real-heads: the heads of Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-7B, Gemma-2-2B (softcap 30) at "
                        "N 1024/4096/16384, fp32 and bf16, implementations interleaved, N=4096 first; --shapes, "
                        "--n, --dtype, --impls narrow it (default out model_cards/benchmarks/cpu/real-heads)")
    p.add_argument("--peer-rounds", type=int, default=None, metavar="K",
                   help="--matrix real-heads: at most K timed rounds for the peers (TRL, torch, Liger, CCE); "
                        "default: --rounds")
    p.add_argument("--rounds", type=int, default=2,
                   help="--matrix real-heads: timed rounds after the memory/warm-up round (default 2)")
    p.add_argument("--gemm-floor", action="store_true",
                   help="--matrix real-heads: also time the blocked N x D x V GEMM rate (x floor column)")
    p.add_argument("--e2e-rss", default=None, metavar="SEQS",
                   help="one training step of a 2-layer Qwen2.5-0.5B-shaped model (V=151936 tied, fp32) at these "
                        "comma-separated token counts, stock and patched each in a subprocess: peak RSS, step time, "
                        "OOM reported as such (e.g. 4096,16384)")
    p.add_argument("--e2e-rss-steps", type=int, default=2, help="steps per variant for --e2e-rss (default 2)")
    p.add_argument("--e2e-rss-limit-gib", type=float, default=16.0,
                   help="address-space limit of each --e2e-rss child (default 16; 0: none)")
    g = p.add_argument_group("end to end")
    g.add_argument("--e2e", action="store_true",
                   help="also one training step of a Llama-3.2-1B-shaped model (CPU: a tiny one), stock vs patched")
    g.add_argument("--e2e-dtype", default=None, help="dtype modes for --e2e (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--e2e-seq", type=int, default=None, help="sequence length timed (default CUDA 4096, CPU 1024)")
    g.add_argument("--e2e-max-seq", type=int, default=None,
                   help="cap of the longest-sequence search (default CUDA 262144, CPU 8192)")
    g.add_argument("--e2e-repeats", type=int, default=3, help="timed steps after the warm-up step (default 3)")
    g.add_argument("--e2e-no-search", action="store_true", help="skip the longest-sequence search")
    g.add_argument("--e2e-no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    g.add_argument("--e2e-budget-mib", type=float, default=None,
                   help="memory budget that defines 'fits' (CPU default 512 MiB; CUDA default: the device, OOM)")
    g = p.add_argument_group("correctness and profiling")
    g.add_argument("--verify", action="store_true",
                   help="bf16 correctness vs float64 at large shapes (N*V > 2^31 on CUDA), ours by default")
    g.add_argument("--verify-at", action="append", default=None, metavar="SHAPE:N",
                   help="case for --verify (repeatable), e.g. qwen2.5-7b:16384")
    g.add_argument("--profile", action="store_true", help="write a torch.profiler chrome trace of ours")
    g.add_argument("--profile-at", default=None, metavar="SHAPE:N",
                   help="where to profile (default CUDA llama3-8b:8192 bf16; CPU the first shape and N)")
    g.add_argument("--profile-impl", default=None, help="impl to profile (default ours-triton on CUDA, else ours-torch)")
    g = p.add_argument_group("distillation (--op distill: ours vs TRL's chunked divergence vs materialized)")
    g.add_argument("--op", choices=("ce", "distill", "tp", "mlm"), default="ce",
                   help="ce: the cross-entropy head (default); distill: fused_linear_distillation (default N 4096, "
                        "shape 512x32000, fp32); tp: the vocab-parallel head on CPU gloo ranks (see --tp); mlm: a "
                        "masked-LM head at 15%% masking, stock vs fused (default N 1024, shape 768x250002: XLM-R)")
    g.add_argument("--beta", default="0.0", help="--op distill: comma list of beta (0 KL(t||s), 1 KL(s||t))")
    g.add_argument("--temperature", type=float, default=1.0, help="--op distill: temperature")
    g.add_argument("--teacher-dim", type=int, default=None, help="--op distill: teacher hidden size (default D)")
    g = p.add_argument_group("tensor parallel (--op tp: vocab-parallel head, one gloo process per rank, CPU)")
    g.add_argument("--tp", default="1,2,4", help="--op tp: comma list of tensor-parallel sizes (default 1,2,4)")
    g.add_argument("--tp-threads", type=int, default=1, help="--op tp: torch threads per rank (default 1)")
    g = p.add_argument_group("time and memory against N (--sweep-n: its options are those of `bench sweep-n`)")
    g.add_argument("--sweep-n", action="store_true",
                   help="time / floor and memory vs N (512 ... 1M) at Qwen2.5-0.5B's and Llama-3.2-1B's heads, "
                        "ours and peers; default out model_cards/benchmarks/cpu/sweep-n")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="only rewrite results.md and results.png from an existing results.json")
    p.set_defaults(func=run)
    return p


def _impl_names() -> str:
    from hf_fusedce.bench.impls import IMPLS

    return ", ".join(IMPLS)


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _case(text: str):
    from hf_fusedce.bench.shapes import parse_shape

    shape, _, n = text.rpartition(":")
    if not shape or not n.isdigit():
        raise ValueError(f"expected SHAPE:N such as llama3-8b:8192, got {text!r}")
    return parse_shape(shape), int(n)


def default_out(device) -> str:
    import torch

    if device.type == "cuda":
        tag = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    else:
        tag = "cpu"
    return os.path.join("hf_fusedce_bench", tag)


def _command_line(args) -> list[str]:
    """The command as typed when run as `hf-fusedce bench ...`; else rebuilt from the parsed options."""
    if os.path.basename(sys.argv[0]) in ("hf-fusedce", "main.py") and sys.argv[1:2] == ["bench"]:
        return ["hf-fusedce", *sys.argv[1:]]
    cmd = ["hf-fusedce", "bench"]
    for k, v in sorted(vars(args).items()):
        if k in ("func", "command") or v in (None, False) or (k == "max_seconds" and v == 3.0) or \
                (k == "ref" and v == "min") or (k == "seed" and v == 0) or (k == "e2e_repeats" and v == 3) or \
                (k == "op" and v == "ce") or (k == "beta" and v == "0.0") or (k == "temperature" and v == 1.0) or \
                (k == "tp" and v == "1,2,4") or (k == "tp_threads" and v == 1) or (k == "matrix" and v == "default") \
                or (k == "rounds" and v == 2) or (k == "e2e_rss_steps" and v == 2) or (k == "e2e_rss_limit_gib" and v == 16):
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            cmd.append(flag)
        elif isinstance(v, list):
            for item in v:
                cmd += [flag, str(item)]
        else:
            cmd += [flag, str(v)]
    return cmd


def _sweep_argv(args) -> list[str]:
    """The options `bench --sweep-n` shares with the op matrix, as `bench sweep-n` arguments."""
    argv = []
    for name in ("n", "impls", "dtype", "out", "seed", "time_budget", "device", "rounds"):
        value = getattr(args, name)
        if value is not None and not (name == "rounds" and value == 2):
            argv += ["--" + name.replace("_", "-"), str(value)]
    if args.shapes:
        argv += ["--heads", args.shapes]
    return argv


def run(args) -> int:
    from hf_fusedce.bench import report

    if args.sweep_n:
        from hf_fusedce.bench import sweep_n

        sweep_parser = argparse.ArgumentParser(prog="hf-fusedce bench --sweep-n")
        sweep_n.add_arguments(sweep_parser)
        return sweep_n.main(sweep_parser.parse_args(_sweep_argv(args)), _command_line(args))
    if args.from_json:
        doc = report.load(args.from_json)
        out = args.out or os.path.dirname(os.path.abspath(args.from_json))
        os.makedirs(out, exist_ok=True)
        report.annotate(doc["records"])
        print(report.write_markdown(doc, out))
        print(report.write_plot(doc, out))
        return 0

    import torch

    from hf_fusedce.bench.impls import IMPLS, parse_impls
    from hf_fusedce.bench.runner import BenchConfig, environment, log, run_matrix
    from hf_fusedce.bench.shapes import DEFAULT_DTYPES, DTYPE_MODES, default_ns, default_shapes, parse_shape

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device")
        shapes = [parse_shape(s) for s in _csv(args.shapes)] if args.shapes else default_shapes(device)
        ns = [int(x) for x in _csv(args.n)] if args.n else default_ns(device)
        impls = parse_impls(args.impls)
        dtype_keys = _csv(args.dtype) or list(DEFAULT_DTYPES.get(device.type, ("fp32",)))
        for k in dtype_keys + (_csv(args.e2e_dtype) or []):
            if k not in DTYPE_MODES:
                raise ValueError(f"unknown dtype {k!r}; choose from {', '.join(DTYPE_MODES)}")
        modes = [DTYPE_MODES[k] for k in dtype_keys]
        verify_cases = [_case(c) for c in args.verify_at] if args.verify_at else None
        profile_case = _case(args.profile_at) if args.profile_at else None
    except ValueError as err:
        print(f"hf-fusedce bench: {err}", file=sys.stderr)
        return 2
    if args.op == "distill":
        from hf_fusedce.bench.distill import run as run_distill

        return run_distill(args, device, _command_line(args))
    if args.op == "mlm":
        from hf_fusedce.bench.mlm_head import run_bench

        return run_bench(args, device, shapes if args.shapes else None, ns if args.n else None, _command_line(args))
    if args.matrix == "real-heads" or args.e2e_rss:
        return _run_real_heads(args, device, impls if args.impls else None, modes if args.dtype else None,
                               shapes if args.shapes else None, ns if args.n else None)
    if args.op == "tp":
        from hf_fusedce.bench.tp import run as run_tp

        return run_tp(args, device, _command_line(args))
    cuda = device.type == "cuda"
    cfg = BenchConfig(warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
                      repeats=args.repeats if args.repeats is not None else (10 if cuda else 3),
                      max_seconds=args.max_seconds, ref=args.ref, seed=args.seed,
                      deadline=None if args.time_budget is None else time.perf_counter() + args.time_budget)
    out = args.out or default_out(device)
    sink = report.ResultSink(out, _command_line(args), environment(device))
    log(f"[bench] device {sink.doc['environment']['device']}; writing to {out}")

    # Order: the short modes first, the long matrix last, so --time-budget trims the matrix's tail.
    if args.verify:
        from hf_fusedce.bench.verify import run_verify

        v_impls = impls if args.impls else [i for i in IMPLS.values() if i.kind == "ours"]
        run_verify(device, v_impls, sink, cases=verify_cases, seed=args.seed, explicit=bool(args.impls),
                   out_of_time=cfg.out_of_time)
    written = []
    if args.profile:
        written += _profile(args, device, profile_case, shapes, ns, modes, out)
    if args.e2e:
        from hf_fusedce.bench.e2e import run_e2e

        e2e_modes = [DTYPE_MODES[k] for k in (_csv(args.e2e_dtype) or (["bf16"] if cuda else ["fp32"]))]
        run_e2e(device, e2e_modes, sink, seq=args.e2e_seq, grad_ckpt=not args.e2e_no_grad_ckpt,
                search=not args.e2e_no_search, max_seq=args.e2e_max_seq, repeats=max(1, args.e2e_repeats),
                budget_bytes=None if args.e2e_budget_mib is None else int(args.e2e_budget_mib * 2**20),
                seed=args.seed, out_of_time=cfg.out_of_time)
    if not args.skip_matrix:
        run_matrix(shapes, ns, modes, impls, device, cfg, sink, explicit=bool(args.impls))
    written = sink.finish() + written
    for path in written:
        print(path)
    failed = [r for r in sink.records if r.get("record") == "verify" and r.get("pass") is False]
    if failed:
        log(f"[verify] FAILED: {', '.join(sorted({r['impl'] + '@' + r['shape'] for r in failed}))}")
        return 1
    return 0


def _profile(args, device, case, shapes, ns, modes, out) -> list[str]:
    from hf_fusedce.bench.impls import IMPLS
    from hf_fusedce.bench.profiling import profile_impl
    from hf_fusedce.bench.runner import log
    from hf_fusedce.bench.shapes import DTYPE_MODES, GPU_SHAPES

    cuda = device.type == "cuda"
    names = [args.profile_impl] if args.profile_impl else (["ours-triton", "ours-torch"] if cuda else ["ours-torch"])
    for name in names:
        if name not in IMPLS:
            log(f"[profile] unknown impl {name!r}")
            return []
        fn = IMPLS[name].resolve(device, explicit=bool(args.profile_impl))
        if not isinstance(fn, str):
            break
        log(f"[profile] {name}: {fn}")
    else:
        return []
    if case is None:
        case = (GPU_SHAPES["llama3-8b"], 8192) if cuda else (shapes[0], ns[0])
    mode = DTYPE_MODES["bf16"] if cuda else modes[0]
    try:
        return profile_impl(IMPLS[name], fn, case[0], case[1], mode, device, out)
    except Exception as err:  # noqa: BLE001
        log(f"[profile] failed: {type(err).__name__}: {err}")
        return []


def _run_real_heads(args, device, impls, modes, shapes, ns) -> int:
    """--matrix real-heads and/or --e2e-rss: results.json/.md plus plan tables, written as they come."""
    import json

    from hf_fusedce.bench import report
    from hf_fusedce.bench.impls import parse_impls
    from hf_fusedce.bench.real_heads import DEFAULT_IMPLS, cpu_plan_table, cuda_model_table, run_cells
    from hf_fusedce.bench.runner import BenchConfig, environment, log
    from hf_fusedce.bench.shapes import REAL_HEADS, real_heads_cells

    out = args.out or os.path.join("model_cards", "benchmarks", device.type, "real-heads")
    sink = report.ResultSink(out, _command_line(args), environment(device))
    cfg = BenchConfig(ref=args.ref, seed=args.seed,
                      deadline=None if args.time_budget is None else time.perf_counter() + args.time_budget)
    dtypes = [m for m in (args.dtype.split(",") if args.dtype else [])] or None
    cells = real_heads_cells(shapes, ns, [d.strip() for d in dtypes] if dtypes else None)
    written = []
    if args.matrix == "real-heads":
        with open(os.path.join(out, "plans.md"), "w") as f:
            f.write(cpu_plan_table(cells) + "\n" + cuda_model_table(shapes or list(REAL_HEADS.values())))
        written.append(os.path.join(out, "plans.md"))
        run_cells(cells, impls or parse_impls(",".join(DEFAULT_IMPLS)), device, cfg, sink,
                  rounds=max(0, args.rounds), explicit=bool(impls), gemm_floor=args.gemm_floor,
                  peer_rounds=args.peer_rounds)
    if args.e2e_rss:
        from hf_fusedce.bench.e2e import rss as e2e_rss

        seqs = [int(x) for x in args.e2e_rss.split(",") if x.strip()]
        recs = e2e_rss.run(seqs, steps=args.e2e_rss_steps, limit_gib=args.e2e_rss_limit_gib or None, seed=args.seed,
                           log=log)
        with open(os.path.join(out, "e2e_rss.json"), "w") as f:
            json.dump({"command": _command_line(args), "environment": environment(device), "records": recs}, f,
                      indent=1)
        with open(os.path.join(out, "e2e_rss.md"), "w") as f:
            f.write(e2e_rss.markdown(recs))
        written += [os.path.join(out, "e2e_rss.json"), os.path.join(out, "e2e_rss.md")]
    if args.matrix == "real-heads":
        written = sink.finish() + written
    for path in written:
        print(path)
    return 0
