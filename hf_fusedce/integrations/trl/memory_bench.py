"""Peak memory of TRL trainers, stock vs on hf_fusedce's head, each run in its own process.

One run: a tiny Llama (1 layer, hidden 32) with a large vocabulary, examples from the shipped demo data
(max_length 64), `--batch` 8 per step, `--steps` optimizer steps (2; the docs table: 1), CPU float32;
`trainer.train()` runs inside hf_fusedce.memory's live-tensor tracker, so the reading is the peak of tensor bytes
allocated above the start of training (activations, logits, gradients, optimizer state; deterministic,
independent of the allocator). "fused" patches
the policy (and the reference model / teacher) before building the trainer; "stock" does not patch.

    python -m hf_fusedce.integrations.trl.memory_bench --vocab 151936 --steps 1 --jobs 3 --out model_cards/trl_memory \
        --docs docs/trl.md
    python -m hf_fusedce.integrations.trl.memory_bench --vocab 64000 --runs orpo:stock orpo:fused  # JSON lines
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import warnings

TRAINERS = ("orpo", "cpo-simpo", "gkd", "online-dpo", "cpo", "sft", "dpo", "kto", "grpo")
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} "
                 "[/INST]{% else %}{% generation %} {{ message['content'] }}{{ eos_token }}{% endgeneration %}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}")
COMMON = dict(learning_rate=1e-3, logging_steps=1, report_to=[],
              save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, bf16=False)


def _tokenizer(records):
    from ...demo.data import chat_to_text
    from ...demo.tokenizer import train_bpe_tokenizer
    tok = train_bpe_tokenizer([chat_to_text(r)["text"] for r in records], 512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _model(tok, vocab, seed=0):
    from ...testing import tiny_llama
    return tiny_llama(vocab, seed=seed, num_hidden_layers=1, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _data(name, records):
    from datasets import Dataset
    n = len(records)

    def answer(i):  # two answers: longer completions, as in real preference data
        return " " + records[i % n]["messages"][1]["content"] + " " + records[(i + 3) % n]["messages"][1]["content"]

    if name in ("grpo", "online-dpo"):  # on-policy: prompts only, the completions are generated
        return Dataset.from_list([{"prompt": r["messages"][0]["content"]} for r in records])
    if name in ("sft", "gkd"):  # chat records: GKD distills the teacher on their assistant turns
        return Dataset.from_list([{"messages": r["messages"]} for r in records])
    if name == "kto":
        return Dataset.from_list([{"prompt": r["messages"][0]["content"], "completion": answer(i),
                                   "label": i % 2 == 0} for i, r in enumerate(records)])
    return Dataset.from_list([{"prompt": r["messages"][0]["content"], "chosen": answer(i), "rejected": answer(i + 7)}
                              for i, r in enumerate(records)])


def build(name, tok, vocab, fused, out_dir, records, steps=2, batch=8):
    """The trainer `name` on fresh tiny models (patched first when `fused`)."""
    import hf_fusedce
    model, other = _model(tok, vocab), _model(tok, vocab, seed=1)
    if fused:
        hf_fusedce.patch(model), hf_fusedce.patch(other)
    data = _data(name, records[:batch * steps])
    common = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, **COMMON)
    if name == "sft":
        from trl import SFTConfig, SFTTrainer
        return SFTTrainer(model=model, args=SFTConfig(max_length=64, **common), train_dataset=data,
                          processing_class=tok)
    if name in ("dpo", "kto"):
        import trl
        config, cls = (trl.DPOConfig, trl.DPOTrainer) if name == "dpo" else (trl.KTOConfig, trl.KTOTrainer)
        return cls(model=model, ref_model=other, args=config(max_length=64, **common), train_dataset=data,
                   processing_class=tok)
    if name == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOTrainer(model=model, args=ORPOConfig(max_length=64, **common), train_dataset=data,
                           processing_class=tok)
    if name.startswith("cpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        loss = "simpo" if name == "cpo-simpo" else "sigmoid"
        return CPOTrainer(model=model, args=CPOConfig(max_length=64, loss_type=loss, cpo_alpha=0.5 if loss == "simpo"
                                                      else 1.0, **common), train_dataset=data, processing_class=tok)
    if name == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        return GKDTrainer(model=model, teacher_model=other, args=GKDConfig(max_length=64, lmbda=0.0, beta=0.5,
                                                                           **common),
                          train_dataset=data, processing_class=tok)
    if name == "grpo":  # beta=0: no reference model
        from trl import GRPOConfig, GRPOTrainer
        args = GRPOConfig(num_generations=2, max_completion_length=32, beta=0.0, **common)
        return GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=data,
                           processing_class=tok)
    if name == "online-dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
        args = OnlineDPOConfig(max_new_tokens=32, max_length=64, **common)
        return OnlineDPOTrainer(model=model, ref_model=other, reward_funcs=_length_reward, args=args,
                                train_dataset=data, processing_class=tok)
    raise ValueError(f"unknown trainer {name!r}; choose among {TRAINERS}")


def _length_reward(completions, **kwargs):
    return [float(len(c)) / 10.0 for c in completions]


def measure(name: str, mode: str, vocab: int, out_dir: str, steps: int = 2, batch: int = 8) -> dict:
    """One run in this process: {trainer, mode, vocab, peak_bytes, largest_shape, loss}."""
    import torch

    from ...demo.data import make_sft_records
    from ...memory import LiveTensorTracker
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    records = make_sft_records(n=24, seed=0)
    trainer = build(name, _tokenizer(records), vocab, mode == "fused", os.path.join(out_dir, f"{name}-{mode}"),
                    records, steps, batch)
    with LiveTensorTracker() as tracker:
        result = trainer.train()
    return {"trainer": name, "mode": mode, "vocab": vocab, "peak_bytes": tracker.peak_bytes,
            "largest_shape": list(tracker.largest_shape), "loss": result.training_loss}


def run_isolated(runs, vocab: int, out_dir: str, steps: int = 2, batch: int = 8, timeout: int = 900) -> list[dict]:
    """`measure` of each "trainer:mode" in `runs`, one after the other in one fresh Python process."""
    cmd = [sys.executable, "-m", "hf_fusedce.integrations.trl.memory_bench", "--vocab", str(vocab), "--work",
           out_dir, "--steps", str(steps), "--batch", str(batch), "--runs", *runs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(runs)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"trainer"')]


def table(vocab: int, trainers, work: str, jobs: int = 1, steps: int = 2, batch: int = 8, out: str | None = None):
    """Every trainer's stock and fused run, each in its own process (`jobs` processes at a time: the readings are
    tensor bytes, which processes running side by side do not change). With `out`, the results so far are
    written each time a trainer's pair completes."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import torch
    import transformers
    import trl
    result = {"vocab": vocab, "steps": steps, "batch": batch, "date": datetime.date.today().isoformat(),
              "device": f"cpu ({platform.machine()})", "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl.__version__, "rows": []}
    done = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_isolated, [f"{name}:{mode}"], vocab, work, steps, batch): (name, mode)
                   for name in trainers for mode in ("stock", "fused")}
        for future in as_completed(futures):
            name, mode = futures[future]
            done[(name, mode)] = future.result()[0]
            if (name, "stock") in done and (name, "fused") in done:
                result["rows"].append(_row(name, done[(name, "stock")], done[(name, "fused")]))
                if out:
                    write(result, out)
    result["rows"].sort(key=lambda r: trainers.index(r["trainer"]))
    return result


def _row(name, stock, fused) -> dict:
    return {"trainer": name, "stock_mib": stock["peak_bytes"] / 2**20, "fused_mib": fused["peak_bytes"] / 2**20,
            "ratio": fused["peak_bytes"] / stock["peak_bytes"], "stock_loss": stock["loss"],
            "fused_loss": fused["loss"]}


# Every TRL 1.16 trainer: (name, what runs on hf_fusedce's head, memory_bench key or None, the test that proves it)
T = "tests/integrations/"
TRAINER_TABLE = (
    ("SFT", "fused: TRL's fused-LM-head protocol (per-token log-probs, entropy, top-1)", "sft",
     T + "test_trl_sft.py"),
    ("DPO", "fused: the protocol, policy and reference model", "dpo", T + "test_trl_preference.py"),
    ("KTO", "fused: the protocol, policy and reference model", "kto", T + "test_trl_preference.py"),
    ("GRPO", "fused: the protocol (log-probs, entropy, temperature)", "grpo", T + "test_trl_preference.py"),
    ("RLOO", "fused: the protocol, policy and reference model", None, T + "test_trl_preference.py"),
    ("Distillation", "fused: `_chunked_divergence_loss` on the fused distillation op", None,
     T + "test_trl_distillation.py"),
    ("ORPO (experimental)", "fused: `concatenated_forward` (log-probs, NLL on chosen, mean logits)", "orpo",
     T + "test_trl_experimental.py"),
    ("CPO sigmoid / hinge / IPO / AlphaPO (experimental)", "fused: `concatenated_forward` (as ORPO)", "cpo",
     T + "test_trl_experimental.py"),
    ("CPO SimPO (experimental)", "fused: `concatenated_forward` (length-normalised log-probs)", "cpo-simpo",
     T + "test_trl_experimental.py"),
    ("GKD (experimental)", "fused: `compute_loss` on the fused distillation op (teacher patched too)", "gkd",
     T + "test_trl_experimental.py"),
    ("Online DPO (experimental)", "fused: `_forward` (completion log-probs, policy and reference)", "online-dpo",
     T + "test_trl_experimental.py"),
    ("GMPO, BEMA DPO (experimental)", "subclasses of GRPO / DPO: their protocol calls; not run here", None, "none"),
    ("async GRPO, async distillation (experimental)", "speak the protocol; need a vLLM server, not run here",
     None, "none"),
    ("GOLD, TPO, SDPO, SDFT, A2PO, IW-OPD, server distillation (experimental)",
     "not fused: full logits in their own loss code; a one-time warning for a patched model", None,
     T + "test_trl_experimental.py"),
)
MARK_START, MARK_END = "<!-- trl-trainer-table: start -->", "<!-- trl-trainer-table: end -->"


def render_table(result: dict) -> str:
    """The docs table (every trainer) with the measured rows of `result` (results.json)."""
    measured = {r["trainer"]: r for r in result["rows"]}
    lines = [f"Peak tensor memory above the start of training at V={result['vocab']}, {result['steps']} optimizer "
             f"step(s) of batch {result['batch']} ({result['device']}, "
             f"{result['date']}, torch {result['torch']}, transformers {result['transformers']}, trl {result['trl']}; "
             "`python -m hf_fusedce.integrations.trl.memory_bench`; stock = not patched, TRL's own head or logits):",
             "", "| trainer | on hf_fusedce's head | stock MiB | fused MiB | fused / stock | test |",
             "|---|---|---|---|---|---|"]
    for name, what, key, test in TRAINER_TABLE:
        r = measured.get(key)
        figures = f"{r['stock_mib']:.0f} | {r['fused_mib']:.0f} | {r['ratio']:.2f}" if r else "not measured | - | -"
        lines.append(f"| {name} | {what} | {figures} | {test if test == 'none' else f'`{test}`'} |")
    return "\n".join(lines)


def write(result: dict, out: str, docs: str | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| bench key | stock MiB | fused MiB | fused / stock | stock loss | fused loss |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['trainer']} | {r['stock_mib']:.1f} | {r['fused_mib']:.1f} | {r['ratio']:.3f} | "
              f"{r['stock_loss']:.6f} | {r['fused_loss']:.6f} |" for r in result["rows"]]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(render_table(result) + "\n\nEach run in its own process:\n\n" + "\n".join(lines) + "\n")
    if docs:
        replace_docs_table(docs, render_table(result))


def replace_docs_table(path: str, table: str) -> None:
    text = open(path).read()
    head, rest = text.split(MARK_START)
    _, tail = rest.split(MARK_END)
    with open(path, "w") as f:
        f.write(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--trainers", nargs="*", default=list(TRAINERS))
    parser.add_argument("--out", default="model_cards/trl_memory")
    parser.add_argument("--docs", default=None, help="also rewrite the table in this page (docs/trl.md)")
    parser.add_argument("--work", default=None, help="trainers' output_dir (default: a temporary folder)")
    parser.add_argument("--render", action="store_true", help="re-render from OUT/results.json, measure nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", nargs="*", metavar="TRAINER:MODE",
                        help="measure these runs in this process, one JSON line each (mode: stock or fused)")
    args = parser.parse_args(argv)
    import tempfile
    work = args.work or tempfile.mkdtemp()
    if args.runs:
        for run in args.runs:
            name, mode = run.split(":")
            print(json.dumps(measure(name, mode, args.vocab, work, args.steps, args.batch)), flush=True)
        return
    if args.render:
        with open(os.path.join(args.out, "results.json")) as f:
            write(json.load(f), args.out, args.docs)
        return
    write(table(args.vocab, list(args.trainers), work, args.jobs, args.steps, args.batch, args.out), args.out,
          args.docs)


if __name__ == "__main__":
    main()
