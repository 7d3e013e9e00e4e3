"""`--verify`: correctness of low-precision implementations at large shapes (N*V past 2^31) against float64.

The float64 reference never holds the [N x V] logits (see reference.subset_reference): the loss is exact
over all tokens; dL/dh is compared on random token rows, dL/dW on vocabulary rows (target ids that occur
plus random ids) — every compared entry computed exactly in float64 from the same bf16 inputs.
For scale, the same errors are computed for a "stock-like" baseline: what transformers' materialized path
computes (bf16 logits GEMM, fp32 softmax, bf16 dlogits, bf16 GEMMs for dh and dW), evaluated on the same
subsets without materializing. An implementation passes when each of its three errors is at most
2x the baseline's (plus 1e-6), i.e. it is as accurate as the path it replaces.
"""
from __future__ import annotations

import torch

from .reference import Reference, compare, subset_reference
from .runner import TIME_SKIP, environment, free_memory, is_oom, log, make_inputs
from .shapes import DTYPE_MODES, GPU_SHAPES, Shape, parse_shape

METHOD = ("Reference: float64 from the same inputs; loss over all tokens, dh on 256 random token rows, dW on "
          "512 vocab rows (occurring targets + random), never materializing N x V. Baseline: transformers' "
          "materialized bf16 path evaluated on the same subsets. pass: every error <= 2 x baseline + 1e-6.")


def default_cases(device: torch.device) -> list[tuple[Shape, int]]:
    if device.type == "cuda":
        # 16384*152064 = 2.49e9 and 65536*256000 = 1.68e10 logits: both past 2^31 = 2.15e9
        return [(GPU_SHAPES["qwen2.5-7b"], 16384), (GPU_SHAPES["llama3-8b"], 65536),
                (GPU_SHAPES["gemma2-2b"], 65536)]
    return [(parse_shape("256x16384"), 2048)]


@torch.no_grad()
def stock_like_errors(h, w, y, ref: Reference, chunk_rows: int = 4096) -> dict:
    """Errors of the materialized bf16 path (lm_head GEMM in bf16, .float(), CE; grads back through bf16)."""
    n = h.shape[0]
    n_valid = max(int((y != -100).sum()), 1)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    dw = torch.zeros((ref.dw_rows.numel(), w.shape[1]), dtype=torch.float32, device=h.device)
    vrows = ref.dw_rows
    for s in range(0, n, chunk_rows):
        hc, yc = h[s:s + chunk_rows], y[s:s + chunk_rows]
        z = (hc @ w.t()).float()
        lse = torch.logsumexp(z, 1)
        total += (lse - z.gather(1, yc[:, None]).squeeze(1)).double().sum()
        g = torch.softmax(z, 1)
        g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
        g = (g / n_valid).to(h.dtype)
        dw += (g.index_select(1, vrows).t() @ hc).float()
        del z, g
    hr, yr = h.index_select(0, ref.dh_rows), y.index_select(0, ref.dh_rows)
    g = torch.softmax((hr @ w.t()).float(), 1)
    g[torch.arange(g.shape[0], device=g.device), yr] -= 1.0
    dh = (g / n_valid).to(h.dtype) @ w
    full = Reference(ref.loss, ref.dh, ref.dw)  # dh / dw here are already the subset rows
    return compare(full, float(total / n_valid), dh, dw.to(h.dtype))


def run_verify(device, impls, sink, cases=None, mode_name: str = "bf16", seed: int = 0, explicit: bool = False,
               out_of_time=lambda: False):
    mode = DTYPE_MODES[mode_name]
    env = environment(device)
    resolved = [(impl, impl.resolve(device, explicit)) for impl in impls if impl.kind != "floor"]
    for shape, n in cases or default_cases(device):
        log(f"[verify] {shape.name} N={n} D={shape.d} V={shape.v} {mode.name} (N*V={n * shape.v:,})")
        base = {**env, "record": "verify", "shape": shape.name, "N": n, "D": shape.d, "V": shape.v,
                "dtype": mode.name, "method": METHOD}
        if out_of_time():
            for impl, _ in resolved:
                sink({**base, "impl": impl.name, "status": TIME_SKIP})
            continue
        try:
            h, w, y = make_inputs(shape, n, mode, device, seed)
            ref = subset_reference(h.detach(), w.detach(), y,
                                   budget_bytes=(4 << 30) if device.type == "cuda" else (256 << 20))
            baseline = stock_like_errors(h.detach(), w.detach(), y, ref)
        except Exception as err:  # noqa: BLE001
            status = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"
            err = None
            free_memory(device)
            for impl, _ in resolved:
                sink({**base, "impl": impl.name, "status": f"{status} (reference)"})
            continue
        log(f"[verify]   baseline (stock-like) {baseline}")
        for impl, fn in resolved:
            rec = {**base, "impl": impl.name, "baseline": baseline}
            if isinstance(fn, str):
                rec["status"] = fn
                sink(rec)
                continue
            try:
                h.grad = w.grad = None
                with mode.autocast(device):
                    loss = fn(h, w, y)
                loss.backward()
                errs = compare(ref, float(loss.detach()), h.grad, w.grad)
                rec.update(errs)
                rec["pass"] = all(errs[k] is not None and errs[k] <= 2 * baseline[k] + 1e-6 for k in errs)
                rec["status"] = "ok"
                del loss
            except Exception as err:  # noqa: BLE001
                rec["status"] = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"
                err = None
            finally:
                h.grad = w.grad = None
                free_memory(device)
            log(f"[verify]   {impl.name}: {rec.get('status')} pass={rec.get('pass')} "
                f"loss {rec.get('loss_rel_err')} dh {rec.get('dh_rel_err')} dW {rec.get('dw_rel_err')}")
            sink(rec)
        del h, w, y, ref
        free_memory(device)
