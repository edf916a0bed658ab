"""The fused token-statistics kernels for Hopper (sm_90): the same math as `token_stats.py`, fed by TMA.

What differs from the portable kernels is only how a logits tile is produced: h, W (and a fused teacher's
h_t, W_t) are read through tensor descriptors (`tl.make_tensor_descriptor`: TMA copies into shared memory,
no per-thread address tensors, tiles past the tensor's edge padded with zeros), and the tiles are wider
(wgmma n >= 128, see `GPU_CONFIGS[(90, "tma")]`). The per-row formulas are the portable kernels' own helpers
(`_online_update`, `_store_partials`, `_backward_rows`, `_dz_tile`): one formula for every variant.

Descriptors need 16-byte aligned base pointers and row strides (H a multiple of 8 in 16 bits, of 4 in
fp32); the launchers use these kernels on sm_90 only then, the portable ones otherwise. A teacher given as
logits is read with plain loads (its row stride V is rarely aligned). Device-side descriptors need a
scratch allocator (`ensure_allocator`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (
    _backward_rows,
    _dz_tile,
    _empty_stats,
    _floored,
    _online_update,
    _store_partials,
    _teacher_tile,
)


def ensure_allocator() -> None:
    """Device-side tensor descriptors take scratch memory from Triton's allocator: supply one (torch memory
    on the current CUDA device, or the CPU under the interpreter) unless the caller already has."""
    from triton.runtime import _allocation

    from .rows import INTERPRET

    device = "cpu" if INTERPRET else "cuda"
    current = _allocation._allocator
    current = current.get() if hasattr(current, "get") else current  # a ContextVar in Triton >= 3.4
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


def tma_aligned(*tensors) -> bool:
    """Every tensor's base address and row stride are 16-byte aligned (what a TMA descriptor needs)."""
    return all(t is None or (t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(0) * t.element_size() % 16 == 0))
               for t in tensors)


@triton.jit
def _tma_tile(x_desc, w_desc, row0, col0, K, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
              IEEE: tl.constexpr):
    """x[row0:+BLOCK_N] @ w[col0:+BLOCK_V]^T over K through TMA, fp32 accumulator."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([row0, k0])
        w = w_desc.load([col0, k0])
        if IEEE:
            acc = tl.dot(x, w.T, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.T, acc)
    return acc


@triton.jit
def _halves(x):
    """[R, C] -> its column halves [R, C/2] (left, right), in registers."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [R, 2, C // 2]), [0, 2, 1]))


@triton.jit
def _quarters(x):
    """[R, C] -> its four column quarters [R, C/4], left to right, in registers."""
    x0, x1 = _halves(x)
    x00, x01 = _halves(x0)
    x10, x11 = _halves(x1)
    return x00, x01, x10, x11


@triton.jit
def _target_logit(h_ptr, w_ptr, b_ptr, rows, row_mask, y, V, H, stride_h, stride_w, inv_t, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """z_y = (h · W[y] + b[y]) / T per row, fp32 (0 for an ignored row, or one whose target another slice holds:
    `row_mask` says which rows this slice computes): computed once, so the wide tiles' epilogue does not carry a
    [BLOCK_N, BLOCK_V] selection of the target column. A block none of whose targets is here skips the dot."""
    has = row_mask & (y >= 0) & (y < V)
    acc = tl.zeros([BLOCK_N], tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + tl.where(has, y, 0).to(tl.int64)[:, None] * stride_w
    depth = tl.where(tl.max(has.to(tl.int32), 0) > 0, H, 0)
    for k0 in range(0, depth, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        mask = has[:, None] & (ks < H)[None, :]
        hk = tl.load(h_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        wk = tl.load(w_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(hk * wk, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + y, mask=has, other=0.0).to(tl.float32)
    return tl.where(has, _floored(acc * inv_t), 0.0)


@triton.jit
def _logits_tiles(h_desc, w_desc, b_ptr, ht_desc, wt_desc, bt_ptr, zt_ptr, zt_rows_ptr, row0, v0, rows, cols,
                  row_mask, col_mask, H, HT, stride_zt, inv_t, HAS_BIAS: tl.constexpr, TEACHER: tl.constexpr,
                  HAS_TEACHER_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    """The student's (and teacher's) scaled logits tiles at rows row0.., vocabulary columns v0.."""
    z = _tma_tile(h_desc, w_desc, row0, v0, H, BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = _floored(z * inv_t)
    zt = z
    if TEACHER == 1:
        zt = _tma_tile(ht_desc, wt_desc, row0, v0, HT, BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
        if HAS_TEACHER_BIAS:
            zt += tl.load(bt_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        zt = _floored(zt * inv_t)
    elif TEACHER >= 2:  # plain loads: a logits tile arriving by TMA needs a layout conversion that spills
        zt = _teacher_tile(zt_ptr, zt_ptr, zt_ptr, zt_ptr, zt_rows_ptr, rows, cols, row_mask, col_mask, HT, 0, 0,
                           stride_zt, inv_t, TEACHER, False, BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
    return z, zt


@triton.jit
def _descriptors(h_ptr, w_ptr, ht_ptr, wt_ptr, N, V, H, HT, stride_h, stride_w, stride_ht, stride_wt,
                 TEACHER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Tensor descriptors of h, W and, when fused, the teacher's h_t, W_t."""
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[stride_h, 1], block_shape=[BLOCK_N, BLOCK_H])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[stride_w, 1], block_shape=[BLOCK_V, BLOCK_H])
    ht_desc = h_desc
    wt_desc = w_desc
    if TEACHER == 1:
        ht_desc = tl.make_tensor_descriptor(ht_ptr, shape=[N, HT], strides=[stride_ht, 1],
                                            block_shape=[BLOCK_N, BLOCK_H])
        wt_desc = tl.make_tensor_descriptor(wt_ptr, shape=[V, HT], strides=[stride_wt, 1],
                                            block_shape=[BLOCK_V, BLOCK_H])
    return h_desc, w_desc, ht_desc, wt_desc


@triton.jit
def _token_stats_fwd_sm90_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr, part_ptr, zy_ptr,
    N, V, H, HT, inv_t, v_per_split,
    stride_h, stride_w, stride_ht, stride_wt, stride_zt,
    HAS_BIAS: tl.constexpr, TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    """Same arguments and outputs as `_token_stats_fwd_kernel`."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    h_desc, w_desc, ht_desc, wt_desc = _descriptors(h_ptr, w_ptr, ht_ptr, wt_ptr, N, V, H, HT, stride_h, stride_w,
                                                    stride_ht, stride_wt, TEACHER, BLOCK_N, BLOCK_V, BLOCK_H)
    m, s0, a, zy, mt, t0, b, at, bt = _empty_stats(BLOCK_N)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end  # a tile may run into the next slice: its columns are masked out here
        z, zt = _logits_tiles(h_desc, w_desc, b_ptr, ht_desc, wt_desc, bt_ptr, zt_ptr, zt_rows_ptr, row0, v0, rows,
                              cols, row_mask, col_mask, H, HT, stride_zt, inv_t, HAS_BIAS, TEACHER, HAS_TEACHER_BIAS,
                              BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
        if BLOCK_V >= 128:
            # the epilogue in four column slices (a wide tile's temporaries at a quarter of its registers),
            # the target logit computed once after the loop
            zs = _quarters(z)
            zts = zs
            if TEACHER != 0:
                zts = _quarters(zt)
            for q in tl.static_range(4):
                c = v0 + q * (BLOCK_V // 4) + tl.arange(0, BLOCK_V // 4)
                m, s0, a, zy, mt, t0, b, at, bt = _online_update(zs[q], zts[q], c, c < v_end, y, m, s0, a, zy, mt,
                                                                 t0, b, at, bt, TEACHER, False)
        else:
            m, s0, a, zy, mt, t0, b, at, bt = _online_update(z, zt, cols, col_mask, y, m, s0, a, zy, mt, t0, b, at,
                                                             bt, TEACHER)
    if BLOCK_V >= 128:
        # only the slice that holds a row's target computes it (the others would redo the H-long dot product)
        here = row_mask & (y >= v_start) & (y < v_end)
        zy = _target_logit(h_ptr, w_ptr, b_ptr, rows, here, y, V, H, stride_h, stride_w, inv_t, HAS_BIAS, BLOCK_N,
                           BLOCK_H)
    _store_partials(part_ptr, zy_ptr, rows, row_mask, y, v_start, v_end, pid_s, N, m, s0, a, zy, mt, t0, b, at, bt,
                    TEACHER)


@triton.jit
def _token_stats_bwd_sm90_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr,
    lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr, g_lse_ptr, dz_ptr,
    row0, n_rows, V, H, HT, inv_t, ignore_index,
    stride_h, stride_w, stride_ht, stride_wt, stride_zt, stride_dz,
    HAS_BIAS: tl.constexpr, TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, KL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    """Same arguments and outputs as `_token_stats_bwd_kernel`."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    local0 = pid_n * BLOCK_N
    local = local0 + tl.arange(0, BLOCK_N)
    row_mask = local < n_rows
    rows = row0 + local
    v0 = pid_v * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    # the descriptors cover this chunk's rows only: rows past it read as zeros, never another chunk's
    N = row0 + n_rows
    h_desc, w_desc, ht_desc, wt_desc = _descriptors(h_ptr, w_ptr, ht_ptr, wt_ptr, N, V, H, HT, stride_h, stride_w,
                                                    stride_ht, stride_wt, TEACHER, BLOCK_N, BLOCK_V, BLOCK_H)
    y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl = _backward_rows(
        y_ptr, lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr, g_lse_ptr, rows, row_mask,
        ignore_index, KL)
    z, zt = _logits_tiles(h_desc, w_desc, b_ptr, ht_desc, wt_desc, bt_ptr, zt_ptr, zt_rows_ptr, row0 + local0, v0,
                          rows, cols, row_mask, col_mask, H, HT, stride_zt, inv_t, HAS_BIAS, TEACHER if KL != 0 else 0,
                          HAS_TEACHER_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
    dz = _dz_tile(z, zt, cols, y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl, inv_t, KL)
    ptrs = dz_ptr + local.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
