"""Demo data: deterministic instruction/response pairs (templates with computed answers), shipped as JSONL,
loaded through `datasets`, tokenized with labels only on the responses; and packed causal-LM blocks.

`hf_fusedce/data/sft_demo.jsonl` is `write_sft_jsonl(path, n=600, seed=0)`'s output; every record is
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`.
"""
from __future__ import annotations

import json
import random
from importlib import resources

SHIPPED_SFT = "sft_demo.jsonl"

_NAMES = ["Ada", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kiri", "Lena",
          "Mateo", "Nia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tove"]
_ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "tickets", "cards", "keys"]
_WORDS = ["river", "lantern", "orbit", "velvet", "harbor", "meadow", "quartz", "signal", "canyon", "ember",
          "glacier", "willow", "copper", "falcon", "tundra", "saffron", "beacon", "prism", "atlas", "thicket"]
_UNITS = [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
          ("minutes", "seconds", 60), ("liters", "milliliters", 1000), ("days", "hours", 24)]


def _arith(r):
    a, b, c = r.randint(10, 999), r.randint(10, 999), r.randint(2, 9)
    q = f"Compute ({a} + {b}) * {c} and show the steps."
    s = a + b
    return q, f"First add: {a} + {b} = {s}. Then multiply: {s} * {c} = {s * c}. The answer is {s * c}."


def _story(r):
    n, it = r.choice(_NAMES), r.choice(_ITEMS)
    x, y, z = r.randint(5, 60), r.randint(1, 40), r.randint(1, 5)
    q = f"{n} has {x} {it}, finds {y} more and then gives away {z}. How many {it} does {n} have now?"
    return q, (f"{n} starts with {x} {it}. After finding {y} more, {n} has {x} + {y} = {x + y}. "
               f"Giving away {z} leaves {x + y} - {z} = {x + y - z}. So {n} has {x + y - z} {it}.")


def _sort(r):
    nums = r.sample(range(1, 200), r.randint(4, 9))
    q = "Sort these numbers from smallest to largest: " + ", ".join(map(str, nums)) + "."
    return q, "Sorted: " + ", ".join(map(str, sorted(nums))) + f". The smallest is {min(nums)} and the largest is {max(nums)}."


def _reverse(r):
    words = r.sample(_WORDS, r.randint(3, 7))
    q = "Reverse the order of these words: " + " ".join(words) + "."
    return q, "Reversed: " + " ".join(reversed(words)) + f". There are {len(words)} words."


def _spell(r):
    w = r.choice(_WORDS)
    q = f"Spell the word '{w}' letter by letter and count its letters."
    return q, f"The word '{w}' is spelled " + "-".join(w.upper()) + f". It has {len(w)} letters."


def _convert(r):
    big, small, k = r.choice(_UNITS)
    v = r.randint(2, 90)
    q = f"How many {small} are there in {v} {big}?"
    return q, f"One of the {big} is {k} {small}, so {v} {big} is {v} * {k} = {v * k} {small}."


def _compare(r):
    a, b = r.sample(_NAMES, 2)
    x, y = r.sample(range(120, 200), 2)
    q = f"{a} is {x} cm tall and {b} is {y} cm tall. Who is taller, and by how much?"
    tall, short, d = (a, b, x - y) if x > y else (b, a, y - x)
    return q, f"{tall} is taller than {short} by {d} cm, since the heights are {x} cm and {y} cm."


_TEMPLATES = [_arith, _story, _sort, _reverse, _spell, _convert, _compare]


def make_sft_records(n: int = 600, seed: int = 0) -> list[dict]:
    """`n` chat records; a fixed seed gives the same records on every machine."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        q, a = _TEMPLATES[i % len(_TEMPLATES)](r)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def write_sft_jsonl(path: str, n: int = 600, seed: int = 0) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for rec in make_sft_records(n, seed):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def shipped_sft_path() -> str:
    """Filesystem path of the shipped SFT JSONL (usable as a `datasets` data file)."""
    return str(resources.files("hf_fusedce").joinpath("data", SHIPPED_SFT))


def load_sft_dataset(path: str | None = None, split: str = "train"):
    """The SFT records as a `datasets.Dataset` (JSON/JSONL loader; the shipped file by default)."""
    import datasets

    return datasets.load_dataset("json", data_files={split: path or shipped_sft_path()}, split=split)


def tokenize_chat(example, tokenizer, max_length: int, messages_field: str = "messages"):
    """input_ids of the chat-formatted conversation; labels = input_ids on assistant turns, -100 elsewhere.

    Works with any tokenizer with a chat template: the prompt part of each assistant turn is the template
    applied to the turns before it with `add_generation_prompt=True`."""
    msgs = example[messages_field]
    ids = _template_ids(tokenizer, msgs, add_generation_prompt=False)
    labels = [-100] * len(ids)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, msgs[:k], add_generation_prompt=True))
        end = len(_template_ids(tokenizer, msgs[: k + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _template_ids(tokenizer, msgs, add_generation_prompt):
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def build_sft_dataset(tokenizer, max_length: int, path: str | None = None, num_proc: int | None = None):
    ds = load_sft_dataset(path)
    return ds.map(tokenize_chat, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                  remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize (labels on responses)")


def chat_to_text(example, messages_field: str = "messages") -> dict:
    return {"text": "\n".join(m["content"] for m in example[messages_field])}


def pack_texts(examples, tokenizer, block_size: int, text_field: str = "text"):
    """Batched `datasets.map` function: tokenize, join with EOS, cut into blocks of `block_size` (the tail
    that does not fill a block is dropped); labels = input_ids (the model shifts them)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = []
    for ids in tokenizer(examples[text_field], add_special_tokens=False)["input_ids"]:
        stream.extend(list(ids) + eos)
    n = (len(stream) // block_size) * block_size
    blocks = [stream[i: i + block_size] for i in range(0, n, block_size)]
    return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [list(b) for b in blocks]}


def build_packed_dataset(tokenizer, block_size: int, path: str | None = None, text_field: str = "text"):
    """Packed causal-LM blocks from a text file (.txt: one document a line), a JSON/JSONL file with a
    `text_field` column, or the shipped SFT JSONL (its turns joined as plain text) by default."""
    import datasets

    if path is not None and path.endswith(".txt"):
        ds = datasets.load_dataset("text", data_files={"train": path}, split="train")
    else:
        ds = load_sft_dataset(path)
        if text_field not in ds.column_names:
            ds = ds.map(chat_to_text, remove_columns=ds.column_names)
            text_field = "text"
    return ds.map(pack_texts, batched=True, batch_size=1000, remove_columns=ds.column_names,
                  fn_kwargs={"tokenizer": tokenizer, "block_size": block_size, "text_field": text_field},
                  desc="tokenize + pack")


def pack_sft(examples, block_size: int):
    """Batched `datasets.map` function over tokenized chats: concatenate input_ids and labels (prompt masks
    kept) and cut into full blocks of `block_size`, so every sequence has the same length (the tail is dropped)."""
    ids = [t for seq in examples["input_ids"] for t in seq]
    labels = [t for seq in examples["labels"] for t in seq]
    n = (len(ids) // block_size) * block_size
    return {"input_ids": [ids[i: i + block_size] for i in range(0, n, block_size)],
            "attention_mask": [[1] * block_size for _ in range(0, n, block_size)],
            "labels": [labels[i: i + block_size] for i in range(0, n, block_size)]}
