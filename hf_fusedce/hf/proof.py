"""The equality proof shared by tests/hf and `hf-fusedce check`: patched vs stock, loss and every gradient.

For a model type: build a tiny random config from the config class's defaults (size fields shrunk, quirk
values set to non-trivial numbers so they are exercised), then for tied and untied heads (where the family
allows), with ignored tokens, once with the mean and once with `num_items_in_batch`, compare the patched
loss and every parameter gradient to the stock ones by relative error (float32, backend="torch").
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from ..testing import ModelRun, assert_model_as_accurate_as_stock, float64_twin, inputs_in, rel_err
from . import multimodal_batches as mb
from . import recorded
from .heads import HEADS, REFUSED, mapping_entries, resolve
from .recorded import media_proven_types, media_status, status_text  # noqa: F401 - re-exported (cards, tests)

# A float32 model passes when patched is as close to the float64 stock model as stock float32 is
# (testing.assert_model_as_accurate_as_stock): no fixed float32 bound, since that rounding depends on the CPU's
# GEMM kernels. TOL is kept for what has no float32 baseline: a float64 model, whose stock run IS the
# reference and whose only difference is the op's float32 accumulation of a 97-token vocabulary (~1e-7), and
# a family that cannot run in float64.
TOL = 1e-5
TOL64 = TOL
CRITERION = ("as close to the float64 stock model as stock float32 is: |ours - f64| <= 4 |stock - f64| + 32 ulps, "
             "loss and every gradient (float64 models, and families without a float64 run: within 1e-05 of stock)")
# Relative errors are taken against max(|stock|, FLOOR): gradients that are analytically zero (attention key
# biases: softmax is shift invariant) are float noise (~1e-9) on both sides, and a relative error of noise
# means nothing. Any real gradient in these tiny models has norm >> FLOOR.
FLOOR = 1e-4
# A gradient whose stock norm is below ZERO_GRAD x the model's largest is zero in exact arithmetic (float32 noise
# of ~1e-9, e.g. key biases of a vision tower with large activations): the patched one must be noise too.
ZERO_GRAD = 1e-7
VOCAB = 97  # odd, small: exercises ragged chunks
SEQ, BATCH = 10, 2

# Size fields shrunk to these values (never increased: a small default stays).
SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32, "embedding_size": 32,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64,
    "ffn_hidden_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32, "mlp_hidden_size": 64, "dense_intermediate_size": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "decoder_attention_heads": 4, "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "attention_head_dim": 8, "num_heads": 4,
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_k": 2, "top_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "moe_topk": 2, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4,
    "state_size": 8, "ssm_state_size": 8, "d_state": 8, "expand": 2, "conv_kernel": 4, "mamba_d_state": 8,
    "mamba_n_heads": 4, "n_mamba_heads": 4, "mamba_d_head": 16, "mamba_headdim": 16, "n_groups": 1, "mamba_n_groups": 1,
    "time_step_rank": 4, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "first_k_dense_replace": 1, "sliding_window": 16, "hidden_size_per_head": 8,
    "intermediate_size_mlp": 64, "num_kv_heads": 2, "multi_query_group_num": 2, "kv_channels": 8,
    "rotary_dim": 8, "rotary_emb_dim": 8, "image_size": 32, "patch_size": 8, "num_channels": 3,
    "vision_output_dim": 32, "text_hidden_size": 32, "hidden_size_global": 32, "encoder_hash_byte_group_vocab": 101, "adapter_in_dim": 32, "adapter_out_dim": 32, "adapter_input_size": 32, "num_global_layers": 1, "chunk_size": 16,
    "attention_chunk_size": 16, "local_attention": 16, "attention_window_size": 16, "block_size": 16,
}
# Quirk values set to non-trivial numbers so the table entry is really exercised.
QUIRK_VALUES = {"logits_scaling": 2.5, "lm_head_multiplier": 0.7, "logit_scale": 0.3, "z_loss_coefficient": 0.01,
                "output_router_logits": True, "final_logit_softcapping": 3.0, "logits_soft_cap": 3.0,
                "router_aux_loss_coef": 0.05, "output_multiplier": 0.7}
# Size fields whose None default is a placeholder the config never fills (the modeling code reads it as a
# number: head_dim**-0.5, topk(k=None), torch.empty(None, ...)), unlike sliding_window=None (= off).
_NONE_IS_UNSET = ("head_dim", "n_group", "topk_group", "num_experts_per_tok", "n_routed_experts", "n_shared_experts")
_NO_DROPOUT = ("dropout", "dropout_rate", "dropout_prob", "_pdrop", "attn_pdrop", "resid_pdrop", "embd_pdrop")


class StockFailed(Exception):
    """The unpatched model itself cannot run the tiny batch: nothing to compare against (skipped)."""


@dataclasses.dataclass
class ProofResult:
    model_type: str
    status: str  # proven | failed | skipped | refused
    reason: str = ""
    class_name: str = ""
    variants: list = dataclasses.field(default_factory=list)  # e.g. ["untied", "tied"]
    max_rel_err: float = 0.0
    n_params: int = 0
    seconds: float = 0.0
    fingerprint: dict = dataclasses.field(default_factory=dict)  # hf.recorded.fingerprint of the code proven


def causal_lm_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def fused_types() -> dict[str, str]:
    """{model type: the class its text proof builds} over every mapping of heads.LOSS_MAPPINGS (the first mapping
    naming a type gives its class: the causal-LM class when there is one)."""
    types: dict[str, str] = {}
    for model_type, name, _kind in mapping_entries():
        types.setdefault(model_type, name)
    return types


def media_types() -> dict[str, str]:
    """{model type: class} of the multimodal mappings (images, audio): the class a media batch is proven on."""
    from transformers.models.auto import modeling_auto
    types: dict[str, str] = {}
    for mapping in ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"):
        for model_type, name in getattr(modeling_auto, mapping, {}).items():
            types.setdefault(model_type, name if isinstance(name, str) else name[0])
    return types


# Per-family config settings the generic shrink cannot guess (the family's own constraints).
FAMILY_CONFIG = {
    "reformer": {"is_decoder": True, "axial_pos_shape": [2, 5], "axial_pos_embds_dim": [16, 16], "hash_seed": 0, "local_attn_chunk_length": 5, "lsh_attn_chunk_length": 5},  # training: axial shape = SEQ; LSH: same hashes in both runs
    "mamba2": {"num_heads": 8, "head_dim": 8},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # modeling reads rope_theta and clamps by clip_qkv unguarded; checkpoints set both
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},  # rope is keyed per layer type, no default
    "dots3_note_text": {"head_dim": 16},  # validated: SWA head_dim == qk_nope_head_dim + qk_rope_head_dim (8 + 8)
    "dots3_note": {"text_config": {"head_dim": 16}},  # same, in the text config
    "gemma3n_text": {"num_kv_shared_layers": 0},  # default 15 shared layers > 2 tiny layers: no producer of each type
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # no layer_types default; 1 MoE layer
    # QSA indexer fields default to None but every indexed_attention layer needs them (checkpoints set them)
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8, "indexer_compress_ratio": 4},
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8, "indexer_compress_ratio": 4}},
}
# Per-family preparation of a built model before the proof (inputs it needs that are not ids).
FAMILY_PREP = {"xmod": lambda m: m.set_default_language("en_XX"),
               "reformer": lambda m: m.train()}  # Reformer refuses a backward in eval mode; all dropouts are 0
LAYERS = SIZES["num_hidden_layers"]


def _layer_list(values: list, n: int) -> list:
    """A per-layer list cut to n layers, keeping one layer of each distinct kind first (hybrid models)."""
    order = sorted(range(len(values)), key=lambda i: (values.index(values[i]) != i, i))
    return [values[i] for i in sorted(order[:n])]


def _shrunk_kwargs(defaults: dict, config_cls=None) -> dict:
    kw = {}
    n_layers = next((defaults[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if
                     isinstance(defaults.get(k), int)), None)
    for key, value in defaults.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, list) and n_layers and len(value) == n_layers and n_layers > LAYERS:
            value = _layer_list(value, LAYERS)
            if key in SIZES:
                value = [min(v, SIZES[key]) if isinstance(v, int) else v for v in value]
            kw[key] = value
            continue
        if key == "mlp_only_layers" and isinstance(value, list):  # dense-layer indices: keep the last layer MoE
            kw[key] = [i for i in value if isinstance(i, int) and i < LAYERS - 1]
            continue
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            kw[key] = {k: v for k, v in value.items() if int(k) < LAYERS}  # per-layer overrides
            continue
        if value is None and key in _NONE_IS_UNSET:
            kw[key] = SIZES[key]
        elif key in SIZES and isinstance(value, int) and value > SIZES[key]:
            kw[key] = SIZES[key]
        elif key in QUIRK_VALUES and not isinstance(value, (dict, list)):  # also when its default is None (off)
            kw[key] = QUIRK_VALUES[key]
        elif key == "output_router_logits":
            kw[key] = True
        elif any(key.endswith(s) for s in _NO_DROPOUT) and isinstance(value, float):
            kw[key] = 0.0
        elif (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int) \
                and value >= VOCAB:
            kw[key] = VOCAB - 1 - (abs(hash(key)) % 8)
        elif isinstance(value, dict) and key.endswith("_config"):
            kw[key] = {**value, **_shrunk_kwargs(value)}
    kv = defaults.get("num_key_value_heads", 0)
    if kv is None or (kv and kv == defaults.get("num_attention_heads")):  # no GQA (MHA, MLA): kv heads == heads
        kw["num_key_value_heads"] = kw.get("num_attention_heads", defaults["num_attention_heads"])
    if "output_router_logits" in defaults:
        kw["output_router_logits"] = True
    return kw


def tiny_config(model_type: str, tie: bool | None = None):
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    kw = _shrunk_kwargs(defaults)
    if tie is not None:
        kw["tie_word_embeddings"] = tie
        for key in kw:
            if key == "text_config" and isinstance(kw[key], dict):
                kw[key]["tie_word_embeddings"] = tie
    edits = {**FAMILY_CONFIG.get(model_type, {}), **mb.config_edits(model_type)}  # the media batch's needs too
    for key, value in edits.items():  # a dict (sub-config) merges into the shrunk one
        kw[key] = {**kw[key], **value} if isinstance(value, dict) and isinstance(kw.get(key), dict) else value
    config = cls(**kw)
    for key in ("_attn_implementation",):
        setattr(config, key, "eager")
    return config


def build(model_type: str, tie: bool | None = None, seed: int = 0, config=None, class_name: str | None = None):
    """The tiny model of `model_type` (or of the given config; of `class_name`, default the type's class of
    fused_types), float32, in TRAINING mode (dropouts are 0)."""
    import transformers
    config = tiny_config(model_type, tie) if config is None else config
    cls = getattr(transformers, class_name or fused_types()[model_type])
    torch.manual_seed(seed)
    try:
        model = cls(config)
    except Exception as err:  # a text-only causal LM mapped from a composite config (e.g. llama4): its text config
        if config.get_text_config() is config:
            raise
        torch.manual_seed(seed)
        try:
            model = cls(config.get_text_config())
        except Exception:  # noqa: BLE001 - not that case: the composite model's own error is the reason
            raise err from None
    model = model.float().train()  # training mode, as the fused path runs; every dropout is 0
    FAMILY_PREP.get(model_type, lambda m: None)(model)
    return model


def _special_ids(config) -> set[int]:
    ids = set()
    for cfg in (config, *[v for v in vars(config).values() if hasattr(v, "to_dict")]):
        for key, value in vars(cfg).items():
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int):
                ids.add(value)
            elif key.endswith("_token_id") and isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return ids


def batch(model, seed: int = 1):
    """Random ids avoiding special tokens, labels with ignored positions."""
    vocab = model.get_output_embeddings().weight.shape[0]
    vocab = min(vocab, getattr(model.config.get_text_config(), "vocab_size", vocab) or vocab)
    allowed = torch.tensor([i for i in range(vocab) if i not in _special_ids(model.config)])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQ), generator=g)]
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same random stream for stock and patched (training-mode noise, if a family has any)
    out = model(**({} if ids is None else {"input_ids": ids}), labels=labels, **kw)  # None: speech features in kw
    out.loss.backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    return out, grads


def _float64_run(model, ids, labels, **kw) -> ModelRun | None:
    """The stock model in float64 on the same batch: the reference both float32 runs are measured against;
    None when the family cannot run in float64 (then the fixed TOL bounds patched vs stock). transformers'
    loss upcasts logits with `.float()`, so the reference's last log-softmax is float32 (a few ulps, inside
    the bound's eps); the body and the logits are float64."""
    for attention in (None, "sdpa"):  # eager attention in float64 turns a fully masked (left-padded) row into
        try:                          # NaN (its finfo.min mask overflows); sdpa computes the same function
            twin = float64_twin(model)
            if attention:
                twin.set_attn_implementation(attention)
            out, grads = _loss_and_grads(twin, ids, labels, **inputs_in(kw, torch.float64))
        except Exception:  # noqa: BLE001 - e.g. a kernel without a float64 implementation
            return None
        if all(bool(torch.isfinite(t).all()) for t in (out.loss, *grads.values()) if t is not None):
            return ModelRun(out.loss.detach(), grads)
    return None


def compare(model, ids, labels, tol: float = TOL, patch_options: dict | None = None, **kw) -> float:
    """Patched vs stock on one batch (`kw`: more model inputs): returns the max patched-vs-stock relative error,
    raises AssertionError on a mismatch. A float32 model passes when its loss and every gradient are as close
    to the float64 stock model as stock float32 is (testing.assert_model_as_accurate_as_stock); a float64
    model (or one that cannot run in float64) within `tol` of stock."""
    from . import patching
    kw.setdefault("use_cache", False)  # training: no cache (hybrid caches also reject tiny layer mixes)
    try:
        stock_out, stock = _loss_and_grads(model, ids, labels, **kw)
    except Exception as err:  # noqa: BLE001
        raise StockFailed(f"stock forward fails on the tiny model: {type(err).__name__}: {err}") from err
    with patching.patched(model, backend="torch", **(patch_options or {})):
        out, ours = _loss_and_grads(model, ids, labels, **kw)
    assert out.logits is None, "the fused path did not run (the patched training forward returned logits)"
    exact = None if next(model.parameters()).dtype == torch.float64 else _float64_run(model, ids, labels, **kw)
    if exact is not None:
        assert_model_as_accurate_as_stock(ModelRun(out.loss.detach(), ours),
                                          ModelRun(stock_out.loss.detach(), stock), exact, loss_floor=FLOOR)
    else:
        _within_fixed_bound(out.loss, stock_out.loss, ours, stock, tol)
    return _recorded_err(out.loss, stock_out.loss, ours, stock)


def _within_fixed_bound(loss, stock_loss, ours: dict, stock: dict, tol: float) -> None:
    """patched vs stock within `tol` (relative): for a float64 model, where stock IS the reference and the op's
    float32 accumulation is the only difference, and for a family with no float64 run."""
    zero = ZERO_GRAD * max((float(g.norm()) for g in stock.values() if g is not None), default=0.0)
    for name, g in stock.items():
        assert (g is None) == (ours[name] is None), f"gradient presence differs for {name}"
        if g is not None and float(g.norm()) < zero:  # zero in exact arithmetic: both sides must be noise
            assert float(ours[name].norm()) < zero, f"grad {name}: {float(ours[name].norm()):.1e}, stock's is 0"
        elif g is not None:
            err = rel_err(ours[name], g, floor=FLOOR)
            assert err <= tol, f"grad {name}: rel err {err:.2e}"
    err = rel_err(loss, stock_loss, floor=FLOOR)
    assert err <= tol, f"loss {loss.item()} vs stock {stock_loss.item()}: rel err {err:.2e}"


def _recorded_err(loss, stock_loss, ours: dict, stock: dict) -> float:
    """The figure the proof records: the largest relative error of patched vs stock, gradients that are zero in
    exact arithmetic left out (their relative error is noise over noise)."""
    zero = ZERO_GRAD * max((float(g.norm()) for g in stock.values() if g is not None), default=0.0)
    return max([rel_err(loss, stock_loss, floor=FLOOR)] +
               [rel_err(ours[n], g, floor=FLOOR) for n, g in stock.items() if g is not None and float(g.norm()) >= zero])


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def prove(model_type: str) -> ProofResult:
    start = time.perf_counter()
    res = ProofResult(model_type, "proven", class_name=fused_types().get(model_type, ""))
    if model_type not in HEADS:
        res.status, res.reason = "refused", REFUSED.get(model_type, "not in the quirk table")
        return res
    seen = set()
    try:
        for tie in (False, True):
            try:
                model = build(model_type, tie)
            except Exception as err:  # noqa: BLE001 - reported as skipped with the reason
                if seen:
                    continue
                res.status, res.reason = "skipped", f"cannot build tiny model: {type(err).__name__}: {err}"[:300]
                return res
            variant = "tied" if is_tied(model) else "untied"
            if variant in seen:
                continue
            seen.add(variant)
            ids, labels = batch(model)
            res.max_rel_err = max(res.max_rel_err, compare(model, ids, labels))
            if len(seen) == 1:  # once per family (the loss head is the same tied or not)
                res.fingerprint = recorded.fingerprint(model)
                unexercised = _unexercised_quirks(model, HEADS[model_type])
                if unexercised:
                    res.status, res.reason = "failed", f"quirk not exercised by the tiny config: {unexercised}"
                    return res
                n_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)  # as from a larger accumulated batch
                res.max_rel_err = max(res.max_rel_err, compare(model, ids, labels, num_items_in_batch=n_items))
                res.max_rel_err = max(res.max_rel_err, _compare_padded(model, ids, labels, res))
            res.variants.append(variant)
            res.n_params = sum(p.numel() for p in model.parameters())
    except StockFailed as err:
        res.status, res.reason = ("skipped", str(err)[:300]) if not res.variants else (res.status, res.reason)
    except AssertionError as err:
        _retry_float64(res, model_type, str(err))
    except Exception as err:  # noqa: BLE001
        res.status, res.reason = "failed", f"{type(err).__name__}: {err}"[:300]
    if res.status == "proven":  # text batches proven (float32, or float64 after a float32 miss): the media batch
        try:
            _prove_media(res)
        except Exception as err:  # noqa: BLE001 - an AssertionError is a mismatch on the media batch
            res.status, res.reason = "failed", f"media batch: {type(err).__name__}: {err}"[:300]
    res.seconds = round(time.perf_counter() - start, 2)
    return res


def _unexercised_quirks(model, spec) -> dict:
    """Quirks of the table entry whose value on the tiny model is trivial (None, 0, or a factor of 1): the proof
    would not test them. Every quirk must be forced to a non-trivial value (QUIRK_VALUES)."""
    trivial = {}
    for field in ("softcap", "logit_mul", "logit_div", "z_loss", "router_aux", "vocab_slice"):
        path = getattr(spec, field)
        if path is None:
            continue
        value = resolve(model, path)
        if value is None or value == 0 or (field in ("logit_mul", "logit_div") and value == 1):
            trivial[field] = value
    if spec.router_aux and not getattr(model.config.get_text_config(), "output_router_logits", False) \
            and not getattr(model.config, "output_router_logits", False):
        trivial["output_router_logits"] = False
    return trivial


def padded_batch(ids, labels):
    """The same batch right-padded: row 1 ends with 3 pad positions (attention_mask 0, labels ignored), row 0
    starts with 2 (left padding)."""
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[0, :2] = 0
    return labels.masked_fill(mask == 0, -100), mask


def _compare_padded(model, ids, labels, res: ProofResult) -> float:
    padded_labels, mask = padded_batch(ids, labels)
    try:
        err = compare(model, ids, padded_labels, attention_mask=mask)
    except StockFailed as err:  # the family's forward takes no attention_mask (e.g. recurrent models)
        res.reason = f"padded batch not proven: {err}"[:300]
        return 0.0
    res.variants.append("padded")
    return err


def _prove_media(res: ProofResult) -> None:
    """A family of the multimodal mappings: also its image / audio batch (multimodal_batches.BATCHES), or the
    reason it is proven on text only (recorded in the result, never silent)."""
    model_type = res.model_type
    if model_type not in media_types():
        return
    if model_type not in mb.BATCHES:
        why = "proven on text only: " + mb.text_only_reason(model_type)
        res.reason = f"{res.reason}; {why}" if res.reason else why
        return
    res.max_rel_err = max(res.max_rel_err, prove_multimodal(model_type))
    res.variants.append(mb.BATCHES[model_type].kind)


def prove_multimodal(model_type: str, tie: bool | None = None) -> float:
    """Patched vs stock on the family's image / audio + text batch (multimodal_batches.BATCHES), tied and untied
    heads where the family allows: loss and every parameter gradient, the encoder and projector included.
    Forced: media inputs are fused only for the types whose recorded proof includes this batch."""
    errs = []
    for variant in ((tie,) if tie is not None else (False, True)):
        model, ids, labels, extra = build_media_batch(model_type, variant)
        if variant is not None and is_tied(model) != variant:
            continue  # the family cannot tie (or untie) its head
        _check_media_used(model, ids, labels, extra)
        errs.append(compare(model, ids, labels, patch_options={"force": True}, **extra))
    if not errs:
        raise RuntimeError(f"{model_type}: no head variant could be built for the media batch")
    return max(errs)


def build_media_batch(model_type: str, tie: bool | None = None, seed: int = 1):
    """(model, ids, labels, extra inputs) of the family's tiny model on its media batch (multimodal_batches)."""
    base, entry = mb.media_entry(model_type)
    config = tiny_config(base, tie)
    if base != model_type:  # another tower on the base family's class: its edits on top of the base's
        config = type(config)(**mb.merged(config.to_dict(), entry.config))
    model = build(base, config=config, class_name=media_types()[base])
    return (model, *mb.media_inputs(model, entry, _special_ids(model.config), seed))


def _check_media_used(model, ids, labels, extra) -> None:
    """The batch really runs the encoder: a parameter the text-only batch leaves without gradient gets one."""
    _, text = _loss_and_grads(model, ids.masked_fill(labels == -100, int(ids[0, -1])), labels, use_cache=False)
    _, media = _loss_and_grads(model, ids, labels, use_cache=False, **extra)
    encoder = [n for n, g in media.items() if g is not None and text[n] is None]
    assert encoder, f"{model.config.model_type}: the media inputs reached no parameter (encoder not run)"


def _retry_float64(res: ProofResult, model_type: str, float32_error: str) -> None:
    """Some families amplify float32 rounding (gradients through cancellations: DiffLlama's lambdas, router
    weights). Prove the formula in float64 then; the float32 miss is recorded in the reason."""
    try:
        for tie in (False, True):
            model = build(model_type, tie).double()
            variant = "tied" if is_tied(model) else "untied"
            if variant in res.variants:
                continue
            ids, labels = batch(model)
            err = compare(model, ids, labels, tol=TOL64)
            n_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)
            err = max(err, compare(model, ids, labels, tol=TOL64, num_items_in_batch=n_items))
            res.variants.append(variant + "-float64")
        res.reason = f"float32: {float32_error}; exact in float64 (rel err <= {TOL64:g})"
    except Exception as err:  # noqa: BLE001
        res.status, res.reason = "failed", f"{float32_error}; float64: {type(err).__name__}: {err}"[:300]


def prove_checkpoint(path: str, batches: int = 2, seq_len: int = 32, seed: int = 0) -> ProofResult:
    """A local checkpoint (sharded or not, any saved dtype) loaded in float32: synthetic batches of its
    tokenizer's ids (special tokens avoided), or of the model's own ids where no usable tokenizer was saved.
    What cannot be proven is a result with a one-line reason, never a traceback."""
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    if not os.path.isdir(path):
        return ProofResult("?", "refused", reason=f"no checkpoint folder at {path} (--model takes a local folder)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()  # seeded: dropout matches
    except Exception as err:  # noqa: BLE001 - any loading error is the one-line reason
        return ProofResult("?", "refused", reason=f"cannot load {path} with AutoModelForCausalLM: {_one_line(err)}")
    res = ProofResult(getattr(model.config, "model_type", "?"), "proven", class_name=type(model).__name__)
    ids_pool, source = _token_ids(path, model)
    g = torch.Generator().manual_seed(seed)
    try:
        if len(ids_pool) < 2:
            raise ValueError(f"no two non-special token ids below the head's {_vocab(model)} rows to build a batch")
        for b in range(batches):
            ids = ids_pool[torch.randint(0, len(ids_pool), (2, seq_len), generator=g)]
            labels = ids.clone()
            labels[0, : seq_len // 4] = -100
            kw = {"num_items_in_batch": torch.tensor(int((labels[:, 1:] != -100).sum()) + 1)} if b % 2 else {}
            res.max_rel_err = max(res.max_rel_err, compare(model, ids, labels, **kw))
        res.variants += ["tied" if is_tied(model) else "untied", source]
    except (AssertionError, StockFailed) as err:
        res.status, res.reason = "failed", _one_line(err)
    except ValueError as err:  # refused by the table
        res.status, res.reason = "refused", _one_line(err)
    res.seconds = round(time.perf_counter() - start, 2)
    return res


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _token_ids(path: str, model) -> tuple[torch.Tensor, str]:
    """(ids to draw from, where they came from). A folder without tokenizer files still yields a tokenizer in
    transformers 5.x (an empty one: a single special token), so a tokenizer is used only when it names at least
    two non-special ids of the head; else any non-special id of the model."""
    vocab = _vocab(model)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        special = set(tok.all_special_ids)
        ids = sorted(i for i in set(tok.get_vocab().values()) if i < vocab and i not in special)
    except Exception:  # noqa: BLE001 - no tokenizer could be built from the folder
        ids = []
    if len(ids) >= 2:
        return torch.tensor(ids), "tokenizer ids"
    special = _special_ids(model.config)
    return torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long), "model ids"


def generate_equal(model_type: str, new_tokens: int = 6) -> bool:
    """Greedy generate() of the patched model gives the stock tokens."""
    from . import patching
    model = build(model_type)
    ids, _ = batch(model)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids[:, :4]),
              pad_token_id=0)
    stock = model.generate(ids[:, :4], **kw)
    with patching.patched(model, backend="torch"):
        ours = model.generate(ids[:, :4], **kw)
    return torch.equal(stock, ours)
