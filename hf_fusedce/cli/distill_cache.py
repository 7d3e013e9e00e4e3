"""`hf-fusedce distill-cache`: a teacher's top-k next-token log-probs over chat data, stored once as a `datasets`
dataset (parquet shards, resumable) for offline distillation (hf_fusedce.teacher_cache)."""
from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser(
        "distill-cache", help="store a teacher's top-k next-token log-probs for offline distillation (resumable)",
        description=__doc__ + " Rerun the same command to resume an interrupted build.")
    p.add_argument("--teacher", required=True, help="teacher model directory or hub id (from_pretrained)")
    p.add_argument("--data", default=None, help="JSONL of chat records ({'messages': [...]}); default: the shipped "
                                                 "SFT demo data")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the teacher's, else the shipped 32k one)")
    p.add_argument("--out", required=True, help="output directory of the cache")
    p.add_argument("--k", type=int, default=32, help="log-probs kept per token (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher temperature (default %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per parquet shard (default %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def _tokenizer(args):
    from transformers import AutoTokenizer

    from ..demo.tokenizer import load_demo_tokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        return AutoTokenizer.from_pretrained(args.teacher)
    except (OSError, ValueError):
        return load_demo_tokenizer()


def _run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from ..demo.data import load_sft_dataset, tokenize_chat
    from ..teacher_cache import build_topk_cache

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = _tokenizer(args)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).to(device)
    records = load_sft_dataset(args.data)
    if args.max_samples:
        records = records.select(range(min(args.max_samples, len(records))))
    data = records.map(tokenize_chat, fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length},
                       remove_columns=records.column_names, desc="tokenize (labels on responses)")
    cache = build_topk_cache(teacher, data.select_columns(["input_ids", "labels"]), args.out, k=args.k,
                             temperature=args.temperature, batch_size=args.batch_size, shard_size=args.shard_size,
                             pad_token_id=tokenizer.pad_token_id or 0, progress=not args.quiet)
    print(f"{args.out}: {len(cache)} sequences, top-{args.k} teacher log-probs per token")
    return 0
