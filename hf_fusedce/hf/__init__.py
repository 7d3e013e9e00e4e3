"""Hugging Face integration: patch a causal LM so its training loss uses the fused linear cross-entropy op."""
