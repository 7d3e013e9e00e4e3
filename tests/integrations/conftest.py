"""Fixtures of the TRL / Liger integration tests: a small BPE tokenizer trained on the shipped SFT data, the
records, a spy on hf_fusedce's per-token op (helpers in integration_helpers.py)."""
from __future__ import annotations

import pytest
import torch

from integration_helpers import OpSpy

VOCAB = 512
# The demo's Llama-2-style template with TRL's generation markers around the assistant turn
# (assistant_only_loss needs them).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{% generation %} {{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)


@pytest.fixture(autouse=True, scope="session")
def _quiet_one_thread():
    torch.set_num_threads(1)
    from transformers.utils import logging
    logging.set_verbosity_error()


@pytest.fixture(scope="session")
def records():
    from hf_fusedce.demo.data import make_sft_records
    return make_sft_records(n=24, seed=0)


@pytest.fixture(scope="session")
def tokenizer(records):
    from hf_fusedce.demo.data import chat_to_text
    from hf_fusedce.demo.tokenizer import train_bpe_tokenizer
    tok = train_bpe_tokenizer([chat_to_text(r)["text"] for r in records], VOCAB)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def op_spy(monkeypatch):
    return OpSpy(monkeypatch)


