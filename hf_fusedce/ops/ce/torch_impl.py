"""Loss and dL/dlogits for one chunk of logits rows, in plain PyTorch.

This is the `torch` backend's row kernel and the readable twin of `triton_impl.ce_rows`: both take a chunk of
raw logits z = W h + b (any float dtype), compute per-row loss in float32, and, when asked,
overwrite the chunk in place with the gradient of (row_scale * loss) with respect to the raw logits. Softcapped
rows (mode "capped") have a native twin, cpu_native.py, used when it builds on this machine.

Per row t with target ids k, probabilities tau_k (one-hot: one id, tau=1), smoothing eps, z-loss c, weight w:
    x      = softcap * tanh(scale * z / softcap)          (or scale * z)
    loss_t = w * [(1-eps) * (T lse - sum_k tau_k x_k) + eps * (lse - mean_j x_j) + c lse^2],  T = sum_k tau_k
    dL/dx  = w * [((1-eps) T + eps + 2 c lse) p - (1-eps) tau - eps / V]
    dL/dz  = dL/dx * scale * (1 - tanh^2)                  (softcap chain rule)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import cpu_native
from .spec import RowInputs, LossSpec

# A chunk is worked on in row blocks of about ROW_BLOCK_BYTES of float32: each block's float32 buffers (the copy
# of a bf16/fp16 block, the exponentials, tanh) stay in the cores' L2 through the row's passes (the elementwise ops
# split a block between the threads), and the chunk budget pays only the chunk itself (bf16 chunks hold 3x the
# rows: 2 bytes per logit, not 6). The buffers are allocated once per chunk (Scratch): a fresh multi-MiB CPU
# allocation per block goes back to the OS when freed and page-faults in again. Row math of a whole chunk by block
# size, measured on the project's CPU (2-core Xeon, 2 MiB L2 per core, quiet, 2026-12-05): 1024 x 151936 bf16:
# 1 MiB 109 ms, 2 MiB 117, 4 MiB 95, 8 MiB 123, 19 MiB (32 rows) ~160; 512 x 151936 fp32: 52 / 60 / 45 / 61 ms.
# Small blocks mean many short OpenMP regions: on an oversubscribed CPU (more busy threads than cores) each
# region's barrier waits for descheduled threads, and blocks of >= 32 rows were faster there.
ROW_BLOCK_BYTES = 4 << 20
ROW_BLOCK_MIN_ROWS = 1
# Softcapped logits x = c tanh(.) lie in [-c, c]: for c <= 40, exp(x) is a normal float32 (e^-40 .. e^40) and a
# row of a million of them sums far below float32's overflow, so the row max (two passes) is not needed. Gemma 2
# uses c = 30. Larger caps take the general path.
FIXED_SHIFT_MAX_SOFTCAP = 40.0


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float32, torch.float64)


def working_bytes_per_logit(spec: LossSpec, chunk_dtype: torch.dtype) -> int:
    """Bytes per logit the chunk budget pays: the chunk itself (the float32 work is a scratch of a few row blocks)."""
    return torch.finfo(chunk_dtype).bits // 8


class Scratch:
    """Float32 (float64 for float64 chunks) buffers of one row block, by name, allocated on first use and reused
    by every block of the chunk."""

    def __init__(self, block_rows: int, z: torch.Tensor):
        self.shape = (block_rows, z.shape[1])
        self.dtype, self.device = torch.promote_types(z.dtype, torch.float32), z.device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._buffers[name][:rows]


def in_row_blocks(row_fn):
    """row_fn(z, rows, spec, compute_grad, scratch) -> per-row outputs, applied block by block to the chunk with
    one Scratch (rows are independent: the same numbers as one call on the whole chunk)."""

    @functools.wraps(row_fn)
    def run(z: torch.Tensor, rows, spec, compute_grad: bool):
        block = row_block_rows(z)
        scratch = Scratch(block, z)
        if z.shape[0] <= block:
            return row_fn(z, rows, spec, compute_grad, scratch)
        return torch.cat([row_fn(z[i:i + block], rows.select(slice(i, i + block)), spec, compute_grad, scratch)
                          for i in range(0, z.shape[0], block)])

    return run


def transform_(z: torch.Tensor, spec: LossSpec, scratch: Scratch | None = None):
    """(x, tanh): x = softcap * tanh(scale * z / softcap) (or scale * z) in float32 at least, in place when z is;
    tanh kept for the chain rule (None without softcap). New buffers come from `scratch` when given."""
    def buffer(name):
        if scratch is not None:
            return scratch(name, z.shape[0])
        return torch.empty(z.shape, dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)

    x = buffer("x").copy_(z) if is_low_precision(z.dtype) else z
    if spec.logit_scale != 1.0:
        x.mul_(spec.logit_scale)
    tanh = None
    if spec.softcap is not None:
        tanh = x.div_(spec.softcap).tanh_()
        x = torch.mul(tanh, spec.softcap, out=buffer("capped"))  # tanh is kept for the chain rule
    return x, tanh


def weighted_row_loss(log_sum, tau_sum, tau_dot_gap, mean_gap, lse, rows: RowInputs, spec: LossSpec):
    """(loss, active) per row from the row statistics (see the module docstring); zero where the weight is 0.
    tau_sum*lse - sum tau x == tau_sum*log_sum + sum tau (max - x): exact for large logits."""
    eps, zl = spec.label_smoothing, spec.z_loss
    loss = (1.0 - eps) * (tau_sum * log_sum + tau_dot_gap)
    if eps:
        loss = loss + eps * (log_sum + mean_gap)
    if zl:
        loss = loss + zl * lse.square()
    active = rows.weight != 0
    return torch.where(active, rows.weight * loss, torch.zeros_like(loss)), active


def to_raw_grad_(g: torch.Tensor, z: torch.Tensor, tanh, spec: LossSpec) -> None:
    """dL/dx -> dL/dz through softcap and scale, left in z."""
    if tanh is not None:
        g.mul_(tanh.square_().neg_().add_(1.0))
    if spec.logit_scale != 1.0:
        g.mul_(spec.logit_scale)
    if g is not z:  # identity, not data_ptr: torch.compile traces it
        z.copy_(g)


def row_block_rows(z: torch.Tensor, buffers: int = 1) -> int:
    """Rows per block: `buffers` float32 block buffers share ROW_BLOCK_BYTES."""
    return min(z.shape[0], max(ROW_BLOCK_MIN_ROWS, ROW_BLOCK_BYTES // (4 * buffers * max(1, z.shape[1]))))


@dataclass
class _ChunkRows:
    """Per-row vectors of one chunk, filled block by block (each block writes its slice through out=), so the
    per-row arithmetic runs once per chunk, not once per block: at V=151936 a block is 3 rows, and a few dozen
    small ops per block cost as much as the block's passes over the logits."""

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    target_x: torch.Tensor  # (n, K) shifted logits x_k - max at the ids
    mean_shifted: torch.Tensor | None  # mean_j (x_j - max), label smoothing only

    @classmethod
    def empty(cls, n: int, k: int, dtype: torch.dtype, device, smoothing: bool) -> "_ChunkRows":
        new = functools.partial(torch.empty, dtype=dtype, device=device)
        return cls(new(n), new(n), new(n, k), new(n) if smoothing else None)


# How a block's gradient is written (chosen per chunk):
#   "rounded": a low-precision chunk, no softcap, one id per row: z = factor * p + shift computed in the float32
#              block and rounded once into z; the target entries rewritten once per chunk from their float32 value
#              (adding -tau after the rounding would cancel p ~ 1).
#   "inplace": a float32/64 chunk without softcap: p is z itself; the target term scatter-added once per chunk.
#   "capped":  softcap <= FIXED_SHIFT_MAX_SOFTCAP, one id per row: the capped logits are bounded, so exp(x) needs
#              no row max (see _capped_block_rows); the target entries are rewritten per chunk as in "rounded".
#   "general": a larger softcap (the chain rule needs the target term first) or soft targets on a low-precision
#              chunk.
# In the first three, dL/dz = logit_scale * dL/dx is folded into the terms.
def _write_mode(z: torch.Tensor, spec: LossSpec, k: int) -> str:
    if spec.softcap is not None:
        return "capped" if spec.softcap <= FIXED_SHIFT_MAX_SOFTCAP and k == 1 else "general"
    if not is_low_precision(z.dtype):
        return "inplace"
    return "rounded" if k == 1 else "general"


@dataclass
class _GradTerms:
    """dL/dz = factor * exp(x - max) + shift, plus target at the ids; per-row factor = base / sum_exp (+ z-loss)."""

    mode: str
    base: torch.Tensor  # ((1-eps) sum tau + eps) * coef
    coef: torch.Tensor  # weight * upstream scale, 0 on ignored rows
    target: torch.Tensor  # (n, K) -(1-eps) tau coef
    shift: torch.Tensor | None  # -eps coef / V, label smoothing only
    z_loss: float

    @classmethod
    def build(cls, mode: str, rows: RowInputs, tau_sum, spec: LossSpec, vocab: int) -> "_GradTerms":
        eps = spec.label_smoothing
        coef = torch.where(rows.weight != 0, rows.weight * rows.scale, torch.zeros_like(tau_sum))
        if mode != "general":
            coef = coef * spec.logit_scale
        shift = (-eps / vocab) * coef if eps else None
        return cls(mode, ((1.0 - eps) * tau_sum + eps) * coef, coef, -(1.0 - eps) * rows.probs * coef[:, None],
                   shift, spec.z_loss)

    def factor(self, sl, stats: _ChunkRows) -> torch.Tensor:
        factor = self.base[sl]
        if self.z_loss:  # d(zl lse^2)/dx = 2 zl lse p
            lse = stats.row_max[sl] + stats.sum_exp[sl].log()
            factor = factor + 2.0 * self.z_loss * lse * self.coef[sl]
        return factor / stats.sum_exp[sl]


@torch.no_grad()
def ce_rows(z: torch.Tensor, rows: RowInputs, spec: LossSpec, compute_grad: bool) -> torch.Tensor:
    """Returns loss_rows in float32; if compute_grad, z now holds d(row_scale*loss)/dz. Rows are worked on in
    blocks that stay in cache (ROW_BLOCK_BYTES); the per-row arithmetic is done once for the chunk."""
    n, vocab = z.shape
    eps, k = spec.label_smoothing, rows.ids.shape[1]
    tau_sum = rows.probs.sum(1)
    stats = _ChunkRows.empty(n, k, torch.promote_types(z.dtype, torch.float32), z.device, bool(eps))
    mode = _write_mode(z, spec, k)
    grad = _GradTerms.build(mode, rows, tau_sum, spec, vocab) if compute_grad else None
    capped = mode == "capped"
    if capped:  # shift by 0 (z-loss reads the row max in the blocks)
        stats.row_max.zero_()
    if capped and cpu_native.supports(z, rows.ids):  # the same math in one native call (cpu_native.py)
        cpu_native.capped_rows(z, rows.ids, spec.logit_scale / spec.softcap, spec.softcap, stats.sum_exp,
                               stats.target_x, stats.mean_shifted, grad)
    else:
        block = row_block_rows(z, buffers=max(1, is_low_precision(z.dtype) + (spec.softcap is not None)))
        block_fn, scratch = _capped_block_rows if capped else _block_rows, Scratch(block, z)
        for start in range(0, n, block):
            sl = slice(start, min(start + block, n))
            block_fn(z[sl], sl, rows.ids[sl], spec, stats, grad, scratch)
    target_tanh = _capped_to_shifted(stats, spec.softcap) if capped else None
    if grad is not None and grad.mode != "general":
        _add_target_terms(z, rows.ids, stats, grad, target_tanh)
    log_sum = stats.sum_exp.log()
    tau_dot_gap = (rows.probs * stats.target_x).sum(1).neg_()  # sum_k tau_k (max - x_k) >= 0
    mean_gap = stats.mean_shifted.neg() if eps else None
    loss, _ = weighted_row_loss(log_sum, tau_sum, tau_dot_gap, mean_gap, stats.row_max + log_sum, rows, spec)
    return loss


def _block_rows(zb, sl, ids, spec, stats, grad, scratch):
    """One block's passes: shifted logits and their exponentials in the block's buffer, row statistics into
    `stats`; with `grad`, the block's gradient written over zb (target terms aside, see _write_mode)."""
    x, tanh = transform_(zb, spec, scratch)
    row_max = torch.amax(x, 1, out=stats.row_max[sl]).nan_to_num_(0.0, 0.0, 0.0)  # all -inf rows: shift by 0
    x.sub_(row_max[:, None])  # shifted logits: the terms below never subtract two large numbers
    _record_targets_and_mean(x, sl, ids, stats)
    p = x.exp_()  # unnormalized: 1/S goes into the factor. Never exp(x - lse): lse's rounding would dominate p ~ 1
    torch.sum(p, 1, out=stats.sum_exp[sl])
    if grad is None:
        return
    _scale_by_factor_(p, sl, stats, grad)
    if grad.mode == "general":
        p.scatter_add_(1, ids, grad.target[sl])
        to_raw_grad_(p, zb, tanh, spec)
    elif grad.mode == "rounded":
        zb.copy_(p)  # not torch.mul(..., out=zb): a float32 op with a bf16 out= goes through a temporary, 10x slower


def _record_targets_and_mean(x, sl, ids, stats: _ChunkRows) -> None:
    torch.gather(x, 1, ids, out=stats.target_x[sl])
    if stats.mean_shifted is not None:
        torch.mean(x, 1, out=stats.mean_shifted[sl])


def _scale_by_factor_(p, sl, stats: _ChunkRows, grad: _GradTerms) -> None:
    """p <- factor p (+ shift) per row, in place, one pass."""
    factor = grad.factor(sl, stats)[:, None]
    if grad.shift is None:
        p.mul_(factor)
    else:
        torch.addcmul(grad.shift[sl, None], p, factor, out=p)


def _capped_block_rows(zb, sl, ids, spec, stats, grad, scratch):
    """_block_rows for mode "capped": t = tanh(scale z / c) and e = exp(c t) (no row max: FIXED_SHIFT_MAX_SOFTCAP);
    stats get t at the ids and mean t (scaled by c per chunk, _capped_to_shifted); with `grad`, zb gets
    (factor e + shift) (1 - t^2). Eight passes over the block where the general path makes fourteen."""
    t = scratch("x", zb.shape[0]).copy_(zb) if is_low_precision(zb.dtype) else zb
    t.mul_(spec.logit_scale / spec.softcap).tanh_()
    e = torch.mul(t, spec.softcap, out=scratch("exp", zb.shape[0])).exp_()
    torch.sum(e, 1, out=stats.sum_exp[sl])
    _record_targets_and_mean(t, sl, ids, stats)
    if grad is None:
        return
    _scale_by_factor_(e, sl, stats, grad)
    t_sq = t.square_()
    torch.addcmul(e, e, t_sq, value=-1.0, out=t_sq)  # g (1 - t^2): the chain rule through tanh, one pass
    if t_sq is not zb:
        zb.copy_(t_sq)


def _capped_to_shifted(stats: _ChunkRows, softcap: float) -> torch.Tensor:
    """Mode "capped" leaves tanh values in stats: make them the capped logits (shifted by 0, the row max the loss
    formulas read); returns tanh at the ids for the target terms' chain rule."""
    target_tanh = stats.target_x.clone()
    stats.target_x.mul_(softcap)
    if stats.mean_shifted is not None:
        stats.mean_shifted.mul_(softcap)
    return target_tanh


def _add_target_terms(z, ids, stats: _ChunkRows, grad: _GradTerms, target_tanh=None):
    """The target term at the ids, once per chunk. "rounded" and "capped": the entries recomputed in float32 from
    the stored shifted logits (exp of the same value the block exponentiated; times 1 - tanh^2 when capped) and
    rounded once."""
    if grad.mode == "inplace":
        z.scatter_add_(1, ids, grad.target)
        return
    at_target = stats.target_x.exp().mul_(grad.factor(slice(None), stats)[:, None]).add_(grad.target)
    if grad.shift is not None:
        at_target.add_(grad.shift[:, None])
    if target_tanh is not None:
        at_target.mul_(target_tanh.square().neg_().add_(1.0))
    rows = torch.arange(z.shape[0], device=z.device)
    z.index_put_((rows, ids[:, 0]), at_target[:, 0].to(z.dtype))  # bf16 scatter_ copies the whole chunk (225 ms)
