"""TRL sweep over the family table: SFTTrainer's loss through TRL's fused LM head protocol, per family.

For each causal-LM model type hf.proof can build (tiny random config, float32, training mode): the stock loss
(the model's own forward with labels) and its gradients against
- `trl`: TRL's own head (`add_fused_lm_head`, unpatched model), and
- `ours`: hf_fusedce's head answering the same protocol (`hf_fusedce.patch` + `add_fused_lm_head`),
both read as SFTTrainer reads them: `loss` of the `fused_lm_head=True` call (sum of -log_probs over scored
tokens / their count, plus the router aux loss when the config asks for router logits). Outcome per head:
exact (loss and every gradient within proof.TOL relative), inexact, crash, refused (ours: the patch refuses
the type), and `skipped` when the stock model itself cannot run the tiny batch.

    python -m hf_fusedce.integrations.trl.sweep --out model_cards/trl_sweep [--types llama gemma2 ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings

import torch

SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels, use_cache=False, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _error(loss, grads, stock_loss, stock_grads) -> float:
    """The proof's rule: relative error against max(|stock|, proof.FLOOR) (analytically zero gradients are noise)."""
    from ...hf.proof import FLOOR
    from ...testing import rel_err
    if set(grads) != set(stock_grads):
        return float("inf")
    return max([rel_err(loss, stock_loss, floor=FLOOR)]
               + [rel_err(grads[n], g, floor=FLOOR) for n, g in stock_grads.items()])


def _outcome(fn, stock) -> dict:
    from ...hf.proof import TOL
    try:
        loss, grads = fn()
    except Exception as err:  # noqa: BLE001 - a crash is an outcome of the sweep
        return {"status": "crash", "reason": f"{type(err).__name__}: {str(err)[:200]}"}
    err = _error(loss, grads, *stock)
    return {"status": "exact" if err <= TOL else "inexact", "max_rel_err": err}


def sweep_type(model_type: str) -> dict:
    """{model_type, stock, trl, ours} for one model type."""
    import trl.trainer.utils as tu

    from ...hf import proof
    from .. import patch
    trl_head = getattr(tu.add_fused_lm_head, "__wrapped__", tu.add_fused_lm_head)  # TRL's own function
    row = {"model_type": model_type}
    try:
        model = proof.build(model_type)
        ids, labels = proof.batch(model)
        stock = _loss_and_grads(model, ids, labels)
    except Exception as err:  # noqa: BLE001
        row["stock"] = f"skipped: {type(err).__name__}: {str(err)[:200]}"
        return row
    row["stock"] = "ok"

    def through_trl():
        m = proof.build(model_type)
        trl_head(m, outputs=SFT_OUTPUTS)
        return _loss_and_grads(m, ids, labels, fused_lm_head=True)

    def through_ours():
        m = proof.build(model_type)
        patch(m, backend="torch")
        tu.add_fused_lm_head(m, outputs=SFT_OUTPUTS)  # served by hf_fusedce's head
        return _loss_and_grads(m, ids, labels, fused_lm_head=True)

    row["trl"] = _outcome(through_trl, stock)
    try:
        proof.build(model_type)  # same model the patch would get
        from ...hf.patching import _spec
        _spec(proof.build(model_type), force=False)
    except ValueError as err:
        row["ours"] = {"status": "refused", "reason": str(err)[:200]}
        return row
    row["ours"] = _outcome(through_ours, stock)
    return row


def counts(rows: list[dict], head: str) -> dict:
    out = {}
    for r in rows:
        if r.get("stock") != "ok":
            continue
        status = r[head]["status"]
        out[status] = out.get(status, 0) + 1
    return out


def run(types=None) -> dict:
    from ...hf.proof import causal_lm_types
    types = sorted(types or causal_lm_types())
    rows = []
    for t in types:
        start = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = sweep_type(t)
        row["seconds"] = round(time.time() - start, 2)
        rows.append(row)
    import transformers
    import trl
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "cpu", "float": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "python": platform.python_version(),
        "command": "python -m hf_fusedce.integrations.trl.sweep --out model_cards/trl_sweep",
        "types": len(rows), "skipped_by_stock": sum(r["stock"] != "ok" for r in rows),
        "counts": {"trl": counts(rows, "trl"), "ours": counts(rows, "ours")}, "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = ["# TRL fused LM head protocol: TRL's head vs hf_fusedce's head, per family",
             "", f"{result['date']}, {result['device']} {result['float']}, torch {result['torch']}, "
             f"transformers {result['transformers']}, trl {result['trl']}. Command: `{result['command']}`.", "",
             f"{result['types']} causal-LM model types; {result['skipped_by_stock']} skipped (the stock tiny "
             f"model does not run). Loss and every gradient vs the stock forward, relative error <= 1e-5:", "",
             "| head | " + " | ".join(("exact", "inexact", "crash", "refused")) + " |", "|---|---|---|---|---|"]
    for head in ("trl", "ours"):
        c = result["counts"][head]
        lines.append(f"| {head} | " + " | ".join(str(c.get(k, 0)) for k in ("exact", "inexact", "crash", "refused"))
                     + " |")
    lines += ["", "| model type | TRL's head | hf_fusedce's head |", "|---|---|---|"]
    for r in result["rows"]:
        if r["stock"] != "ok":
            lines.append(f"| {r['model_type']} | {r['stock']} | |")
            continue
        cells = []
        for head in ("trl", "ours"):
            o = r[head]
            cells.append(o["status"] + (f" ({o['max_rel_err']:.1e})" if "max_rel_err" in o else "")
                         + (f": {o['reason'][:90]}" if "reason" in o else ""))
        lines.append(f"| {r['model_type']} | {cells[0]} | {cells[1]} |".replace("\n", " "))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--types", nargs="*", help="model types (default: every causal-LM type)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging
    logging.set_verbosity_error()
    result = run(args.types)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(result))
    print(json.dumps(result["counts"]))


if __name__ == "__main__":
    main()
