"""Loss and dL/dlogits for one chunk of logits rows, in plain PyTorch.

This is the `torch` backend's row kernel and the readable twin of `triton_impl.ce_rows`: both take a chunk of
raw logits z = W h + b (any float dtype), compute per-row loss in float32, and, when asked,
overwrite the chunk in place with the gradient of (row_scale * loss) with respect to the raw logits.

Per row t with target ids k, probabilities tau_k (one-hot: one id, tau=1), smoothing eps, z-loss c, weight w:
    x      = softcap * tanh(scale * z / softcap)          (or scale * z)
    loss_t = w * [(1-eps) * (T lse - sum_k tau_k x_k) + eps * (lse - mean_j x_j) + c lse^2],  T = sum_k tau_k
    dL/dx  = w * [((1-eps) T + eps + 2 c lse) p - (1-eps) tau - eps / V]
    dL/dz  = dL/dx * scale * (1 - tanh^2)                  (softcap chain rule)
"""
from __future__ import annotations

import functools

import torch

from .spec import RowInputs, LossSpec

# A chunk is worked on in row blocks of about ROW_BLOCK_BYTES of float32: each block's float32 buffers (the copy
# of a bf16/fp16 block, the softmax, tanh) stay in cache through the row's passes, and the chunk budget pays only
# the chunk itself (bf16 chunks hold 3x the rows: 2 bytes per logit, not 6). The buffers are allocated once per
# chunk (Scratch): a fresh multi-MiB CPU allocation per block goes back to the OS when freed and page-faults in
# again. Measured on the CPU, row math of a 512 x 32000 bf16 chunk: whole-chunk buffers 70 ms, fresh buffers per
# block 74 ms, reused block buffers 20 ms.
ROW_BLOCK_BYTES = 4 << 20
# ... but never fewer than ROW_BLOCK_MIN_ROWS rows (V > 32768): each op over a block is one OpenMP parallel
# region, and at V=151936 a 4 MiB block is 6 rows, ~15 regions per 6 rows. On a loaded CPU every region's barrier
# waits for descheduled threads: measured (2 cores, load ~5, 2026-12-05) on a 512 x 151936 fp32 chunk, 4 MiB
# blocks 2020 ms, 32-row (19 MiB) blocks 638 ms, 64 MiB 467 ms; bf16 1024 rows 10.8 s / 4.8 s / 2.6 s.
# The price: the float32 scratch of a low-precision chunk is up to 2-3 blocks of 32 rows (V=151936: 19 MiB each).
ROW_BLOCK_MIN_ROWS = 32


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
        block = min(z.shape[0], max(ROW_BLOCK_MIN_ROWS, ROW_BLOCK_BYTES // (4 * max(1, z.shape[1]))))
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


def _exp_rows(x: torch.Tensor, z: torch.Tensor, scratch: Scratch):
    """(p, log S, S or None) for shifted rows x (max 0), S = sum exp(x): p / S is the softmax.
    A float32 copy of a low-precision chunk goes through torch's fused softmax into scratch (p normalized, None):
    about 2x faster than exp_ on CPU (0.88 vs 1.26 ms for 64 x 32000), and the copy back to z is needed anyway.
    A float32/64 chunk (x is z) is exponentiated in place: no buffer and no copy back, 1/S folded into the
    gradient's scale. Never exp(x - lse): lse's rounding would dominate p ~ 1 at large logits."""
    if x is not z:
        p = torch.softmax(x, 1, out=scratch("p", x.shape[0]))
        return p, p.amax(1).log_().neg_(), None  # the max's entry is exp(0) / S
    sum_exp = x.exp_().sum(1)
    return x, sum_exp.log(), sum_exp


@in_row_blocks
def ce_rows(z: torch.Tensor, rows: RowInputs, spec: LossSpec, compute_grad: bool, scratch: Scratch) -> torch.Tensor:
    """Returns loss_rows in float32; if compute_grad, z now holds d(row_scale*loss)/dz."""
    x, tanh = transform_(z, spec, scratch)
    ids, tau = rows.ids, rows.probs  # (n, K); ignored entries have id 0 and tau 0
    eps, zl, vocab = spec.label_smoothing, spec.z_loss, x.shape[1]
    row_max = x.amax(1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    x.sub_(row_max[:, None])  # shifted logits: the terms below never subtract two large numbers
    tau_sum = tau.sum(1)
    tau_dot_gap = -(tau * x.gather(1, ids)).sum(1)  # sum_k tau_k (max - x_k) >= 0
    mean_gap = -x.mean(1) if eps else None
    p, log_sum, sum_exp = _exp_rows(x, z, scratch)
    lse = row_max + log_sum
    loss, active = weighted_row_loss(log_sum, tau_sum, tau_dot_gap, mean_gap, lse, rows, spec)
    if not compute_grad:
        return loss
    coef = torch.where(active, rows.weight * rows.scale, torch.zeros_like(loss))
    factor = ((1.0 - eps) * tau_sum + eps + 2.0 * zl * lse).mul_(coef)
    p.mul_((factor if sum_exp is None else factor.div_(sum_exp))[:, None])  # the softmax, scaled
    p.scatter_add_(1, ids, -(1.0 - eps) * tau * coef[:, None])
    if eps:
        p.sub_((eps / vocab) * coef[:, None])
    to_raw_grad_(p, z, tanh, spec)
    return loss
