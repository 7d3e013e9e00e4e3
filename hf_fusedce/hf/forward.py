"""The ONE generic causal-LM forward used for every family.

It runs the model's own (stock) forward with ``labels=None`` while the output-embeddings module is switched to
capture mode (gather.HeadSwitch, installed once at patch time): the head records its input and returns an empty
placeholder, so the stock forward runs to its end (caches, router logits, hidden states all in its own output)
without ever building logits. The loss is then the fused op on that input and the head's weight, with the
family's post-head quirks taken from ``heads.HEADS``. Everything before the head (decoder, final norm, hidden
scaling, ``logits_to_keep`` slicing, dtype casts) is the model's own code, so no family's forward is copied.
No hook is registered and no exception raised per call: torch.compile(fullgraph=True) traces it whole.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import fused_linear_cross_entropy
from . import adapters, gather, tensor_parallel
from .encoder import heads as encoder_heads
from .heads import HeadSpec, model_type_of, resolve
from .recorded import media_proven_types

# Outside protocols the patched forward speaks, {call keyword: handler(model, original, spec, options, call,
# value)}: a truthy keyword hands the call (without it) and its value to the handler. hf_fusedce.integrations
# registers them (TRL's `fused_lm_head`, per-token requests of TRL's other trainers); hf never imports integrations.
PROTOCOLS: dict = {}


@dataclass(frozen=True)
class FusedOptions:
    """What `patch(...)` lets the user choose per model."""
    backend: str = "auto"
    chunk_budget_bytes: int | None = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    return_logits: bool = False
    force: bool = False  # also fuse what is unproven (multimodal inputs of a family proven on text only)
    dw_accumulation: str = "auto"  # a bf16/fp16 head's dW over chunks: "auto" | "fp32" | "native" (the op's)


# Keyword fragments of the inputs that make a multimodal model run its encoders (pixel_values, image_patches,
# input_features, audio_input_features...): only families whose recorded proof includes such a batch
# (hf_fusedce/data/proof_results.json, variant "image" or "audio") fuse them; the others run stock with a warning.
MULTIMODAL_INPUTS = ("pixel", "image", "video", "audio", "input_features", "input_values", "patches")
MULTIMODAL_PROVEN: frozenset[str] = media_proven_types()  # read once: a set lookup in the forward (compile-safe)


def generic_forward(model, original, spec: HeadSpec, options: FusedOptions, args, kwargs, positional=None):
    """`original` is the bound stock forward; args/kwargs are what the caller passed; `positional` the stock
    forward's positional parameter names (cached by the caller; computed here when None)."""
    call = _bind(original, args, kwargs, positional)
    for keyword, handler in PROTOCOLS.items():
        value = call.pop(keyword, None)
        if value:
            return handler(model, original, spec, options, call, value)
    skip_logits = call.pop("skip_logits", None)  # Trainer / Liger convention: accepted, never forwarded
    if not _should_fuse(model, spec, options, call, skip_logits):
        return original(**call)
    head = model.get_output_embeddings()
    stock_call = encoder_heads.prepare_call(model, spec, call)  # seq2seq: decoder inputs built from the labels
    stock_call = {**stock_call, "labels": None} if "labels" in stock_call else stock_call
    with encoder_heads.empty_logit_biases(model, spec):
        hidden, base_out = capture_head_input(model, head, original, stock_call)
    loss, logits = _head_loss(model, spec, options, head, hidden, call)
    aux = router_aux(model, spec, call, base_out)
    if aux is not None:
        loss = loss + resolve(model, spec.router_aux) * aux.to(loss.device)
    out = _output(base_out, loss, logits, aux)
    return_dict = call.get("return_dict")
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def positional_names(original) -> tuple:
    """Names the stock forward gives its positional arguments (computed once per patch, not per call)."""
    return tuple(p.name for p in inspect.signature(original).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _bind(original, args, kwargs, positional) -> dict:
    """Caller's arguments as one keyword dict (positional ones named by the stock signature)."""
    if not args:
        return dict(kwargs)
    names = positional if positional is not None else positional_names(original)
    if len(args) > len(names):
        raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
    dup = [n for n in names[:len(args)] if n in kwargs]
    if dup:
        raise TypeError(f"forward() got multiple values for argument {dup[0]!r}")
    return {**dict(zip(names, args)), **kwargs}


def _should_fuse(model, spec, options, call, skip_logits) -> bool:
    """Training mode + labels: fused. Eval mode: stock (with logits), whatever the grad mode. Trainer's
    `skip_logits` (eval with prediction_loss_only) forces either way."""
    if call.get("labels") is None and call.get("shift_labels") is None:
        return False  # generation, embeddings, eval without labels: stock
    if skip_logits is not None:
        if not skip_logits:
            return False
    elif not model.training:
        return False  # eval: metrics need the logits, stock path
    reason = adapters.unsupported_reason(model.get_output_embeddings())
    if reason is None and not options.force and not getattr(spec, "media", None):  # speech seq2seq: proven
        reason = _unproven_multimodal(model, call)
    if reason:
        warnings.warn(f"hf_fusedce: {reason}; using the stock (materialized logits) loss", stacklevel=4)
        return False
    return True


def _unproven_multimodal(model, call) -> str | None:
    given = [k for k, v in call.items() if v is not None and any(w in k for w in MULTIMODAL_INPUTS)]
    if not given or model_type_of(model) in MULTIMODAL_PROVEN:
        return None
    return (f"{type(model).__name__} was given {', '.join(given)}: its fused loss is proven on text batches only "
            "(patch with force=True to fuse them anyway)")


def capture_head_input(model, head, original, call):
    """(head input, stock output) of the stock forward run on `call` with the head switched to capture."""
    call = dict(call)
    if "return_dict" in call:
        call["return_dict"] = True  # we need the output's fields; a tuple is made at the end if asked
    hidden, base_out = gather.capture(gather.install(head), lambda: original(**call))
    if hidden is None:
        raise RuntimeError(f"hf_fusedce: {type(model).__name__}.forward never called its output embeddings "
                           f"module; it cannot be fused (unpatch it)")
    return hidden, base_out


def head_targets(model, spec, call, hidden):
    labels, shift_labels = call.get("labels"), call.get("shift_labels")
    ignore_index = call.get("ignore_index", -100) if spec.shift else -100
    if not spec.shift:
        targets = labels
    elif shift_labels is not None:
        targets = shift_labels
    else:  # exactly ForCausalLMLoss: pad one ignored position, then shift left
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    keep = call.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        targets = _slice_like_hidden(targets, keep)
    targets = targets.to(hidden.device)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(targets.shape)} (after shift / logits_to_keep) does not match "
                         f"the head's input positions {tuple(hidden.shape[:-1])}")
    return targets, ignore_index


def _slice_like_hidden(targets, keep):
    """The same positions `slice_logits_to_keep` keeps of the hidden states."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # older 5.x slice inline: int only
        slice_logits_to_keep = lambda h, k: h[:, -k:, :]  # noqa: E731
    return slice_logits_to_keep(targets.unsqueeze(-1), keep).squeeze(-1)


@dataclass(frozen=True)
class HeadTransform:
    """What the family does to the head's output, resolved on the model (heads.HEADS declares where)."""
    softcap: float | None
    scale: float
    vocab: int | None
    z_coef: float


def head_transform(model, spec: HeadSpec) -> HeadTransform:
    scale = 1.0
    if spec.logit_mul:
        scale *= float(resolve(model, spec.logit_mul))
    if spec.logit_div:
        scale /= float(resolve(model, spec.logit_div))
    return HeadTransform(resolve(model, spec.softcap) if spec.softcap else None, scale,
                         int(resolve(model, spec.vocab_slice)) if spec.vocab_slice else None,
                         float(resolve(model, spec.z_loss) or 0.0) if spec.z_loss else 0.0)


def head_operands(inner, h, vocab: int | None):
    """(hidden', weight, bias) of the head module, adapters included, full tensors, cut to the vocabulary.
    A tensor-parallel head is refused here: only the loss runs vocab-parallel (`_head_loss`)."""
    h2, weight, bias = adapters.linear_parts(inner, h)
    tensor_parallel.refuse_vocab_sharded(weight, "per-token head outputs (TRL's fused_lm_head protocol)")
    return _full_operands(h2, weight, bias, vocab)


def _full_operands(h2, weight, bias, vocab):
    weight, bias = gather.full_tensor(weight), gather.full_tensor(bias)
    gather.check_materialized(weight)
    if vocab is not None:
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    return h2, weight, bias


def _head_loss(model, spec, options, head, hidden, call):
    targets, ignore_index = head_targets(model, spec, call, hidden)
    honoured = (spec.shift and not spec.mean_only) or getattr(spec, "num_items", False)  # encoder_heads' own flag
    num_items = call.get("num_items_in_batch") if honoured else None
    t = head_transform(model, spec)
    extra = encoder_heads.extra_bias(model, spec)  # BART's final_logits_bias: added after the head
    softcap, scale = t.softcap, t.scale

    def run(inner, h):
        h2, weight, bias = adapters.linear_parts(inner, h)
        shard = tensor_parallel.vocab_shard(weight, bias, t.vocab)  # TP head: this rank's vocabulary slice only
        if shard is not None:
            if extra is not None:
                raise NotImplementedError("hf_fusedce: a vocab-parallel head with a logit bias after it")
            weight, bias, loss_fn = shard.weight, shard.bias, shard.loss_fn
        else:
            h2, weight, bias = _full_operands(h2, weight, bias, t.vocab)
            if extra is not None:
                bias = extra.to(weight.dtype) if bias is None else bias + extra.to(bias.dtype)
            loss_fn = fused_linear_cross_entropy
        common = dict(bias=bias, softcap=softcap, logit_scale=scale, backend=options.backend,
                      chunk_budget_bytes=options.chunk_budget_bytes, label_smoothing=options.label_smoothing,
                      dw_accumulation=options.dw_accumulation)
        if t.z_coef > 0:
            loss = _bamba_loss(loss_fn, h2, weight, targets, ignore_index, num_items, t.z_coef, common)
        else:
            loss = loss_fn(h2, weight, targets, ignore_index=ignore_index,
                           num_items_in_batch=num_items, z_loss=options.z_loss, **common)
        logits = _detached_logits(h2, weight, bias, softcap, scale) if options.return_logits else None
        if logits is not None and shard is not None:
            logits = shard.full_logits(logits)
        return loss, logits

    return gather.call_through(head, run, hidden)


def _bamba_loss(loss_fn, h, weight, targets, ignore_index, num_items, coef, common):
    """CE (mean over valid, or sum / num_items) + coef * mean over ALL positions of lse^2, in one fused pass:
    soft targets with one id per row and probability 1/denominator (0 for ignored rows), every row active,
    z_loss = coef / rows, reduction sum. Row loss = p*(lse - z_t) + coef/rows * lse^2."""
    valid = targets != ignore_index
    denom = (torch.as_tensor(num_items, dtype=torch.float32, device=h.device) if num_items is not None
             else valid.sum().float()).clamp(min=1)
    ids = torch.where(valid, targets, 0).unsqueeze(-1)
    probs = (valid.float() / denom).unsqueeze(-1)
    rows = targets.numel()
    return loss_fn(h, weight, ids, target_probs=probs, reduction="sum", z_loss=coef / rows,
                   ignore_index=ignore_index, **common)


@torch.no_grad()
def _detached_logits(h, weight, bias, softcap, scale):
    """Logits for callers that asked for them in training (return_logits=True): detached, float32."""
    z = F.linear(h, weight, bias).float() * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def router_aux(model, spec, call, base_out):
    if not spec.router_aux or base_out is None:
        return None
    text = model.config.get_text_config()  # multimodal MoE models keep these in their text config
    wanted = call.get("output_router_logits")
    if wanted is None:
        wanted = getattr(model.config, "output_router_logits", None) or getattr(text, "output_router_logits", False)
    router_logits = getattr(base_out, "router_logits", None)
    if not wanted or router_logits is None:
        return None
    func = _module_attr(model, "load_balancing_loss_func")
    experts = getattr(model, "num_experts", None) or getattr(text, "num_experts", None) or text.num_local_experts
    top_k = getattr(model, "num_experts_per_tok", None) or text.num_experts_per_tok
    return func(router_logits, experts, top_k, call.get("attention_mask"))


def _module_attr(model, name):
    """`name` from the modeling module of the model's (first transformers) class: FSDP2 subclasses the class."""
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and hasattr(module, name) and cls.__module__.startswith("transformers."):
            return getattr(module, name)
    raise RuntimeError(f"no {name} found for {type(model).__name__}")


def _output(base_out, loss, logits, aux):
    """The stock output (its own class, caches, router logits, hidden states...) with our loss and logits."""
    ours = {"loss": loss, "logits": logits}
    if aux is not None:
        ours["aux_loss"] = aux
    values = {}
    for f in dataclasses.fields(base_out):
        if f.name in ours:
            values[f.name] = ours[f.name]
        elif getattr(base_out, f.name, None) is not None:
            values[f.name] = getattr(base_out, f.name)
    return type(base_out)(**values)
