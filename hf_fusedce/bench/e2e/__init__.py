"""End-to-end mode: one training step of a random-initialised Llama-3.2-1B-shaped model, stock vs patched.

For each variant (stock transformers, and `hf_fusedce.patch(model)`): step time and tokens/s at `seq`
(median of timed steps after a warm-up step that also creates the optimizer state), peak memory of a step
(total, and above the resident weights + optimizer state), and the longest sequence that fits: doubling then
bisection over the sequence length, catching OOM on GPU. On CPU there is no OOM to catch, so "fits" means
"the step's peak above the resident state stays within a stated memory budget" (measured by the
live-tensor tracker): the same comparison, scaled down and labelled as such.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

import hf_fusedce
from hf_fusedce.memory import LiveTensorTracker

from ..runner import TIME_SKIP, environment, free_memory, is_oom, log, sync
from ..shapes import DtypeMode

# Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, tied.
GPU_MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                 rope_theta=500000.0, max_position_embeddings=1 << 20)
CPU_MODEL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=32000, tie_word_embeddings=True, head_dim=64,
                 rope_theta=500000.0, max_position_embeddings=1 << 16)


def e2e_defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"model": GPU_MODEL, "model_name": "llama-3.2-1b-shaped (random init)", "seq": 4096,
                "max_seq": 262144, "granularity": 4096, "cpu_budget_bytes": None}
    return {"model": CPU_MODEL, "model_name": "tiny llama (h256, 2 layers, V32000, tied; CPU scale-down)",
            "seq": 1024, "max_seq": 8192, "granularity": 256, "cpu_budget_bytes": 512 << 20}


def _build_model(cfg_kwargs: dict, mode: DtypeMode, device, grad_ckpt: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**cfg_kwargs, use_cache=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device=device, dtype=mode.param_dtype)
    model.train()
    if grad_ckpt:
        # transformers 5.23 renamed it activation_checkpointing_enable; the GPU image's 5.17 has only the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _state_bytes(model, opt) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        total += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    return total


class _Trainer:
    def __init__(self, model, mode: DtypeMode, device, vocab: int):
        self.model, self.mode, self.device, self.vocab = model, mode, device, vocab
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def forward_backward(self, seq: int) -> float:
        ids = torch.randint(0, self.vocab, (1, seq), device=self.device)
        with self.mode.autocast(self.device):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach())

    def optimizer_step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, seq: int) -> float:
        loss = self.forward_backward(seq)
        self.optimizer_step()
        return loss


def _measure_step(tr: _Trainer, seq: int) -> tuple[int, int, int]:
    """Peaks of one step above the resident state (weights + optimizer state): (forward+backward, whole step
    including the optimizer update), and the resident state's bytes."""
    dev = tr.device
    tr.opt.zero_grad(set_to_none=True)
    free_memory(dev)
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        tr.forward_backward(seq)
        sync(dev)
        fwd_bwd = torch.cuda.max_memory_allocated(dev) - base
        torch.cuda.reset_peak_memory_stats(dev)
        tr.optimizer_step()
        sync(dev)
        whole = max(fwd_bwd, torch.cuda.max_memory_allocated(dev) - base)
        return fwd_bwd, whole, base
    t1 = LiveTensorTracker()
    with t1:
        tr.forward_backward(seq)
    carried = t1.live_bytes  # the gradients (and anything else the step keeps) going into the update
    t2 = LiveTensorTracker()
    with t2:
        tr.optimizer_step()
    return t1.peak_bytes, max(t1.peak_bytes, carried + t2.peak_bytes), _state_bytes(tr.model, tr.opt)


def _fits(tr: _Trainer, seq: int, budget: int | None) -> bool:
    try:
        _, above, _ = _measure_step(tr, seq)
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        err = None
        free_memory(tr.device)
        return False
    finally:
        tr.opt.zero_grad(set_to_none=True)
    return budget is None or above <= budget


def longest_seq(fits, start: int, cap: int, gran: int, out_of_time=lambda: False) -> tuple[int | None, str]:
    """Largest multiple of `gran` up to `cap` for which fits(seq) holds: doubling from `start`, then bisection
    between the last length that fit and the first that did not (assumes fitting is monotone in seq)."""
    lo, hi = 0, None
    seq = min(start, cap)
    while hi is None:
        if out_of_time():
            return (lo or None), f">= {lo} (time budget spent, search incomplete)"
        log(f"[e2e]     probe seq={seq}")
        if fits(seq):
            lo = seq
            if seq >= cap:
                return lo, f">= {lo} (search cap)"
            seq = min(seq * 2, cap)
        else:
            hi = seq
    while hi - lo > gran:
        mid = (lo + hi) // 2 // gran * gran
        if mid <= lo:
            break
        if out_of_time():
            return (lo or None), f">= {lo} and < {hi} (time budget spent, search incomplete)"
        log(f"[e2e]     probe seq={mid}")
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return (lo or None), (str(lo) if lo else f"< {hi}")


def run_e2e(device, modes: list[DtypeMode], sink, *, seq: int | None = None, grad_ckpt: bool = True,
            search: bool = True, max_seq: int | None = None, repeats: int = 3, budget_bytes: int | None = None,
            seed: int = 0, out_of_time=lambda: False):
    d = e2e_defaults(device)
    seq = seq or d["seq"]
    max_seq = max_seq or d["max_seq"]
    budget = budget_bytes if budget_bytes is not None else d["cpu_budget_bytes"]
    if device.type == "cuda":
        budget = budget_bytes  # on GPU the device's memory is the budget (OOM), unless one is given
    env = environment(device)
    for mode in modes:
        for variant in ("stock", "patched"):
            rec = {**env, "record": "e2e", "model": d["model_name"], "model_config": d["model"],
                   "variant": variant, "dtype": mode.name, "seq": seq, "batch": 1,
                   "gradient_checkpointing": grad_ckpt, "optimizer": "AdamW", "status": "ok"}
            if device.type != "cuda":
                rec["memory_note"] = (f"CPU: 'fits' means the step's peak above resident state <= "
                                      f"{(budget or 0) >> 20} MiB (live-tensor tracker), a scaled-down stand-in "
                                      "for the GPU's OOM")
            log(f"[e2e] {variant} {mode.name} seq={seq}")
            if out_of_time():
                rec["status"] = TIME_SKIP
                sink(rec)
                continue
            model = tr = None
            try:
                model = _build_model(d["model"], mode, device, grad_ckpt, seed)
                if variant == "patched":
                    hf_fusedce.patch(model)
                tr = _Trainer(model, mode, device, d["model"]["vocab_size"])
                tr.step(seq)  # warm-up; creates the optimizer state
                times = []
                for _ in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    loss = tr.step(seq)
                    sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                fwd_bwd, above, base = _measure_step(tr, seq)
                ms = statistics.median(times)
                rec.update({"step_ms": ms, "times_ms": [round(t, 3) for t in times],
                            "tokens_per_s": seq / (ms / 1e3), "loss": loss,
                            "peak_mem_bytes": base + above, "peak_above_state_bytes": above,
                            "peak_fwd_bwd_above_state_bytes": fwd_bwd,
                            "state_bytes": _state_bytes(tr.model, tr.opt)})
                if search:
                    best, note = longest_seq(lambda n, tr=tr: _fits(tr, n, budget), seq, max_seq, d["granularity"],
                                             out_of_time)
                    rec.update({"max_seq": best, "max_seq_note": note, "max_seq_cap": max_seq,
                                "max_seq_granularity": d["granularity"]})
            except Exception as err:  # noqa: BLE001
                rec["status"] = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"
                err = None
            finally:
                if variant == "patched" and model is not None:
                    hf_fusedce.unpatch(model)
                del model, tr
                gc.collect()
                free_memory(device)
            log(f"[e2e]   {rec.get('status')} step {rec.get('step_ms')} ms, peak {rec.get('peak_mem_bytes')}, "
                f"longest {rec.get('max_seq_note')}")
            sink(rec)
