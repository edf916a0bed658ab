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

Losses whose token gradients depend on other tokens (DPO's and the gentle hinge's sequence sums) stay on
`token_stats`. Like it, this runs on the chunked backend: the native CPU epilogue when built, PyTorch otherwise.
"""

from __future__ import annotations

import torch

from . import chunked, native
from ._inputs import OUTPUT_NAMES

MIN_BAND_ROWS = 256


def band_rows(n_rows: int, vocab: int, hidden_size: int = 0, low_precision: bool = False) -> int:
    """Rows per band: as many as BLOCK_BYTES of fp32 logits hold, at least MIN_BAND_ROWS, at most n_rows.

    16-bit inputs take all rows in one band when its buffers (fp32 logits and 16-bit dz: 6 bytes a logit) cost
    no more than the fp32 [V, H] dW accumulator that several bands need (one band rounds dW straight into W's
    dtype): up to 2H/3 rows, 597 on Qwen2-0.5B's head."""
    rows = max(MIN_BAND_ROWS, chunked.BLOCK_BYTES // (4 * vocab))
    if low_precision and n_rows * 6 <= max(rows * 6, 4 * hidden_size):
        rows = n_rows
    return max(1, min(n_rows, rows))


def token_grads(per_token_loss, stats: dict, index: torch.Tensor):
    """(Σ ℓ over the band's tokens, {stat: ∂ℓ/∂stat [R]}) by autograd on the band's statistics (fp32; fp64
    for fp64 inputs)."""
    with torch.enable_grad():
        leaves = {k: stats[k].detach().requires_grad_() for k in OUTPUT_NAMES if k in stats}
        loss = per_token_loss(dict(leaves), index)
        if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != tuple(index.shape):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"per_token_loss must return one loss per token, shape {tuple(index.shape)}; got {got}")
        total = loss.to(leaves["logp"].dtype).sum()
        if not total.requires_grad:  # a loss that reads no statistic: no gradient
            return total.detach(), {}
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return total.detach(), {k: g for k, g in zip(leaves, grads) if g is not None}


def _bands_native(student, teacher, target, per_token_loss, index, *, rows, inv_t, kl, ignore_index):
    N, V = target.numel(), student.vocab
    stats_out, loss = {}, torch.zeros((), dtype=student.dtype)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = student.block(r0, r1, 0, V)  # [R, V] fp32 logits (a buffer reused by every band)
        zt = teacher.block(r0, r1, 0, V) if teacher is not None else None
        stats = chunked.finish(native.block_stats(z, target[r0:r1], zt, inv_t=inv_t, kl=kl, ignore_index=ignore_index))
        part, grads = token_grads(per_token_loss, stats, index[r0:r1])
        loss += part
        _collect(stats_out, stats, r0, N)
        if student.need_dh or student.need_dw or student.need_db:
            use_kl = grads.get("kl") is not None
            native.block_grad_(z, target[r0:r1], zt if use_kl else None, stats, grads, z, inv_t=inv_t,
                               kl=kl if use_kl else None, ignore_index=ignore_index)
            student.accumulate_block(r0, r1, 0, V, z)  # dh rows = dz W, dW += dz^T h, db += Σ dz
    student.finish_grads()
    return loss, stats_out


def _bands_torch(student, teacher, target, per_token_loss, index, *, rows, inv_t, kl):
    N = target.numel()
    stats_out, loss = {}, torch.zeros((), dtype=student.dtype, device=target.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        stats, logp_all, logq_all = chunked.rows_stats(student, teacher, r0, r1, target[r0:r1], inv_t=inv_t, kl=kl)
        stats = chunked.finish(stats)
        part, grads = token_grads(per_token_loss, stats, index[r0:r1])
        loss += part
        _collect(stats_out, stats, r0, N)
        if student.need_dh or student.need_dw or student.need_db:
            zero = torch.zeros_like(stats["lse"])
            g = {k: grads[k].to(zero.dtype) if k in grads else zero for k in OUTPUT_NAMES}
            dz = chunked.rows_grad_(logp_all, logq_all if "kl" in grads else None, target[r0:r1], stats, g,
                                    inv_t=inv_t, kl=kl)
            student.accumulate(r0, r1, dz)
    return loss, stats_out


def _collect(out: dict, stats: dict, r0: int, n: int) -> None:
    for k, v in stats.items():
        if k not in out:
            out[k] = torch.zeros(n, dtype=v.dtype, device=v.device)
        out[k][r0:r0 + v.numel()] = v


class FusedLinearTokenLoss(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, target [N], every target counted) -> the loss Σ_t ℓ_t and
    the per-token statistics logp, entropy, kl, lse [N] (detached); dh, dW, db computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, teacher, kl, temperature, ignore_index, per_token_loss, index,
                needs):
        need_dh, need_dw, need_db = needs
        N = target.numel()
        low = hidden.dtype in (torch.bfloat16, torch.float16)
        rows = band_rows(N, weight.shape[0], weight.shape[1], low)
        student = chunked.LinearHead(hidden, weight, bias, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
                                     rows_per_band=rows)
        teacher_head = chunked.teacher_head(teacher)
        kw = dict(rows=rows, inv_t=1.0 / temperature, kl=kl if teacher is not None else None)
        if chunked._native_ok(student, teacher_head):
            loss, stats = _bands_native(student, teacher_head, target, per_token_loss, index,
                                        ignore_index=ignore_index, **kw)
        else:
            loss, stats = _bands_torch(student, teacher_head, target, per_token_loss, index, **kw)
        student.scratch.clear()  # the band buffers, before dW's conversion: not both at the peak
        dw = None if student.dw is None else student.dw.to(weight.dtype)  # the fp32 accumulator freed here
        db = None if student.db is None else student.db.to(bias.dtype)
        ctx.save_for_backward(student.dh, dw, db)
        empty = torch.zeros(N, dtype=student.dtype, device=hidden.device)
        outs = [stats.get(k, empty) for k in OUTPUT_NAMES]
        ctx.mark_non_differentiable(*outs)
        return (loss.to(hidden.device), *outs)

    @staticmethod
    def backward(ctx, g_loss, *_):
        if getattr(ctx, "done", False):
            raise RuntimeError("token_loss: backward ran twice through the same forward (retain_graph); the "
                               "gradients computed in its forward were handed out the first time")
        ctx.done = True
        dh, dw, db = ctx.saved_tensors

        def scaled(t):  # in place: a copy of dW would be another [V, H] at the memory peak
            return None if t is None else t.mul_(g_loss.to(t.dtype))

        return scaled(dh), scaled(dw), scaled(db), None, None, None, None, None, None, None, None
