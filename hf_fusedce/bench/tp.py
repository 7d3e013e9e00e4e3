"""`hf-fusedce bench tp`: the vocab-parallel head on tp = 1, 2, 4 CPU gloo ranks (one process per rank).

Every rank builds the same inputs, keeps its vocabulary slice of the head (torch's Shard(0) split) and times forward
+ backward of `vocab_parallel_linear_cross_entropy`. Per rank: median time, peak memory of one step (live-tensor
tracker: everything the step allocates, gradients included), and the bytes it hands to all-reduce (payload per
call summed; a ring all-reduce puts about 2 (tp-1)/tp of that on the wire per rank). At tp = 1 the single-device
op is timed in the same process for reference. The dh reduction is measured both ways the design allows: one
all-reduce of N x D at the end (what the op does) against one per chunk of rows (same bytes, more messages).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from hf_fusedce.bench.report import JSON_NAME, MD_NAME, markdown_table, mib


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    v: int
    warmup: int
    repeats: int
    seed: int
    threads: int


def _inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    h = torch.randn(case.n, case.d, generator=g)
    w = torch.randn(case.v, case.d, generator=g) * (2.0 / case.d ** 0.5)
    y = torch.randint(0, case.v, (case.n,), generator=g)
    return h, w, y


@contextmanager
def _count_all_reduce(counter: dict):
    """Counts the all-reduce calls and payload bytes made inside the block (this process only)."""
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counter["calls"] += 1
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield counter
    finally:
        dist.all_reduce = real


def _timed(step, warmup, repeats) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _dh_reduction(case: Case, n_chunks: int, repeats: int) -> dict:
    """One all-reduce of N x D against n_chunks all-reduces of the chunks' rows (same bytes)."""
    dh = torch.randn(case.n, case.d)
    rows = -(-case.n // n_chunks)

    def at_end():
        dist.all_reduce(dh)

    def per_chunk():
        for start in range(0, case.n, rows):
            dist.all_reduce(dh[start:start + rows])

    return {"dh_allreduce_end_s": statistics.median(_timed(at_end, 1, repeats)),
            "dh_allreduce_per_chunk_s": statistics.median(_timed(per_chunk, 1, repeats)),
            "dh_chunks": len(range(0, case.n, rows))}


def _rank_main(rank: int, world: int, port: int, case: Case, out_dir: str):
    from hf_fusedce.memory import measure_peak
    from hf_fusedce.ops import fused_linear_cross_entropy
    from hf_fusedce.ops.planning.chunking import default_budget_bytes, rows_per_chunk
    from hf_fusedce.ops.ce.torch_impl import working_bytes_per_logit
    from hf_fusedce.ops.ce.spec import LossSpec
    from hf_fusedce.ops.vocab_parallel import shard_range, vocab_parallel_linear_cross_entropy

    torch.set_num_threads(case.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    h, w, y = _inputs(case)
    lo, hi = shard_range(case.v, world, rank)
    w_slice = w[lo:hi].clone().requires_grad_()
    del w
    h.requires_grad_()

    def step():
        h.grad = w_slice.grad = None
        vocab_parallel_linear_cross_entropy(h, w_slice, y, vocab_start=lo, vocab_size=case.v,
                                            backend="torch").backward()

    rec = {"tp": world, "rank": rank, "rows": hi - lo, "N": case.n, "D": case.d, "V": case.v,
           "weight_slice_bytes": (hi - lo) * case.d * 4}
    times = _timed(step, case.warmup, case.repeats)
    with _count_all_reduce({"calls": 0, "bytes": 0}) as comm, measure_peak("cpu") as peak:
        step()
    rec.update({"fwd_bwd_s": statistics.median(times), "times_s": [round(t, 4) for t in times],
                "peak_bytes": peak.peak_bytes, "allreduce_calls": comm["calls"], "allreduce_bytes": comm["bytes"],
                "loadavg_1m": round(os.getloadavg()[0], 2)})
    step_rows = rows_per_chunk(case.n, -(-case.v // world), working_bytes_per_logit(LossSpec(), torch.float32),
                               default_budget_bytes(torch.device("cpu")))
    if world > 1:
        rec.update(_dh_reduction(case, -(-case.n // step_rows), case.repeats))
    if world == 1:  # the single-device op, same process, same inputs
        wf = w_slice.detach().clone().requires_grad_()

        def single():
            h.grad = wf.grad = None
            fused_linear_cross_entropy(h, wf, y, backend="torch").backward()

        rec["single_device_fwd_bwd_s"] = statistics.median(_timed(single, case.warmup, case.repeats))
    with open(os.path.join(out_dir, f"tp{world}-rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tp(case: Case, tps: list[int]) -> list[dict]:
    import torch.multiprocessing as mp

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in tps:
            print(f"[bench tp] tp={world} N={case.n} D={case.d} V={case.v}", flush=True)
            mp.start_processes(_rank_main, args=(world, _free_port(), case, tmp), nprocs=world, join=True,
                               start_method="spawn")
            records += [json.load(open(os.path.join(tmp, f"tp{world}-rank{r}.json"))) for r in range(world)]
    return records


TP_COLUMNS = [("tp", "tp", "d"), ("rank", "rank", "d"), ("vocab rows", "rows", "d"), ("fwd+bwd s", "fwd_bwd_s", ".3f"),
              ("peak MiB (step)", "peak_bytes", mib), ("weight slice MiB", "weight_slice_bytes", mib),
              ("all-reduce calls", "allreduce_calls", "d"), ("all-reduce payload MiB", "allreduce_mib", ".2f"),
              ("dh all-reduce: end / per chunk s", "dh", None)]


def _table_rows(records):
    import pandas as pd

    rows = pd.DataFrame(records)
    rows["allreduce_mib"] = rows["allreduce_bytes"] / 2**20
    rows["dh"] = [f"{r['dh_allreduce_end_s']:.4f} / {r['dh_allreduce_per_chunk_s']:.4f} ({r['dh_chunks']} chunks)"
                  if "dh_allreduce_end_s" in r else "-" for r in records]
    return rows


def markdown(doc: dict) -> str:
    env, case = doc["environment"], doc["case"]
    lines = [f"# hf-fusedce bench tp ({env['device']}, {env['date']})", "",
             f"Command: `{' '.join(doc['command'])}`  ",
             f"torch {env['torch']}, transformers {env['transformers']}; gloo ranks on one machine, "
             f"{case['threads']} thread(s) per rank; load before: `{doc['uptime_before']}`; after: "
             f"`{doc['uptime_after']}`", "",
             f"N={case['n']} tokens, D={case['d']}, V={case['v']}, fp32, forward + backward, median of "
             f"{case['repeats']} after {case['warmup']} warm-up.", "",
             markdown_table(_table_rows(doc["records"]), TP_COLUMNS)]
    single = [r["single_device_fwd_bwd_s"] for r in doc["records"] if "single_device_fwd_bwd_s" in r]
    if single:
        lines += ["", f"Single-device op (tp=1 process, same inputs): {single[0]:.3f} s."]
    return "\n".join(lines) + "\n"


def run(args, device, command) -> int:
    from hf_fusedce.bench.distill import _uptime  # the same load line as the distillation bench
    from hf_fusedce.bench.runner import environment
    from hf_fusedce.bench.shapes import parse_shape

    if device.type != "cpu":
        print("hf-fusedce bench tp: CPU gloo ranks only (use --device cpu)")
        return 2
    shape = parse_shape(args.shapes.split(",")[0] if args.shapes else "256x16000")
    case = Case(int(args.n.split(",")[0]) if args.n else 2048, shape.d, shape.v,
                args.warmup if args.warmup is not None else 1, args.repeats or 3, args.seed, args.tp_threads)
    tps = [int(t) for t in args.tp.split(",")]
    doc = {"command": command, "environment": environment(device), "case": asdict(case), "uptime_before": _uptime()}
    doc["records"] = run_tp(case, tps)
    doc["uptime_after"] = _uptime()
    out = args.out or os.path.join("hf_fusedce_bench", "tp-cpu")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, JSON_NAME), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, MD_NAME), "w") as f:
        f.write(markdown(doc))
    print(os.path.join(out, JSON_NAME))
    print(os.path.join(out, MD_NAME))
    return 0
