"""Offline demo building blocks: shipped tokenizer and SFT data, tiny Llama builder, the stock-vs-fused runner."""
from .data import build_packed_dataset, build_sft_dataset, load_sft_dataset, make_sft_records, shipped_sft_path
from .model import build_tiny_llama, tiny_llama_config
from .tokenizer import load_demo_tokenizer, train_bpe_tokenizer

__all__ = ["build_packed_dataset", "build_sft_dataset", "load_sft_dataset", "make_sft_records", "shipped_sft_path",
           "build_tiny_llama", "tiny_llama_config", "load_demo_tokenizer", "train_bpe_tokenizer"]
