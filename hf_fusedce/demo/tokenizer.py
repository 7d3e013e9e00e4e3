"""The demo's tokenizer: a real 32,000-token Llama-2-style BPE, shipped with the package (no hub, no download).

`hf_fusedce/data/llama2-bpe-32k.tokenizer.json.gz` is the `tokenizers` form of the SentencePiece model
`tokenizer.model.v1` that the `mistral-common` package ships (Apache-2.0, see `hf_fusedce/data/NOTICE`),
converted once by `build_tokenizer_json_from_mistral_common()` below; loading it needs only `tokenizers` and
`transformers`. For other vocabulary sizes `train_bpe_tokenizer` trains a byte-level BPE on local text in seconds.
"""
from __future__ import annotations

import gzip
from importlib import resources

SHIPPED_TOKENIZER = "llama2-bpe-32k.tokenizer.json.gz"

# Llama-2 style chat format; the assistant turn is what the model is trained on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>> {{ message['content'] }} <</SYS>>\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
)


def _wrap(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<unk>", padding_side="right")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_demo_tokenizer():
    """The shipped 32k tokenizer as a `PreTrainedTokenizerFast` with a chat template (pad = unk)."""
    from tokenizers import Tokenizer

    raw = resources.files("hf_fusedce").joinpath("data", SHIPPED_TOKENIZER).read_bytes()
    return _wrap(Tokenizer.from_str(gzip.decompress(raw).decode("utf-8")))


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on `texts` (seconds); the vocabulary may come out smaller on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    return _wrap(tk)


def build_tokenizer_json_from_mistral_common(out_path: str) -> str:  # pragma: no cover - maintenance tool
    """Regenerate the shipped file from mistral-common's `tokenizer.model.v1` (needs mistral-common and
    sentencepiece; protobuf is not needed: vocabulary and scores come from the SentencePiece processor)."""
    import json
    import os

    import mistral_common
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    sp = spm.SentencePieceProcessor(model_file=src)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {p: sp.get_score(i) for p, i in vocab.items()})
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    data = json.loads(tok.backend_tokenizer.to_str())
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with gzip.GzipFile(out_path, "wb", mtime=0, compresslevel=9) as f:
        f.write(raw)
    return out_path
