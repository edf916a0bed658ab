"""Token statistics and dz over logits already in memory: the Triton epilogue of the one-pass path.

`vlmfast/ops/one_pass.py` computes a band of rows' logits once (a tensor-core GEMM with an fp32 result), and
here, reading them instead of recomputing them (the per-row formulas are token_stats.py's, shared):

    logits_stats:  one program per BLOCK_N rows, a loop over the vocabulary: the online update of
                   token_stats.py's forward (`_online_update`), merged by its `combine`
    logits_grad:   one program per (BLOCK_N rows) x (BLOCK_V columns): dz by `_dz_tile`, stored in dz's dtype

Each logit is read twice (4 bytes each in fp32) and dz written once: at the 7B head a logit costs 2H = 7168
FLOP to recompute, ~10 ps on an H100's tensor cores against ~3 ps for the extra traffic (not yet measured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import _backward_rows, _dz_tile, _empty_stats, _floored, _online_update, _store_partials
from .token_stats import (
    KL_FORWARD,
    KL_NONE,
    KL_REVERSE,
    NUM_STATS,
    TEACHER_LOGITS,
    TEACHER_NONE,
    Config,
    Launch,
    Target,
    _auto_splits,
    combine,
    device_target,
    whole_tile_splits,
)

# Fixed tiles (autotuning needs a GPU), checked for spills by `python -m vlmfast.kernels.inspect --epilogue`:
# streaming kernels, so a few fp32 values per thread per tile. The interpreter runs tiles as numpy arrays.
STATS_CONFIG = Config(8, 512, 0, 8, 1)
GRAD_CONFIG = Config(16, 256, 0, 4, 1)
INTERPRET_CONFIG = Config(16, 64, 0, 4, 1)


def stats_launch(z, target, zt, part, zy, *, temperature, where: Target) -> Launch:
    """The statistics kernel's launch over logits z [R, V] into part [NUM_STATS, splits, R] and zy [R]."""
    R, V = z.shape
    cfg = STATS_CONFIG if where.arch is not None else INTERPRET_CONFIG
    v_per_split = triton.cdiv(triton.cdiv(V, part.shape[1]), cfg.block_v) * cfg.block_v
    return Launch(
        _logits_stats_kernel, (triton.cdiv(R, cfg.block_n), part.shape[1]),
        (z, z if zt is None else zt, target, part, zy, R, V, 1.0 / temperature, v_per_split, z.stride(0),
         0 if zt is None else zt.stride(0)),
        dict(TEACHER=TEACHER_NONE if zt is None else TEACHER_LOGITS, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v),
        cfg)


def stats_splits(rows: int, vocab: int, where: Target) -> int:
    """Vocabulary slices per block of rows: enough programs to fill the GPU (token_stats' rule)."""
    cfg = STATS_CONFIG if where.arch is not None else INTERPRET_CONFIG
    splits = _auto_splits(triton.cdiv(rows, cfg.block_n), vocab, cfg.block_v, where)
    return whole_tile_splits(vocab, splits, cfg.block_v)


def grad_launch(z, target, zt, row: dict, g: dict, dz, *, kl_mode, temperature, ignore_index, where: Target) -> Launch:
    """The dz kernel's launch: dz [R, V] from logits z [R, V], the rows' statistics and upstream gradients."""
    R, V = z.shape
    cfg = GRAD_CONFIG if where.arch is not None else INTERPRET_CONFIG
    return Launch(
        _logits_grad_kernel, (triton.cdiv(R, cfg.block_n), triton.cdiv(V, cfg.block_v)),
        (z, z if zt is None else zt, target, row["lse"], row["entropy"], row["kl"], row["lse_t"], g["logp"],
         g["entropy"], g["kl"], g["lse"], dz, R, V, 1.0 / temperature, ignore_index, z.stride(0),
         0 if zt is None else zt.stride(0), dz.stride(0)),
        dict(KL=kl_mode, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v),
        cfg)


@triton.jit
def _scaled_tile(ptr, rows, cols, stride, mask, inv_t):
    """A [BLOCK_N, BLOCK_V] tile of logits in memory, in fp32, divided by the temperature."""
    z = tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    return _floored(z.to(tl.float32) * inv_t)


@triton.jit
def _logits_stats_kernel(z_ptr, zt_ptr, y_ptr, part_ptr, zy_ptr, N, V, inv_t, v_per_split, stride_z, stride_zt,
                         TEACHER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per (BLOCK_N rows) x (slice of the vocabulary), as token_stats' forward."""
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    m, s0, a, zy, mt, t0, b, at, bt = _empty_stats(BLOCK_N)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        mask = row_mask[:, None] & col_mask[None, :]
        z = _scaled_tile(z_ptr, rows, cols, stride_z, mask, inv_t)
        zt = z
        if TEACHER != 0:
            zt = _scaled_tile(zt_ptr, rows, cols, stride_zt, mask, inv_t)
        m, s0, a, zy, mt, t0, b, at, bt = _online_update(z, zt, cols, col_mask, y, m, s0, a, zy, mt, t0, b, at, bt,
                                                         TEACHER)
    _store_partials(part_ptr, zy_ptr, rows, row_mask, y, v_start, v_end, pid_s, N, m, s0, a, zy, mt, t0, b, at, bt,
                    TEACHER)


@triton.jit
def _logits_grad_kernel(z_ptr, zt_ptr, y_ptr, lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr,
                        g_lse_ptr, dz_ptr, N, V, inv_t, ignore_index, stride_z, stride_zt, stride_dz,
                        KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < V)[None, :]
    y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl = _backward_rows(
        y_ptr, lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr, g_lse_ptr, rows, row_mask,
        ignore_index, KL)
    z = _scaled_tile(z_ptr, rows, cols, stride_z, mask, inv_t)
    zt = z
    if KL != 0:
        zt = _scaled_tile(zt_ptr, rows, cols, stride_zt, mask, inv_t)
    dz = _dz_tile(z, zt, cols, y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl, inv_t, KL)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=mask)


def logits_stats(z: torch.Tensor, target: torch.Tensor, zt: torch.Tensor | None = None, *, kl=None,
                 temperature: float = 1.0, ignore_index: int = -100, splits: int | None = None) -> dict:
    """Per-row fp32 {lse, logp, entropy[, kl, lse_t]} of the rows of logits z [R, V] (rows contiguous), and of
    teacher logits zt [R, V]; 0 on ignored rows. `splits` forces the vocabulary slices (tests)."""
    R, V = z.shape
    where = device_target(z.device)
    splits = splits or stats_splits(R, V, where)
    part = torch.zeros(NUM_STATS, splits, R, dtype=torch.float32, device=z.device)
    zy = torch.zeros(R, dtype=torch.float32, device=z.device)
    if R:
        stats_launch(z, target, zt, part, zy, temperature=temperature, where=where)()
    out = combine(part, zy, kl=kl, with_teacher=zt is not None)
    valid = target != ignore_index
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def logits_grad(z: torch.Tensor, target: torch.Tensor, zt: torch.Tensor | None, stats: dict, grads: dict,
                dz: torch.Tensor, *, kl=None, temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """Write into dz [R, V] (any float dtype, rows contiguous) the gradient w.r.t. the logits z [R, V] of
    Σ_o g_o · o for per-row upstream gradients `grads` (logp, entropy, kl, lse: [R] fp32, missing ones zero) and
    the rows' `stats` (lse, entropy, kl, lse_t); the KL term only with zt and a "kl" gradient."""
    R = z.shape[0]
    zero = torch.zeros(R, dtype=torch.float32, device=z.device)

    def rows(d, names):
        return {k: zero if d.get(k) is None else d[k].float().contiguous() for k in names}

    mode = KL_NONE
    if zt is not None and grads.get("kl") is not None:
        mode = KL_REVERSE if kl == "reverse" else KL_FORWARD
    if R:
        grad_launch(z, target, zt, rows(stats, ("lse", "entropy", "kl", "lse_t")),
                    rows(grads, ("logp", "entropy", "kl", "lse")), dz, kl_mode=mode, temperature=temperature,
                    ignore_index=ignore_index, where=device_target(z.device))()
    return dz
