"""The per-row formulas every fused kernel shares (token_stats.py's portable kernels, token_stats_sm90.py's TMA
ones, logits_epilogue.py's one-pass epilogue), below all of them: a logits tile (the student's and a teacher's,
scaled and floored), the online softmax statistics of one row across vocabulary tiles, and dz of a tile from the
saved per-row statistics. The math: the docstring of token_stats.py and docs/fused_ops.md.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..ops.floor import LOGIT_FLOOR as FLOOR

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# masked (-inf) logits are raised to it after scaling: they add nothing and never make 0 x -inf (ops/floor.py)
LOGIT_FLOOR = tl.constexpr(FLOOR)


@triton.jit
def _dot_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, K, stride_x, stride_w,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """x[rows] @ w[cols]^T over K, fp32 accumulator: the logits tile [BLOCK_N, BLOCK_V]."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [K, V]
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _floored(z):
    """Masked (-inf) logits raised to LOGIT_FLOOR; NaN stays NaN (tl.maximum would drop it)."""
    return tl.where(z < LOGIT_FLOOR, LOGIT_FLOOR, z)


@triton.jit
def _student_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_t,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    z = _dot_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                  BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return _floored(z * inv_t)


@triton.jit
def _teacher_tile(ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr, rows, cols, row_mask, col_mask, HT, stride_ht,
                  stride_wt, stride_zt, inv_t, TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  IEEE: tl.constexpr):
    if TEACHER == 1:
        zt = _dot_tile(ht_ptr, wt_ptr, rows, cols, row_mask, col_mask, HT, stride_ht, stride_wt,
                       BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
        if HAS_TEACHER_BIAS:
            zt += tl.load(bt_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        src = rows
        if TEACHER == 3:  # TEACHER_LOGITS_AT_ROWS
            src = tl.load(zt_rows_ptr + rows, mask=row_mask, other=0)
        ptrs = zt_ptr + src.to(tl.int64)[:, None] * stride_zt + cols[None, :]
        zt = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    return _floored(zt * inv_t)


@triton.jit
def _empty_stats(BLOCK_N: tl.constexpr):
    """The running statistics before the first vocabulary tile: m, S0, A, z_y, mt, T0, B, At, Bt.
    -1e30, not -inf, for the maxima: (m_old - m_new) * S0 must be 0, not nan, on the first tile."""
    zero = tl.zeros([BLOCK_N], tl.float32)
    low = tl.full([BLOCK_N], -1e30, tl.float32)
    return low, zero, zero, zero, low, zero, zero, zero, zero


@triton.jit
def _online_update(z, zt, cols, col_mask, y, m, s0, a, zy, mt, t0, b, at, bt, TEACHER: tl.constexpr,
                   TARGET_IN_TILE: tl.constexpr = True):
    """Fold one vocabulary tile of student logits z (and teacher logits zt) [BLOCK_N, BLOCK_V] into the
    running per-row statistics (see the module docstring); every forward kernel uses this one formula.
    TARGET_IN_TILE=False: the caller computes the target logit z_y itself (one tile temporary fewer)."""
    z = tl.where(col_mask[None, :], z, float("-inf"))
    if TARGET_IN_TILE:
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)  # z - m, 0 off the vocabulary
    e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
    if TEACHER != 0:
        zt = tl.where(col_mask[None, :], zt, float("-inf"))
        mt_new = tl.maximum(mt, tl.max(zt, axis=1))
        beta = tl.exp(mt - mt_new)
        dt = tl.where(col_mask[None, :], zt - mt_new[:, None], 0.0)
        et = tl.where(col_mask[None, :], tl.exp(dt), 0.0)
        # rescale to the new maxima with the OLD S0 / T0, then add this tile
        b = alpha * (b + (mt - mt_new) * s0) + tl.sum(e * dt, axis=1)
        at = beta * (at + (mt - mt_new) * t0) + tl.sum(et * dt, axis=1)
        bt = beta * (bt + (m - m_new) * t0) + tl.sum(et * d, axis=1)
        t0 = beta * t0 + tl.sum(et, axis=1)
        mt = mt_new
    a = alpha * (a + (m - m_new) * s0) + tl.sum(e * d, axis=1)
    s0 = alpha * s0 + tl.sum(e, axis=1)
    return m_new, s0, a, zy, mt, t0, b, at, bt


@triton.jit
def _store_partials(part_ptr, zy_ptr, rows, row_mask, y, v_start, v_end, pid_s, N, m, s0, a, zy, mt, t0, b, at, bt,
                    TEACHER: tl.constexpr):
    """One vocabulary slice's partial statistics of its rows, merged later by `combine`."""
    out = part_ptr + pid_s * N + rows
    stride_stat = tl.num_programs(1) * N
    tl.store(out + 0 * stride_stat, m, mask=row_mask)
    tl.store(out + 1 * stride_stat, s0, mask=row_mask)
    tl.store(out + 2 * stride_stat, a, mask=row_mask)
    if TEACHER != 0:
        tl.store(out + 3 * stride_stat, mt, mask=row_mask)
        tl.store(out + 4 * stride_stat, t0, mask=row_mask)
        tl.store(out + 5 * stride_stat, b, mask=row_mask)
        tl.store(out + 6 * stride_stat, at, mask=row_mask)
        tl.store(out + 7 * stride_stat, bt, mask=row_mask)
    # exactly one vocabulary slice holds each row's target
    tl.store(zy_ptr + rows, zy, mask=row_mask & (y >= v_start) & (y < v_end))


@triton.jit
def _backward_rows(y_ptr, lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr, g_lse_ptr, rows,
                   row_mask, ignore_index, KL: tl.constexpr):
    """The per-row inputs of the backward: target, validity, saved statistics, upstream gradients."""
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
    g_lse = tl.load(g_lse_ptr + rows, mask=row_mask, other=0.0)
    kl = tl.zeros_like(lse)
    lse_t = tl.zeros_like(lse)
    g_kl = tl.zeros_like(lse)
    if KL != 0:
        kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
        g_kl = tl.load(g_kl_ptr + rows, mask=row_mask, other=0.0)
    return y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl


@triton.jit
def _dz_tile(z, zt, cols, y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl, inv_t, KL: tl.constexpr):
    """dz [BLOCK_N, BLOCK_V] of one recomputed logits tile (see vlmfast/ops/chunked.py for the formula);
    every backward kernel uses this one formula."""
    logp = z - lse[:, None]
    p = tl.exp(logp)
    c = -g_ent[:, None] * (logp + ent[:, None]) + (g_lse - g_logp)[:, None]
    if KL != 0:
        logq = zt - lse_t[:, None]
        if KL == 1:  # reverse: p (log p - log q - KL)
            dz = p * (c + g_kl[:, None] * (logp - logq - kl[:, None]))
        else:  # forward: p - q
            dz = p * (c + g_kl[:, None]) - g_kl[:, None] * tl.exp(logq)
    else:
        dz = p * c
    # onehot term in fp32, after the p-terms: no bf16 cancellation as p_y -> 1
    dz += tl.where(cols[None, :] == y[:, None], g_logp[:, None], 0.0)
    # ignored rows carry lse = 0: their p may overflow, so zero them explicitly
    return tl.where(valid[:, None], dz * inv_t, 0.0)
