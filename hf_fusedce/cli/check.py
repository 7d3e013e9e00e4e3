"""`hf-fusedce check`: prove patched == stock (loss and every gradient) for model types or a local checkpoint."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="prove the patched loss and gradients equal stock",
                              description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model-type", action="append", help="a transformers model type (repeatable)")
    what.add_argument("--all", action="store_true",
                      help="every family of the installed transformers' causal-LM, image-text-to-text and "
                           "multimodal-LM mappings (a line per family as it is "
                           "proven, with a progress bar and ETA on stderr; minutes on a CPU)")
    what.add_argument("--model", help="path of a local checkpoint (loaded in float32, CPU)")
    p.add_argument("--kind", choices=("seq2seq", "speech_seq2seq", "masked_lm"),
                   help="prove the class of this mapping (AutoModelForSeq2SeqLM / ForSpeechSeq2Seq / ForMaskedLM) "
                        "instead of the causal LM; with --all: every type of that mapping")
    p.add_argument("--batches", type=int, default=2, help="synthetic batches for --model")
    p.add_argument("--seq-len", type=int, default=32, help="sequence length for --model")
    p.set_defaults(func=run)


def _line(r) -> str:
    variants = ",".join(r.variants) or "-"
    return f"{r.status:8s} {r.model_type:28s} {variants:22s} max_rel_err={r.max_rel_err:.1e} {r.reason}"


def _remember(results) -> None:
    """Families proven on the installed transformers: patch() no longer warns that their code moved."""
    import transformers

    from hf_fusedce.hf import recorded
    for r in results:
        path = recorded.remember(r.model_type, r.fingerprint, transformers.__version__)
    if results:
        print(f"recorded as proven on transformers {transformers.__version__} in {path}")


def _encoder(args) -> list:
    from hf_fusedce.hf.encoder import heads as encoder_heads, proof as encoder_proof
    types = sorted(encoder_heads.mapping(args.kind)) if args.all else args.model_type
    results = []
    for model_type in types:
        results.append(encoder_proof.prove(args.kind, model_type))
        print(_line(results[-1]), flush=True)
    return results


def run(args: argparse.Namespace) -> int:
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*changed its code")  # what this command re-proves
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from hf_fusedce.hf import proof
    results = []
    if args.model:
        results.append(proof.prove_checkpoint(args.model, batches=args.batches, seq_len=args.seq_len))
        print(_line(results[-1]))
    elif args.kind:
        results = _encoder(args)
    else:
        types = sorted(proof.fused_types()) if args.all else args.model_type
        # Each family's line is printed as soon as it is proven; the bar (stderr) shows progress and the ETA.
        with tqdm(types, unit="family", disable=len(types) < 2, dynamic_ncols=True) as bar:
            for model_type in bar:
                bar.set_postfix_str(model_type)
                results.append(proof.prove(model_type))
                bar.write(_line(results[-1]))
        _remember([r for r in results if r.status == "proven" and r.fingerprint])
    counts = {s: sum(r.status == s for r in results) for s in ("proven", "skipped", "refused", "failed")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if counts["failed"] or (args.model and counts["proven"] == 0) else 0
