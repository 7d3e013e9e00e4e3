"""The jobs that write their own tables: real model heads, distillation, tensor parallel, masked-LM heads, and
the peak memory of a whole training step."""
from __future__ import annotations

import json
import os

from hf_fusedce.cli.bench.registry import (BadOption, common_options, dtype_keys_of, impls_of, ints_of, job,
                                           shapes_of)


def _real_heads_options(p):
    common_options(p, "model_cards/benchmarks/<device>/real-heads")
    p.add_argument("--shapes", default=None,
                   help="comma list of heads (default qwen2.5-0.5b, llama3.2-1b, qwen2.5-7b, gemma2-2b-softcap) "
                        "or DxV")
    p.add_argument("--n", default=None, help="comma list of token counts (default 1024,4096,16384; 4096 first)")
    p.add_argument("--dtype", default=None, help="comma list of fp32, bf16 (default both)")
    p.add_argument("--impls", default=None, help="comma list of implementations (default ours, stock, peers, floors)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after the memory/warm-up round (default 2)")
    p.add_argument("--peer-rounds", type=int, default=None, metavar="K",
                   help="at most K timed rounds for the peers (TRL, torch, Liger, CCE); default: --rounds")
    p.add_argument("--gemm-floor", action="store_true", help="also time the blocked N x D x V GEMM rate")
    p.add_argument("--ref", choices=("min", "all", "none"), default="min",
                   help="float64 reference errors at the smallest N of each shape (min), every N, or none")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="after this many seconds, record the remaining cells as skipped and write the report")


@job("real-heads", "the heads of Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-7B and Gemma-2-2B (softcap 30) at N "
                   "1024/4096/16384, fp32 and bf16, implementations interleaved", _real_heads_options)
def real_heads(args, session) -> int:
    from hf_fusedce.bench import report
    from hf_fusedce.bench.impls import parse_impls
    from hf_fusedce.bench.real_heads import DEFAULT_IMPLS, cpu_plan_table, cuda_model_table, run_cells
    from hf_fusedce.bench.runner import BenchConfig, environment
    from hf_fusedce.bench.shapes import REAL_HEADS, real_heads_cells

    device = session.device
    shapes, ns, dtypes = shapes_of(args.shapes), ints_of(args.n), dtype_keys_of(args.dtype)
    impls = impls_of(args.impls) if args.impls else parse_impls(",".join(DEFAULT_IMPLS))
    out = args.out or _real_heads_out(device)
    sink = report.ResultSink(out, session.command, environment(device))
    cells = real_heads_cells(shapes, ns, dtypes)
    with open(os.path.join(out, "plans.md"), "w") as f:
        f.write(cpu_plan_table(cells) + "\n" + cuda_model_table(shapes or list(REAL_HEADS.values())))
    cfg = BenchConfig(ref=args.ref, seed=args.seed, deadline=session.deadline)
    run_cells(cells, impls, device, cfg, sink, rounds=max(0, args.rounds), explicit=bool(args.impls),
              gemm_floor=args.gemm_floor, peer_rounds=args.peer_rounds)
    session.written += sink.finish() + [os.path.join(out, "plans.md")]
    return 0


def _sweep_n_options(p):
    from hf_fusedce.bench import sweep_n

    common_options(p, "model_cards/benchmarks/<device>/sweep-n")
    sweep_n.add_arguments(p)


@job("sweep-n", "time / 3-GEMM floor and memory against N (512 ... 1M tokens) at Qwen2.5-0.5B's and Llama-3.2-1B's "
                "heads, ours and peers; the hidden size cut above --full-d-max-n", _sweep_n_options)
def sweep_n(args, session) -> int:
    from hf_fusedce.bench import report
    from hf_fusedce.bench import sweep_n as sweep
    from hf_fusedce.bench.runner import BenchConfig, environment

    try:
        cfg = sweep.config_of(args)
    except ValueError as err:
        raise BadOption(str(err)) from err
    out = args.out or os.path.join("model_cards", "benchmarks", session.device.type, "sweep-n")
    sink = report.ResultSink(out, session.command, environment(session.device))
    sweep.run(cfg, session.device, BenchConfig(seed=args.seed, deadline=session.deadline), sink)
    sink.write_json()
    session.written += [os.path.join(out, report.JSON_NAME), *sweep.write_report(sink.doc, out)]
    return 0


def _real_heads_out(device) -> str:
    return os.path.join("model_cards", "benchmarks", device.type, "real-heads")


def _e2e_rss_options(p):
    common_options(p, "model_cards/benchmarks/<device>/real-heads")
    p.add_argument("seqs", metavar="SEQS", help="comma-separated token counts, e.g. 4096,16384")
    p.add_argument("--steps", type=int, default=2, help="steps per variant (default 2)")
    p.add_argument("--limit-gib", type=float, default=16.0, help="address-space limit of each child (default 16; 0: "
                                                                 "none)")


@job("e2e-rss", "one training step of a 2-layer Qwen2.5-0.5B-shaped model (V=151936 tied, fp32) per token count, "
                "stock and patched each in a subprocess: peak RSS, step time, OOM reported as such", _e2e_rss_options)
def e2e_rss(args, session) -> int:
    from hf_fusedce.bench.e2e import rss
    from hf_fusedce.bench.runner import environment, log

    seqs = ints_of(args.seqs)
    if not seqs:
        raise BadOption("SEQS: give at least one token count, e.g. 4096")
    out = args.out or _real_heads_out(session.device)
    os.makedirs(out, exist_ok=True)
    recs = rss.run(seqs, steps=args.steps, limit_gib=args.limit_gib or None, seed=args.seed, log=log)
    with open(os.path.join(out, "e2e_rss.json"), "w") as f:
        json.dump({"command": session.command, "environment": environment(session.device), "records": recs}, f,
                  indent=1)
    with open(os.path.join(out, "e2e_rss.md"), "w") as f:
        f.write(rss.markdown(recs))
    session.written += [os.path.join(out, "e2e_rss.json"), os.path.join(out, "e2e_rss.md")]
    return 0


def _distill_options(p):
    common_options(p, "hf_fusedce_bench/distill-<device>")
    p.add_argument("--shapes", default=None, help="comma list of DxV (default 512x32000)")
    p.add_argument("--n", default=None, help="comma list of token counts (default 4096)")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default fp32)")
    p.add_argument("--beta", default="0.0", help="comma list of beta (0 KL(t||s), 1 KL(s||t))")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature")
    p.add_argument("--teacher-dim", type=int, default=None, help="teacher hidden size (default D)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")


@job("distill", "the distillation head: ours vs TRL's chunked divergence vs both models' logits", _distill_options)
def distill(args, session) -> int:
    from hf_fusedce.bench.distill import run

    shapes_of(args.shapes), ints_of(args.n)  # refuse a bad value before any work
    return run(args, session.device, session.command)


def _tp_options(p):
    common_options(p, "hf_fusedce_bench/tp-cpu")
    p.add_argument("--shapes", default=None, help="one DxV (default 256x16000)")
    p.add_argument("--n", default=None, help="token count (default 2048)")
    p.add_argument("--tp", default="1,2,4", help="comma list of tensor-parallel sizes (default 1,2,4)")
    p.add_argument("--tp-threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")


@job("tp", "the vocab-parallel head on tensor-parallel CPU gloo ranks (one process per rank)", _tp_options)
def tp(args, session) -> int:
    from hf_fusedce.bench.tp import run

    shapes_of(args.shapes), ints_of(args.n), ints_of(args.tp)
    return run(args, session.device, session.command)


def _mlm_options(p):
    common_options(p, "hf_fusedce_bench/mlm")
    p.add_argument("--shapes", default=None, help="comma list of DxV (default 768x250002: XLM-R's head)")
    p.add_argument("--n", default=None, help="comma list of positions (default 1024)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3)")


@job("mlm", "a masked-LM head at 15%% masking, stock vs fused", _mlm_options)
def mlm(args, session) -> int:
    from hf_fusedce.bench.mlm_head import run_bench

    return run_bench(args, session.device, shapes_of(args.shapes), ints_of(args.n), session.command)
