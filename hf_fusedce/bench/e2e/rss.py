"""End to end at a real head: one training step of a Qwen2.5-0.5B-shaped model, stock vs patched, peak RSS.

The model: Qwen2.5-0.5B's config (hidden 896, 14 heads, 2 kv heads, intermediate 4864, V=151936, tied
embeddings) cut to 2 layers, random init, fp32, one sequence of `seq` tokens, AdamW. Each variant runs in its
own subprocess (`python -m hf_fusedce.bench.e2e.rss --worker ...`), so stock's out-of-memory cannot kill the
bench and peak RSS (ru_maxrss of the child) is the variant's alone. The child runs under an address-space limit
(RLIMIT_AS: --limit-gib, lowered to 90% of the RAM available at launch + 2 GiB of never-resident mappings) so
on a shared machine stock fails with an allocation error at the limit instead of waking the kernel's OOM killer;
either way the record says "oom", at which limit, and how much RAM was available.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

QWEN25_05B_2L = dict(hidden_size=896, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=32768, rope_theta=1000000.0)
MODEL_NAME = "Qwen2.5-0.5B-shaped, 2 layers, random init, tied V=151936, fp32"
RAM_SHARE = 0.9  # the child's address-space limit: this share of the RAM available at launch ...
VSZ_SLACK_GIB = 2.0  # ... plus mappings that are never resident (libraries, thread stacks, MKL arenas)


def _worker(variant: str, seq: int, steps: int, seed: int) -> dict:
    import resource

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**QWEN25_05B_2L, use_cache=False)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).float().train()
    if variant == "patched":
        import hf_fusedce

        hf_fusedce.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seed))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        del loss
    return {"step_s": times, "loss": losses, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024, "rss_before_steps_bytes": rss_before, "threads": torch.get_num_threads()}


def run_variant(variant: str, seq: int, steps: int = 1, limit_gib: float | None = 16.0, seed: int = 0,
                timeout_s: float | None = None) -> dict:
    """One child process; returns the record (status ok / oom / error / timeout)."""
    from hf_fusedce.memory import available_host_bytes

    cmd = [sys.executable, "-m", "hf_fusedce.bench.e2e.rss", "--worker", variant, "--seq", str(seq),
           "--steps", str(steps), "--seed", str(seed)]
    avail = available_host_bytes()
    if avail is not None:  # never let the child's memory reach past what is free now: the OOM killer would pick
        ram_limit = round(RAM_SHARE * avail / 2**30 + VSZ_SLACK_GIB, 1)  # a neighbour, or this bench
        limit_gib = min(limit_gib, ram_limit) if limit_gib else ram_limit
    if limit_gib:
        cmd += ["--limit-gib", str(limit_gib)]
    rec = {"record": "e2e_rss", "model": MODEL_NAME, "variant": variant, "seq": seq, "steps": steps,
           "limit_gib": limit_gib, "available_ram_gib_at_launch": None if avail is None else round(avail / 2**30, 1),
           "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**rec, "status": f"timeout after {timeout_s:.0f} s"}
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**rec, "status": "ok", **json.loads(lines[-1])}
    err = proc.stderr.strip().splitlines()[-1:] or [""]
    oom = proc.returncode in (-9, 137) or "can't allocate memory" in proc.stderr or "out of memory" in \
        proc.stderr.lower() or "MemoryError" in proc.stderr
    why = f"limit {limit_gib} GiB address space" if limit_gib else "no limit set"
    status = f"oom ({why}; exit {proc.returncode})" if oom else f"error (exit {proc.returncode}): {err[0][:300]}"
    return {**rec, "status": status}


def run(seqs=(4096, 16384), variants=("patched", "stock"), steps: int = 2, limit_gib: float | None = 16.0,
        seed: int = 0, log=print) -> list[dict]:
    out = []
    for seq in seqs:
        for variant in variants:
            rec = run_variant(variant, seq, steps, limit_gib, seed)
            log(f"[e2e-rss] seq {seq} {variant}: {rec['status']} "
                f"{rec.get('peak_rss_bytes', 0) / 2**30:.2f} GiB, steps {rec.get('step_s')}")
            out.append(rec)
    return out


def markdown(records: list[dict]) -> str:
    lines = [f"### End to end: {MODEL_NAME}, one sequence, AdamW", "",
             "| tokens | variant | status | step s (each step) | peak RSS GiB | loss (step 1) | load 1m |",
             "|---:|---|---|---|---:|---:|---:|"]
    for r in records:
        steps = ", ".join(f"{t:.1f}" for t in r.get("step_s", []))
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in r else "-"
        loss = f"{r['loss'][0]:.4f}" if r.get("loss") else "-"
        lines.append(f"| {r['seq']} | {r['variant']} | {r['status']} | {steps or '-'} | {rss} | {loss} | "
                     f"{r.get('loadavg_1m_before')}-{r.get('loadavg_1m_after', '?')} |")
    return "\n".join(lines) + "\n"


def _main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", choices=("stock", "patched"), default=None)
    p.add_argument("--seq", default="4096,16384")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-gib", type=float, default=16.0)
    p.add_argument("--variants", default="patched,stock")
    p.add_argument("--out", default=None, help="folder for e2e_rss.json and e2e_rss.md")
    a = p.parse_args(argv)
    if a.worker:
        if a.limit_gib:
            import resource

            lim = int(a.limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        print(json.dumps(_worker(a.worker, int(a.seq), a.steps, a.seed)), flush=True)
        return 0
    recs = run([int(s) for s in a.seq.split(",")], variants=tuple(a.variants.split(",")), steps=a.steps, limit_gib=a.limit_gib, seed=a.seed,
               log=lambda m: print(m, file=sys.stderr, flush=True))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "e2e_rss.json"), "w") as f:
            json.dump(recs, f, indent=1)
        with open(os.path.join(a.out, "e2e_rss.md"), "w") as f:
            f.write(markdown(recs))
    print(markdown(recs))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
