"""One pass for losses that a token's own statistics decide: the lm_head's forward and backward in 3 GEMMs.

`token_stats`' backward takes any upstream gradient, so it recomputes the logits: 4 GEMMs (8NHV FLOP). A loss
that is a sum over tokens of a function of each token's own statistics,

    L = Σ_t ℓ_t(logp_t, entropy_t, kl_t, lse_t)

(SFT, SFT's "extend" negatives, OPD's token-mean KL, GRPO: their means over tokens or sequences are constant
weights per token) knows each token's upstream gradient ∂ℓ_t/∂stat as soon as that token's statistics are. So
the forward takes bands of whole rows [R, V], computes their logits once, their statistics, ℓ's gradient
(autograd on the band's [R] statistics), dz, and turns dz into dh = dz W and dW += dz^T h on the spot: 3 GEMMs
(6NHV), as many as the materialised naive path, in O(R·V) memory. The backward only scales the saved dh, dW,
db by the loss's upstream gradient (Liger's fused linear cross-entropy does the same for plain CE).

A band holds whole rows because dz_j = g (p_j - onehot_j) needs the row's final lse: the native path's tall
column blocks (all rows x a slice of V) cannot produce it in the forward. Bands are at least MIN_BAND_ROWS
rows: every band reads W twice and adds its dW into the [V, H] accumulator, so short bands on a large
vocabulary pay in memory traffic what they save in GEMM time (band_rows).

A loss whose tokens' gradients depend on other tokens through sums over groups of them (DPO's pairs of
sequences, the gentle hinge's negatives), L = Σ_g L_g(stats of group g's tokens), runs one pass too when its bands
hold whole groups: a band's statistics then decide its groups' losses and so its tokens' gradients (plan_bands).
A band may stretch to GROUP_STRETCH times its size to hold one group; a larger group sends the whole call to
token_stats' recompute (ops.token_loss decides before any work).

Epilogues: on the chunked backend the native CPU kernels when built, PyTorch otherwise; on the Triton backend
(from TRITON_MIN_HIDDEN) vlmfast/kernels/logits_epilogue.py over logits from a tensor-core GEMM.
"""

from __future__ import annotations

import bisect
import itertools

import torch

from . import chunked, native
from ._inputs import OUTPUT_NAMES
from .function import first_order_only
from .precision import ieee_fp32

MIN_BAND_ROWS = 256
GROUP_STRETCH = 2


def band_rows(n_rows: int, vocab: int, hidden_size: int = 0, low_precision: bool = False) -> int:
    """Rows per band: as many as BLOCK_BYTES of fp32 logits hold, at least MIN_BAND_ROWS, at most n_rows.

    16-bit inputs kept 16-bit (the native GEMM) take all rows in one band when its buffers (fp32 logits and 16-bit
    dz: 6 bytes a logit) cost no more than the fp32 [V, H] dW accumulator that several bands need (one band
    rounds dW straight into W's dtype): up to 2H/3 rows, 597 on Qwen2-0.5B's head."""
    rows = max(MIN_BAND_ROWS, chunked.BLOCK_BYTES // (4 * vocab))
    if low_precision and n_rows * 6 <= max(rows * 6, 4 * hidden_size):
        rows = n_rows
    return max(1, min(n_rows, rows))


def budget_rows(backend: str, n: int, hidden: torch.Tensor, weight: torch.Tensor, where=None) -> int:
    """Rows per band of n on this backend: band_rows on the chunked one; on Triton's, as many rows of fp32 logits
    as kernels.scratch_bytes allows (1 GiB, less when the GPU has less than 4 GiB free) on `where` (a
    token_stats.Target; default: hidden's device)."""
    V, H = weight.shape
    if backend == "triton":
        from vlmfast.kernels import token_stats as kernels

        where = where or kernels.device_target(hidden.device)
        return max(1, min(n, kernels.scratch_bytes(where) // (4 * V)))
    return band_rows(n, V, H, chunked.LinearHead.keeps_16bit(hidden, weight))


class BandLoss:
    """The loss as each band computes it. Per token (no groups): fn(stats, index) -> [n] losses, summed. By groups
    (the rows sorted by group: `group_ids` [K] the groups present in row order, `group_sizes` their rows; whole
    groups per band): fn(stats, index) -> [G] losses of every group from these tokens alone, of which the band
    counts its own groups'; `absent` [G] (fn on no tokens) gives the groups with no counted token theirs."""

    def __init__(self, fn, index: torch.Tensor, group_ids=None, group_sizes=None, absent=None):
        self.fn, self.index, self.group_ids, self.absent = fn, index, group_ids, absent
        self.starts = None if group_sizes is None else [0, *itertools.accumulate(group_sizes)]

    def __call__(self, stats: dict, r0: int, r1: int) -> torch.Tensor:
        out = self.fn(stats, self.index[r0:r1])
        grouped = self.group_ids is not None
        check_loss_shape(out, tuple(self.absent.shape) if grouped else (r1 - r0,), grouped)
        out = out.to(stats["logp"].dtype)
        if not grouped:
            return out.sum()
        # the band's groups, from the host-side plan (no device sync): bands start and end on group boundaries
        k0, k1 = bisect.bisect_left(self.starts, r0), bisect.bisect_left(self.starts, r1)
        return out[self.group_ids[k0:k1]].sum()

    def absent_groups(self, dtype) -> torch.Tensor:
        """Σ of the losses of the groups no band holds (constant: they have no counted token)."""
        if self.group_ids is None:
            return torch.zeros((), dtype=dtype, device=self.index.device)
        held = torch.zeros(self.absent.numel(), dtype=torch.bool, device=self.absent.device)
        held.index_fill_(0, self.group_ids.to(held.device), True)
        return torch.where(held, 0, self.absent.to(dtype)).sum()


def check_loss_shape(out, want: tuple, grouped: bool) -> None:
    if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(want):
        return
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    what = "one loss per group" if grouped else "one loss per token"
    raise ValueError(f"per_token_loss must return {what}, shape {tuple(want)}; got {got}")


def plan_bands(n: int, rows: int, group_sizes: list[int] | None = None) -> list[tuple[int, int]] | None:
    """Row ranges [r0, r1) of the bands: `rows` each; with groups (sizes of the consecutive groups the rows are
    sorted into), whole groups packed up to `rows` a band, a band stretched to one group of up to
    GROUP_STRETCH * rows. None: a group is larger (its tokens' gradients would need more logits alive at once)."""
    if group_sizes is None:
        return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]
    bands, r0, r1 = [], 0, 0
    for size in group_sizes:
        if size > GROUP_STRETCH * rows:
            return None
        if r1 > r0 and r1 + size - r0 > rows:
            bands.append((r0, r1))
            r0 = r1
        r1 += size
    if r1 > r0:
        bands.append((r0, r1))
    return bands


def widest(bands) -> int:
    """Rows of the widest band (a stretched one holds a whole group)."""
    return max((r1 - r0 for r0, r1 in bands), default=1)


def token_grads(band_loss: BandLoss, stats: dict, r0: int, r1: int):
    """(the band's loss, {stat: ∂loss/∂stat [R]}) by autograd on the band's statistics (fp32; fp64 for fp64
    inputs)."""
    with torch.enable_grad():
        leaves = {k: stats[k].detach().requires_grad_() for k in OUTPUT_NAMES if k in stats}
        total = band_loss(dict(leaves), r0, r1)
        if not total.requires_grad:  # a loss that reads no statistic: no gradient
            return total.detach(), {}
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return total.detach(), {k: g for k, g in zip(leaves, grads) if g is not None}


def _bands(bands, band_loss, n, dtype, band_stats, band_grad):
    """The band loop every epilogue shares: `band_stats(r0, r1)` -> (statistics, what the band's gradient needs);
    the loss's gradients in the statistics; `band_grad(r0, r1, stats, grads, state)` (None: no gradient wanted)."""
    stats_out, loss = {}, band_loss.absent_groups(dtype)
    for r0, r1 in bands:
        stats, state = band_stats(r0, r1)
        part, grads = token_grads(band_loss, stats, r0, r1)
        loss += part
        _collect(stats_out, stats, r0, n)
        if band_grad is not None:
            band_grad(r0, r1, stats, grads, state)
        del state  # the band's logits (on CUDA; the CPU's live in the heads' reused buffers): not beside the next
    return loss, stats_out


def _bands_native(student, teacher, target, band_loss, bands, *, inv_t, kl, ignore_index):
    V = student.vocab

    def band_stats(r0, r1):
        z = student.block(r0, r1, 0, V)  # [R, V] fp32 logits (a buffer reused by every band)
        zt = teacher.block(r0, r1, 0, V) if teacher is not None else None
        stats = native.block_stats(z, target[r0:r1], zt, inv_t=inv_t, kl=kl, ignore_index=ignore_index)
        return chunked.finish(stats), (z, zt)

    def band_grad(r0, r1, stats, grads, state):
        z, zt = state
        use_kl = grads.get("kl") is not None
        native.block_grad_(z, target[r0:r1], zt if use_kl else None, stats, grads, z, inv_t=inv_t,
                           kl=kl if use_kl else None, ignore_index=ignore_index)
        student.accumulate_block(r0, r1, 0, V, z)  # dh rows = dz W, dW += dz^T h, db += Σ dz

    wanted = student.need_dh or student.need_dw or student.need_db
    out = _bands(bands, band_loss, target.numel(), student.dtype, band_stats,
                 band_grad if wanted else None)
    student.finish_grads()
    return out


def _bands_torch(student, teacher, target, band_loss, bands, *, inv_t, kl):
    def band_stats(r0, r1):
        stats, rows = chunked.rows_stats(student, teacher, r0, r1, target[r0:r1], inv_t=inv_t, kl=kl)
        return chunked.finish(stats), rows

    def band_grad(r0, r1, stats, grads, rows):  # grads: token_grads', in the statistics' dtype
        dz = chunked.rows_grad_(rows, target[r0:r1], stats, grads, inv_t=inv_t, kl=kl)
        student.accumulate(r0, r1, dz)

    wanted = student.need_dh or student.need_dw or student.need_db
    out = _bands(bands, band_loss, target.numel(), student.dtype, band_stats, band_grad if wanted else None)
    student.finish_grads()
    return out


# On the Triton backend a band's logits come from a tensor-core GEMM and are read twice from memory by
# vlmfast/kernels/logits_epilogue.py instead of recomputed: worth it where a logit's 2H FLOP cost more than its ~12
# bytes of traffic (H >= ~1800 on an H100 by the peaks; not yet measured). Below, token_loss runs token_stats' kernels.
TRITON_MIN_HIDDEN = 2048


def triton_one_pass(hidden_size: int) -> bool:
    return hidden_size >= TRITON_MIN_HIDDEN


def _bands_triton(hidden, weight, bias, teacher, teacher_rows, target, band_loss, bands, *, needs, temperature, kl,
                  ignore_index):
    """One pass on the Triton backend: per band, logits by a GEMM with an fp32 result (tensor cores on CUDA), the
    statistics and dz by vlmfast/kernels/logits_epilogue.py, dh and dW by two more GEMMs (token_stats'
    accumulate_dz)."""
    from vlmfast.kernels import logits_epilogue as epilogue
    from vlmfast.kernels import token_stats as kernels

    N, H = hidden.shape
    V = weight.shape[0]
    need_dh, need_dw, need_db = needs
    dev = hidden.device
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    rows = widest(bands)
    dz_buf = torch.empty(rows, V, dtype=hidden.dtype, device=dev) if any(needs) else None
    student = chunked.LinearHead(hidden, weight, bias)  # logits only: its gradients are accumulate_dz's
    teacher_head = chunked.LinearHead(teacher.hidden, teacher.weight, teacher.bias) \
        if teacher is not None and teacher.logits is None else None
    kw = dict(kl=kl, temperature=temperature, ignore_index=ignore_index)

    def band_stats(r0, r1):
        z = student.logits(r0, r1)  # [R, V] fp32
        zt = teacher_head.logits(r0, r1) if teacher_head is not None else None
        if teacher is not None and teacher.logits is not None:
            zt = teacher.logits.index_select(0, teacher_rows[r0:r1])  # the band's rows (16-bit: the kernels widen)
        return chunked.finish(epilogue.logits_stats(z, target[r0:r1], zt, **kw)), [z, zt]

    def band_grad(r0, r1, stats, grads, state):
        dz = epilogue.logits_grad(state[0], target[r0:r1], state[1], stats, grads, dz_buf[:r1 - r0], **kw)
        state.clear()  # the fp32 logits (up to 1 GiB; twice, stretched) freed before the two GEMMs
        kernels.accumulate_dz(dz, hidden[r0:r1], weight, None if dh is None else dh[r0:r1], dw, db)

    loss, stats_out = _bands(bands, band_loss, N, torch.float32, band_stats,
                             band_grad if dz_buf is not None else None)
    return loss, stats_out, dh, dw, db


def _collect(out: dict, stats: dict, r0: int, n: int) -> None:
    for k, v in stats.items():
        if k not in out:
            out[k] = torch.zeros(n, dtype=v.dtype, device=v.device)
        out[k][r0:r0 + v.numel()] = v


def _finish_forward(ctx, loss, stats, hidden, weight, bias, dh, dw, db, n):
    """Save dh and dW, db in the inputs' dtypes (an fp32 accumulator freed here) and return the outputs."""
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    ctx.save_for_backward(dh, dw, db)
    empty = torch.zeros(n, dtype=loss.dtype, device=hidden.device)
    outs = [stats.get(k, empty) for k in OUTPUT_NAMES]
    ctx.mark_non_differentiable(*outs)
    return (loss.to(hidden.device), *outs)


class FusedLinearTokenLoss(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, target [N], every target counted) -> the loss Σ_t ℓ_t and
    the per-token statistics logp, entropy, kl, lse [N] (detached); dh, dW, db computed in the forward. A teacher's
    hidden rows are the same N; its logits, if given, are read at rows `teacher_rows` (the counted positions)."""

    @staticmethod
    @ieee_fp32
    def forward(ctx, hidden, weight, bias, target, teacher, teacher_rows, kl, temperature, ignore_index, band_loss,
                bands, needs, backend):
        N = target.numel()
        if backend == "triton":
            loss, stats, dh, dw, db = _bands_triton(
                hidden.contiguous(), weight.contiguous(), bias, teacher, teacher_rows, target.contiguous(), band_loss,
                bands, needs=needs, temperature=temperature, kl=kl if teacher is not None else None,
                ignore_index=ignore_index)
            return _finish_forward(ctx, loss, stats, hidden, weight, bias, dh, dw, db, N)
        need_dh, need_dw, need_db = needs
        teacher_head = chunked.teacher_head(teacher, teacher_rows)
        student = chunked.LinearHead(hidden, weight, bias, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
                                     rows_per_band=widest(bands), native_epilogue=chunked.native_beside(teacher_head))
        kw = dict(inv_t=1.0 / temperature, kl=kl if teacher is not None else None)
        if chunked._native_ok(student, teacher_head):
            loss, stats = _bands_native(student, teacher_head, target, band_loss, bands, ignore_index=ignore_index,
                                        **kw)
        else:
            loss, stats = _bands_torch(student, teacher_head, target, band_loss, bands, **kw)
        for head in (student, teacher_head):  # the band buffers, before dW's conversion: not both at the peak
            if head is not None:
                head.scratch.clear()
        return _finish_forward(ctx, loss, stats, hidden, weight, bias, student.dh, student.dw, student.db, N)

    @staticmethod
    @first_order_only
    def backward(ctx, g_loss, *_):
        if getattr(ctx, "done", False):
            raise RuntimeError("token_loss: backward ran twice through the same forward (retain_graph); the "
                               "gradients computed in its forward were handed out the first time")
        ctx.done = True
        dh, dw, db = ctx.saved_tensors

        def scaled(t):  # in place: a copy of dW would be another [V, H] at the memory peak
            return None if t is None else t.mul_(g_loss.to(t.dtype))

        return scaled(dh), scaled(dw), scaled(db), *[None] * 10
