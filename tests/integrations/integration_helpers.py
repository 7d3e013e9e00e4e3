"""Helpers of the TRL / Liger integration tests (fixtures in conftest.py)."""
from __future__ import annotations

from hf_fusedce import testing
from hf_fusedce.memory import LiveTensorTracker


def tiny_llama(tokenizer, seed=0, **overrides):
    """The shared tiny Llama (one layer) sized to `tokenizer`, with its special token ids."""
    return testing.tiny_llama(len(tokenizer), seed=seed, num_hidden_layers=1, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)


class OpSpy:
    """Counts calls of hf_fusedce's per-token op made by the TRL protocol handler."""

    def __init__(self, monkeypatch):
        import hf_fusedce.hf.token_head as token_head
        self.calls = 0
        real = token_head.fused_linear_token_stats

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(token_head, "fused_linear_token_stats", spy)


class LargestTensor(LiveTensorTracker):
    """hf_fusedce.memory's live-tensor tracker, also recording the element count of the largest tensor laid out
    like logits (last dimension = the vocabulary; the head's (vocab, hidden) weight gradient is not)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.max_numel = vocab, 0

    def _track(self, t):
        if t.dim() and t.shape[-1] == self.vocab:
            self.max_numel = max(self.max_numel, t.numel())
        super()._track(t)


class StepTracker:
    """Wraps a trainer's training_step in the tracker. `ratio`: the largest logits-shaped tensor a step created,
    in units of that step's tokens x vocabulary (>= 1: a full logits-sized tensor existed)."""

    def __init__(self, trainer, vocab, tokens=lambda inputs: inputs["input_ids"].numel(), method="training_step"):
        self.ratio = 0.0
        step = getattr(trainer, method)

        def tracked(model, inputs, *args, **kwargs):
            n = tokens(inputs)
            with LargestTensor(vocab) as tracker:
                out = step(model, inputs, *args, **kwargs)
            self.ratio = max(self.ratio, tracker.max_numel / (n * vocab))
            return out

        setattr(trainer, method, tracked)


def logged(trainer, keys):
    """TRL's logged training metrics, step by step."""
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return {k: [r[k] for r in rows if k in r] for k in keys}


# A fixed bound on purpose: metrics logged over several optimizer steps of a whole Trainer run, which has no
# float64 twin (TRL and Trainer cast to float32, AdamW amplifies rounding). The single-step model tests bound
# the same head against stock's own float64 error (hf_fusedce.testing.assert_model_as_accurate_as_stock).
def assert_same_metrics(ours: dict, stock: dict, rtol=1e-5):
    for key, want in stock.items():
        got = ours[key]
        assert len(got) == len(want) and want, f"{key}: {got} vs {want}"
        for a, b in zip(got, want):
            assert abs(a - b) <= rtol * max(1.0, abs(b)), f"{key}: ours {got} vs stock {want}"
