"""The committed proof, read without the proof machinery, and the fingerprint of the code each proof covered.

patching imports this module; proof imports patching; nothing here imports either (no cycle).

A family's fingerprint hashes the source of the code its loss goes through: the forward of the causal-LM class,
the forward of its base model and the loss function (with the same-module helpers it calls), each normalized
(comments, docstrings and layout do not count). The proof records it (`python -m hf_fusedce.cards --refresh`);
`patch()` compares it with the installed transformers and warns once per family when it moved, since the
generic forward was proven on the old code only. `hf-fusedce check --model-type X` re-proves the family and
remembers the new fingerprint in a local file (HF_FUSEDCE_CACHE, default ~/.cache/hf_fusedce), which silences
the warning for that code.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import textwrap
import warnings
from pathlib import Path

from ..cache import cache_root

# The committed proof of every family (written by `python -m hf_fusedce.cards --refresh`), shipped with the package.
RESULTS_PATH = Path(__file__).resolve().parent.parent / "data" / "proof_results.json"
_WARNED: set[str] = set()  # families already warned about in this process


@functools.lru_cache(maxsize=1)
def _recorded() -> dict:
    try:
        doc = json.loads(RESULTS_PATH.read_text())
    except (OSError, ValueError):
        return {}
    return {r["model_type"]: {"transformers": doc.get("transformers"), **r} for r in doc.get("results", [])}


def recorded_result(model_type: str) -> dict | None:
    """This family's entry of the committed proof (status, reason, transformers version, fingerprint), or None."""
    return _recorded().get(model_type)


def media_proven_types() -> frozenset[str]:
    """Model types whose recorded proof includes an image or audio batch: the forward fuses their media inputs."""
    return frozenset(t for t, r in _recorded().items()
                     if r["status"] == "proven" and {"image", "audio"} & set(r.get("variants", ())))


def media_status(r: dict) -> str:
    """What a result says about images / audio: "image" / "audio" (proven exact on such a batch), "text only"
    (a multimodal family proven on text batches only: its media inputs run stock), or "-" (a text model)."""
    media = [v for v in r["variants"] if v in ("image", "audio")]
    if media:
        return media[0]
    if r["status"] != "proven":
        return "-"
    return "text only" if r.get("multimodal") or "proven on text only" in r.get("reason", "") else "-"


def status_text(r: dict) -> str:
    """The one-line status users see (cards, `hf-fusedce check`, `supported_model_types(status=True)`)."""
    if r["status"] != "proven":
        return f"{r['status']} ({r['reason']})" if r["reason"] else r["status"]
    media = media_status(r)
    if media in ("image", "audio"):
        return f"proven exact on an {media} batch"
    if media == "text only":
        return f"proven on text only ({r['reason'].split('proven on text only: ')[-1]})"
    return "proven"


# ---- fingerprints ------------------------------------------------------------------------------------------------

def _forward_owner(cls) -> type:
    return next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)


@functools.lru_cache(maxsize=None)
def _code_hash(func) -> str:
    """sha256 (16 hex) of the function's normalized source: parsed, docstrings dropped, unparsed."""
    func = inspect.unwrap(func)  # through functools.wraps decorators (can_return_tuple, a class patch of ours)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):  # no source (built-in, compiled): the bytecode then
        code = getattr(func, "__code__", None)
        return hashlib.sha256(code.co_code if code else repr(func).encode()).hexdigest()[:16]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


def _loss_function(model):
    """The loss the model's forward calls as `self.loss_function` (without the property's fallback warning)."""
    from transformers.loss.loss_utils import LOSS_MAPPING
    own = model.__dict__.get("_loss_function") or getattr(type(model), "_loss_function", None)
    return own or LOSS_MAPPING.get(getattr(model, "loss_type", None), LOSS_MAPPING["ForCausalLM"])


def _with_helpers(func) -> dict[str, object]:
    """The function and the functions of its own module it calls by name (ForCausalLMLoss -> fixed_cross_entropy)."""
    func = inspect.unwrap(func)
    found = {func.__qualname__: func}
    module = inspect.getmodule(func)
    for name in getattr(getattr(func, "__code__", None), "co_names", ()):
        helper = getattr(module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == func.__module__:
            found[helper.__qualname__] = helper
    return found


def fingerprint(model) -> dict[str, str | None]:
    """{qualified name: hash} of the code the family's loss runs through (see the module docstring)."""
    owner = _forward_owner(type(model))
    parts = {f"{owner.__name__}.forward": owner.__dict__["forward"]}
    base = getattr(model, "base_model", model)
    if base is not model:
        base_owner = _forward_owner(type(base))
        parts[f"{base_owner.__name__}.forward"] = base_owner.__dict__["forward"]
    parts.update(_with_helpers(_loss_function(model)))
    return {name: _code_hash(func) if _of_transformers(func) else None for name, func in sorted(parts.items())}


def _of_transformers(func) -> bool:
    """Transformers' own code, not a forward another library assigned over it (Liger's, composed with ours by
    hf.patching, and checked by that library's own tests): None in the fingerprint, left out of the comparison."""
    return getattr(inspect.unwrap(func), "__module__", "").startswith("transformers.")


# ---- local re-proofs (hf-fusedce check) ----------------------------------------------------------------------------

def local_path() -> Path:
    return cache_root() / "reproven.json"


def _local() -> dict:
    try:
        return json.loads(local_path().read_text())
    except (OSError, ValueError):
        return {}


def remember(model_type: str, prints: dict[str, str], transformers_version: str) -> Path:
    """Record a family re-proven on this machine's transformers: patch() stops warning for that code."""
    doc = _local()
    doc[model_type] = {"fingerprint": prints, "transformers": transformers_version}
    path = local_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def changed_code(model, model_type: str) -> list[str] | None:
    """Names of the functions whose code differs from the family's proof; None when nothing is recorded to compare
    (no proof, an old record without fingerprint, or another class than the one proven)."""
    rec = recorded_result(model_type)
    if not rec or rec.get("status") != "proven" or not rec.get("fingerprint"):
        return None
    if rec.get("class_name") and _forward_owner(type(model)).__name__ != rec["class_name"]:
        return None
    now = fingerprint(model)
    if now == _local().get(model_type, {}).get("fingerprint"):
        return []
    was = rec["fingerprint"]
    if any(v is None for v in now.values()):  # another library's forward in place: compare transformers' code only
        now = {k: v for k, v in now.items() if v is not None}
        was = {k: v for k, v in was.items() if k in now}
    return sorted(k for k in now.keys() | was.keys() if now.get(k) != was.get(k))


class ProofOutdatedWarning(UserWarning):
    """The installed transformers changed the code a family was proven on (filterable on its own)."""


def warn_if_changed(model, model_type: str, stacklevel: int = 3) -> None:
    """Warn once per family when its forward / loss code is not the code it was proven on."""
    if model_type in _WARNED:
        return
    changed = changed_code(model, model_type)
    if not changed:
        return
    import transformers
    _WARNED.add(model_type)
    rec = recorded_result(model_type)
    warnings.warn(f"hf_fusedce: model_type {model_type!r} was proven equal to stock on transformers "
                  f"{rec.get('transformers')}, and the installed transformers {transformers.__version__} changed "
                  f"its code ({', '.join(changed)}). Re-prove it in seconds with `hf-fusedce check --model-type "
                  f"{model_type}` (this warning then stops).", ProofOutdatedWarning, stacklevel=stacklevel)
