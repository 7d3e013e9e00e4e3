"""The equality proof of the encoder-decoder and masked-LM heads (encoder_heads): patched vs stock, loss and every
parameter gradient, float32, backend="torch", as hf_fusedce.hf.proof does for causal LMs.

Per (kind, model type): a tiny config (proof.tiny_config plus ENCODER_CONFIG), tied and untied heads where the
family allows; a batch with ignored positions (decoder labels for seq2seq, ~30% masked positions for masked LMs),
then the same batch padded (encoder attention_mask, pad labels ignored) and with `num_items_in_batch` (honoured or
ignored exactly as stock does). Speech models get a real feature batch: their feature extractor's defaults
applied to a generated waveform (two lengths, padded by the extractor).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from .. import proof
from ..proof import ProofResult, StockFailed
from . import heads as encoder_heads

RESULTS_PATH = Path(__file__).resolve().parents[2] / "data" / "encoder_proof_results.json"
DEC_LEN = 8  # decoder labels shorter than the encoder input: decoder inputs built from the labels, not the ids
DEC_LEN_OF = {"fsmt": proof.SEQ}  # FSMT's decoder inputs are the shifted encoder input_ids (same length)
# Per-family config values the proof needs (the generic shrink cannot guess them) or must exercise.
ENCODER_CONFIG = {
    "t5": {"decoder_start_token_id": 0},  # the config class leaves it unset; every T5 checkpoint sets 0
    "moonshine": {"pad_token_id": 2, "decoder_start_token_id": 1},  # unset in the config class
    "longt5": {"decoder_start_token_id": 0, "local_radius": 4, "global_block_size": 4},
    "distilbert": {"n_heads": 4},
    "esm": {"vocab_size": proof.VOCAB, "pad_token_id": 1, "mask_token_id": 2},  # no vocabulary by default
    "modernbert": {"sparse_prediction": True, "reference_compile": False},  # exercise the sparse prediction
    "ultrabert": {"sparse_prediction": True, "reference_compile": False},
    "longformer": {"attention_window": 4},
    "led": {"attention_window": 4},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "big_bird": {"attention_type": "original_full"},
    "reformer": {"axial_pos_shape": (2, 5), "axial_pos_embds_dim": (16, 16), "local_attn_chunk_length": 5,
                 "lsh_attn_chunk_length": 5, "hash_seed": 0, "is_decoder": False},
    "speecht5": {"apply_spec_augment": False},  # SpecAugment draws its masks from numpy: not reproducible
    "switch_transformers": {"decoder_start_token_id": 0},
    "funnel": {"block_sizes": [1, 1], "block_repeats": [1, 1], "num_decoder_layers": 1},
}


def required_set() -> list[tuple[str, str]]:
    """What CI proves (tests/hf/test_encoder_heads.py)."""
    return [("seq2seq", "t5"), ("seq2seq", "mt5"), ("seq2seq", "bart"), ("seq2seq", "marian"),
            ("speech_seq2seq", "whisper"), ("masked_lm", "bert"), ("masked_lm", "roberta"),
            ("masked_lm", "modernbert"), ("masked_lm", "xlm-roberta")]


def all_entries() -> list[tuple[str, str]]:
    """Every (kind, model type) of the three mappings (a class listed in two mappings: its first)."""
    seen, out = set(), []
    for kind in encoder_heads.MAPPINGS:
        for model_type, name in encoder_heads.mapping(kind).items():
            if name not in seen:
                seen.add(name)
                out.append((kind, model_type))
    return out


def class_name(kind: str, model_type: str) -> str:
    name = encoder_heads.mapping(kind)[model_type]
    return name if isinstance(name, str) else name[0]


def build(kind: str, model_type: str, tie: bool | None = None, seed: int = 0):
    import transformers
    config = proof.tiny_config(model_type, tie)
    for key, value in ENCODER_CONFIG.get(model_type, {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name(kind, model_type))(config).float().train()
    _nontrivial_biases(model, kind, model_type)
    proof.FAMILY_PREP.get(model_type, lambda m: None)(model)  # xmod: its default language
    return model


def _nontrivial_biases(model, kind, model_type) -> None:
    """Logit biases are zeros at init (BART's final_logits_bias, BERT's decoder bias): random values, so that
    adding them (or forgetting to) shows in the loss."""
    g = torch.Generator().manual_seed(3)
    spec = encoder_heads.ENCODER_HEADS.get((kind, model_type))
    tensors = [encoder_heads._resolve(model, p) for p in (spec.logit_bias if spec else ())]
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "bias", None), torch.Tensor):
        tensors.append(head.bias)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g))


def _ids(model, shape, g):
    vocab = model.get_output_embeddings().weight.shape[0]
    vocab = min(vocab, getattr(model.config.get_text_config(), "vocab_size", vocab) or vocab)
    allowed = torch.tensor([i for i in range(vocab) if i not in proof._special_ids(model.config)])
    return allowed[torch.randint(0, len(allowed), shape, generator=g)]


def batch(kind: str, model, padded: bool = False, seed: int = 1) -> tuple[dict, torch.Tensor]:
    """(model inputs, labels) of the family's kind; padded: an attention mask with padded positions."""
    g = torch.Generator().manual_seed(seed)
    B, S = proof.BATCH, proof.SEQ
    if kind == "masked_lm":
        ids = _ids(model, (B, S), g)
        chosen = torch.rand(B, S, generator=g) < 0.3
        chosen[:, 1] = True  # at least one masked position per row
        labels = ids.masked_fill(~chosen, -100)
        inputs = {"input_ids": ids}
    else:
        labels = _ids(model, (B, DEC_LEN_OF.get(model.config.model_type, DEC_LEN)), g)
        labels[0, :2] = -100
        inputs = _speech_inputs(model, padded, g) if kind == "speech_seq2seq" else {"input_ids": _ids(model, (B, S), g)}
    if padded:
        labels = labels.clone()
        labels[1, -3:] = -100  # decoder / masked-LM padding, ignored
        if "input_ids" in inputs:
            mask = torch.ones_like(inputs["input_ids"])
            mask[1, -3:] = 0
            inputs["attention_mask"] = mask
            if kind == "masked_lm":
                labels = labels.masked_fill(mask == 0, -100)
    return inputs, labels


def waveforms(sampling_rate: int, g) -> list:
    """Two generated utterances (1.0 s and 0.6 s: a chirp plus noise), float32 numpy."""
    out = []
    for seconds in (1.0, 0.6):
        t = torch.arange(int(sampling_rate * seconds)) / sampling_rate
        wave = 0.5 * torch.sin(2 * math.pi * (200 + 300 * t) * t) + 0.05 * torch.randn(t.shape, generator=g)
        out.append(wave.numpy())
    return out


def feature_extractor(model_type: str):
    import transformers
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES
    return getattr(transformers, FEATURE_EXTRACTOR_MAPPING_NAMES[model_type])()  # its defaults


def _speech_inputs(model, padded: bool, g) -> dict:
    fe = feature_extractor(model.config.model_type)
    waves = waveforms(fe.sampling_rate, g)
    try:  # the extractor's own padding default (Whisper: to 30 s)
        feats = fe(waves, sampling_rate=fe.sampling_rate, return_tensors="pt", return_attention_mask=True)
    except ValueError:  # its default does not pad two lengths into one tensor
        feats = fe(waves, sampling_rate=fe.sampling_rate, return_tensors="pt", padding=True,
                   return_attention_mask=True)
    name = fe.model_input_names[0]
    inputs = {name: feats[name].float()}
    if padded and "attention_mask" in feats and model.config.model_type != "whisper":  # whisper ignores it
        inputs["attention_mask"] = feats["attention_mask"]
    return inputs


def _compare(model, inputs, labels, **kw) -> float:
    inputs = dict(inputs)
    ids = inputs.pop("input_ids", None)
    return proof.compare(model, ids, labels, **inputs, **kw)


def prove(kind: str, model_type: str) -> ProofResult:
    start = time.perf_counter()
    res = ProofResult(model_type, "proven", class_name=class_name(kind, model_type))
    found = encoder_heads.spec_or_reason(_cls(kind, model_type)) if (kind, model_type) not in \
        encoder_heads.ENCODER_HEADS else encoder_heads.ENCODER_HEADS[(kind, model_type)]
    if model_type in encoder_heads.CAUSAL_ELSEWHERE:
        res.status, res.reason = "refused", "decoder-only (shifted causal loss): the causal / multimodal table's"
        return res
    if isinstance(found, str) or found is None:
        res.status, res.reason = "refused", found or "not in the table"
        return res
    seen = set()
    try:
        for tie in (False, True):
            try:
                model = build(kind, model_type, tie)
            except Exception as err:  # noqa: BLE001
                if seen:
                    continue
                res.status, res.reason = "skipped", f"cannot build tiny model: {type(err).__name__}: {err}"[:300]
                return res
            variant = ("tied" if proof.is_tied(model) else "untied") + \
                ("-scaled" if getattr(model.config, "scale_decoder_outputs", False) else "")  # T5: d_model**-0.5
            if variant in seen:
                continue
            seen.add(variant)
            inputs, labels = batch(kind, model)
            res.max_rel_err = max(res.max_rel_err, _compare(model, inputs, labels))
            if len(seen) == 1:
                n_items = torch.tensor(int((labels != -100).sum()) + 3)
                res.max_rel_err = max(res.max_rel_err, _compare(model, inputs, labels, num_items_in_batch=n_items))
                inputs, labels = batch(kind, model, padded=True)
                res.max_rel_err = max(res.max_rel_err, _compare(model, inputs, labels))
                res.variants.append("padded")
                if found.media:
                    res.variants.append(found.media)
            res.variants.append(variant)
            res.n_params = sum(p.numel() for p in model.parameters())
    except StockFailed as err:
        res.status, res.reason = "skipped", str(err)[:300]
    except AssertionError as err:
        _retry_float64(res, kind, model_type, str(err))
    except Exception as err:  # noqa: BLE001
        res.status, res.reason = "failed", f"{type(err).__name__}: {err}"[:300]
    res.seconds = round(time.perf_counter() - start, 2)
    return res


def _retry_float64(res: ProofResult, kind: str, model_type: str, float32_error: str) -> None:
    """As proof._retry_float64: gradients that are zero in exact arithmetic (attention key biases) are float32
    noise on both sides; prove the formula in float64 then, the float32 miss recorded in the reason."""
    try:
        for tie in (False, True):
            model = build(kind, model_type, tie).double()
            inputs, labels = batch(kind, model)
            inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
            _compare(model, inputs, labels, tol=proof.TOL64)
            res.variants.append(("tied" if proof.is_tied(model) else "untied") + "-float64")
        res.variants = sorted(set(res.variants))
        res.reason = f"float32: {float32_error}; exact in float64 (rel err <= {proof.TOL64:g})"
    except Exception as err:  # noqa: BLE001
        res.status, res.reason = "failed", f"{float32_error}; float64: {type(err).__name__}: {err}"[:300]


def _cls(kind, model_type):
    import transformers
    return getattr(transformers, class_name(kind, model_type))


def _prove_one(entry) -> dict:
    kind, model_type = entry
    torch.set_num_threads(1)
    return {"kind": kind, **dataclasses.asdict(prove(kind, model_type))}


def run(entries=None, workers: int = 2) -> dict:
    """Prove every entry (or `entries`): the JSON document written to RESULTS_PATH by `--refresh`."""
    from concurrent.futures import ProcessPoolExecutor

    import transformers
    entries = entries or all_entries()
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_prove_one, entries))
    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "tolerance": proof.TOL, "criterion": proof.CRITERION, "results": results}


if __name__ == "__main__":  # python -m hf_fusedce.hf.encoder.proof [--refresh]
    import sys
    doc = run()
    for r in doc["results"]:
        print(f"{r['kind']:15s} {r['model_type']:24s} {r['status']:8s} {r['max_rel_err']:.1e} {r['reason'][:150]}")
    if "--refresh" in sys.argv:
        RESULTS_PATH.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
