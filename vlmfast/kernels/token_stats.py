"""Fused lm_head + token statistics: Triton kernels and their launchers.

Forward, one program per (block of BLOCK_N token rows) x (slice of the vocabulary):

    for each vocabulary tile:  z = (h W^T + b) / T       tl.dot over H, fp32 accumulator
                               online update of m, S0 = Σ e^(z-m), A = Σ e^(z-m)(z-m)
                               and, with a teacher (hidden+weight fused, or logits):
                               mt, T0 = Σ e^(zt-mt), B = Σ e^(z-m)(zt-mt),
                               At = Σ e^(zt-mt)(zt-mt), Bt = Σ e^(zt-mt)(z-m)
                               the target logit z_y where it falls in the tile

The partial statistics of the vocabulary slices are merged in O(N · slices) by `combine`:

    lse = m + log S0          entropy = log S0 - A/S0       logp = z_y - lse
    rKL = (A - B)/S0 - log S0 + log T0                      fKL = (At - Bt)/T0 - log T0 + log S0

Shifting by the running maxima keeps entropy and KL free of the cancellation of lse - Σ p z at
large logits, and gives KL = 0 exactly when teacher == student.

Backward, one program per (token tile) x (vocabulary tile) of a chunk of tokens: recompute z (and
zt) from h, W and the saved lse, and write dz (the gradient w.r.t. the logits, per-token upstream
gradients applied, see vlmfast/ops/chunked.py for the formula) for that chunk; then two tensor-core
GEMMs give dh = dz W and dW += dz^T h (fp32 accumulator). The chunk is as large as the memory budget
allows (1 GiB of dz by default), so both GEMMs are fat: no skinny-GEMM chunking.

No autograd and no dispatch here: see vlmfast/ops/.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .rows import (
    INTERPRET,
    _backward_rows,
    _dz_tile,
    _empty_stats,
    _online_update,
    _store_partials,
    _student_tile,
    _teacher_tile,
)

# Indices of the partial statistics in the [NUM_STATS, splits, N] buffer.
M, S0, A, MT, T0, B, AT, BT = range(8)
NUM_STATS = 8


@dataclass(frozen=True)
class Config:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# One fixed config per (pass, dtype class, teacher mode): autotuning needs a GPU, and fixed configs
# are what the ahead-of-time compile test checks for spills and shared memory.
# (arch, kernel variant) -> (pass, input dtype class, teacher mode) -> tiles. "tma": the Hopper kernels of
# token_stats_sm90.py (aligned inputs on sm_90); "portable": this file's kernels (sm_80, and sm_90 when a
# tensor is not 16-byte aligned). Chosen so that ptxas reports no register spills as the JIT specialises
# them (see `python -m vlmfast.kernels.inspect`); 16-bit inputs run on tensor cores (wgmma on sm_90a, mma
# on sm_80). fp32 inputs use IEEE fp32 dot products (no TF32): correct, not the fast path, so their tiles
# are smaller than the 64-row minimum of the 16-bit paths.
GPU_CONFIGS = {
    (90, "tma"): {  # see docs/fused_ops.md, "Hopper tiles", for what wider tiles cost
        ("fwd", "16bit", 0): Config(128, 256, 32, 8, 4),
        ("fwd", "16bit", 1): Config(128, 128, 64, 8, 3),
        ("fwd", "16bit", 2): Config(64, 128, 64, 8, 3),
        ("bwd", "16bit", 0): Config(128, 256, 64, 8, 3),
        ("bwd", "16bit", 1): Config(128, 128, 64, 8, 3),
        ("bwd", "16bit", 2): Config(128, 128, 64, 8, 3),
        ("fwd", "fp32", 0): Config(32, 32, 32, 4, 3),
        ("fwd", "fp32", 1): Config(32, 64, 32, 8, 3),
        ("fwd", "fp32", 2): Config(32, 64, 32, 8, 3),
        ("bwd", "fp32", 0): Config(64, 32, 32, 4, 3),
        ("bwd", "fp32", 1): Config(32, 32, 32, 4, 3),
        ("bwd", "fp32", 2): Config(32, 32, 32, 4, 3),
    },
    (90, "portable"): {
        ("fwd", "16bit", 0): Config(128, 64, 64, 8, 3),
        ("fwd", "16bit", 1): Config(64, 64, 64, 8, 3),
        ("fwd", "16bit", 2): Config(64, 32, 32, 8, 3),
        ("bwd", "16bit", 0): Config(128, 64, 64, 8, 3),
        ("bwd", "16bit", 1): Config(64, 64, 64, 8, 3),
        ("bwd", "16bit", 2): Config(64, 64, 64, 8, 3),
        ("fwd", "fp32", 0): Config(32, 32, 32, 4, 3),
        ("fwd", "fp32", 1): Config(32, 64, 32, 4, 3),  # 8 warps spill 24 B as the JIT specialises it
        ("fwd", "fp32", 2): Config(32, 64, 32, 8, 3),
        ("bwd", "fp32", 0): Config(64, 32, 32, 4, 3),
        ("bwd", "fp32", 1): Config(32, 32, 32, 4, 3),
        ("bwd", "fp32", 2): Config(32, 32, 32, 4, 3),
    },
    (80, "portable"): {
        ("fwd", "16bit", 0): Config(128, 64, 32, 8, 3),
        ("fwd", "16bit", 1): Config(64, 64, 32, 8, 3),
        ("fwd", "16bit", 2): Config(64, 32, 32, 8, 3),
        ("bwd", "16bit", 0): Config(64, 64, 64, 8, 3),
        ("bwd", "16bit", 1): Config(64, 64, 64, 8, 3),
        ("bwd", "16bit", 2): Config(64, 64, 64, 8, 3),
        ("fwd", "fp32", 0): Config(32, 32, 32, 8, 3),
        ("fwd", "fp32", 1): Config(32, 64, 32, 8, 3),
        ("fwd", "fp32", 2): Config(32, 64, 32, 8, 3),
        ("bwd", "fp32", 0): Config(64, 32, 32, 4, 3),
        ("bwd", "fp32", 1): Config(32, 64, 32, 8, 3),
        ("bwd", "fp32", 2): Config(32, 32, 32, 4, 3),
    },
}
# The interpreter runs blocks as numpy arrays: bigger tiles, fewer Python iterations.
INTERPRET_CONFIG = Config(64, 128, 32, 4, 1)

TEACHER_NONE, TEACHER_HIDDEN, TEACHER_LOGITS = 0, 1, 2
# teacher logits read at a row map (zt_rows_ptr): the student's rows compacted to the counted tokens, the teacher's
# [N, V] logits left where they are (a compacted copy would be [n, V]: 2.4 GB at 8k tokens of a 7B head)
TEACHER_LOGITS_AT_ROWS = 3
KL_NONE, KL_REVERSE, KL_FORWARD = 0, 1, 2


@dataclass(frozen=True)
class Target:
    """What a launch is planned for: the config table's architecture (None: the interpreter's config), the
    SM count that sizes the vocabulary split, and whether the TMA kernels may run (sm_90; under the
    interpreter when VLMFAST_TRITON_TMA=1, so tests run them), and the bytes free on it when the plan is made
    (None: not known; the scratch buffers then take their cap). `vlmfast/kernels/inspect.py` plans for a GPU it
    does not have."""
    arch: int | None
    sms: int
    tma: bool = False
    free_bytes: int | None = None


def device_target(device: torch.device) -> Target:
    """sm_90 tiles on Hopper and newer, sm_80 tiles before; the interpreter (or a CPU tensor) otherwise."""
    if INTERPRET or device.type != "cuda":
        return Target(None, 1, tma=os.environ.get("VLMFAST_TRITON_TMA") == "1")
    major = torch.cuda.get_device_capability(device)[0]
    arch = 90 if major >= 9 else 80
    # free to this process: what the driver has left plus what torch's caching allocator holds unused
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # the TMA tiles are sized for Hopper's shared memory; newer GPUs run the portable kernels until measured
    return Target(arch, torch.cuda.get_device_properties(device).multi_processor_count, tma=major == 9,
                  free_bytes=free)


def kernel_variant(where: Target, *tensors) -> str:
    """"tma" when the target runs the Hopper kernels and every tensor a descriptor reads is 16-byte
    aligned, else "portable"."""
    from .token_stats_sm90 import tma_aligned

    return "tma" if where.tma and tma_aligned(*tensors) else "portable"


def pick_config(pass_: str, dtype: torch.dtype, teacher_mode: int, where: Target, variant: str) -> Config:
    if where.arch is None:
        return INTERPRET_CONFIG
    kind = "fp32" if dtype == torch.float32 else "16bit"
    table_mode = TEACHER_LOGITS if teacher_mode == TEACHER_LOGITS_AT_ROWS else teacher_mode  # the same tiles
    return GPU_CONFIGS[(where.arch, variant)][(pass_, kind, table_mode)]


def _kernel(pass_: str, variant: str):
    if variant == "tma":
        from . import token_stats_sm90 as sm90

        sm90.ensure_allocator()
        return sm90._token_stats_fwd_sm90_kernel if pass_ == "fwd" else sm90._token_stats_bwd_sm90_kernel
    return _token_stats_fwd_kernel if pass_ == "fwd" else _token_stats_bwd_kernel


@dataclass
class Launch:
    """One kernel launch, planned: `kernel[grid](*args, **constexprs, num_warps=, num_stages=)`."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    config: Config

    @property
    def device(self) -> torch.device:
        """Where the launch's tensors live (its first tensor argument's device)."""
        return next(a.device for a in self.args if isinstance(a, torch.Tensor))

    def __call__(self):
        # on the tensors' GPU, whatever the current device is (Triton launches, and the TMA scratch allocator
        # allocates, on the current one)
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.config.num_warps,
                                   num_stages=self.config.num_stages)


@triton.jit
def _token_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr, part_ptr, zy_ptr,
    N, V, H, HT, inv_t, v_per_split,
    stride_h, stride_w, stride_ht, stride_wt, stride_zt,
    HAS_BIAS: tl.constexpr, TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    m, s0, a, zy, mt, t0, b, at, bt = _empty_stats(BLOCK_N)

    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _student_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                          inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
        zt = z
        if TEACHER != 0:
            zt = _teacher_tile(ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr, rows, cols, row_mask, col_mask, HT,
                               stride_ht, stride_wt, stride_zt, inv_t, TEACHER, HAS_TEACHER_BIAS,
                               BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
        m, s0, a, zy, mt, t0, b, at, bt = _online_update(z, zt, cols, col_mask, y, m, s0, a, zy, mt, t0, b, at, bt,
                                                         TEACHER)
    _store_partials(part_ptr, zy_ptr, rows, row_mask, y, v_start, v_end, pid_s, N, m, s0, a, zy, mt, t0, b, at, bt,
                    TEACHER)


@triton.jit
def _token_stats_bwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr,
    lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr, g_lse_ptr, dz_ptr,
    row0, n_rows, V, H, HT, inv_t, ignore_index,
    stride_h, stride_w, stride_ht, stride_wt, stride_zt, stride_dz,
    HAS_BIAS: tl.constexpr, TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, KL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local < n_rows
    rows = row0 + local
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl = _backward_rows(
        y_ptr, lse_ptr, ent_ptr, kl_ptr, lse_t_ptr, g_logp_ptr, g_ent_ptr, g_kl_ptr, g_lse_ptr, rows, row_mask,
        ignore_index, KL)
    # off-vocabulary columns get z = 0 (finite) and are never stored
    z = _student_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                      inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
    zt = z
    if KL != 0:
        zt = _teacher_tile(ht_ptr, wt_ptr, bt_ptr, zt_ptr, zt_rows_ptr, rows, cols, row_mask, col_mask, HT,
                           stride_ht, stride_wt, stride_zt, inv_t, TEACHER, HAS_TEACHER_BIAS,
                           BLOCK_N, BLOCK_V, BLOCK_H, IEEE)
    dz = _dz_tile(z, zt, cols, y, valid, lse, ent, g_logp, g_ent, g_lse, kl, lse_t, g_kl, inv_t, KL)
    ptrs = dz_ptr + local.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _teacher_args(teacher, like: torch.Tensor, teacher_rows=None):
    """(mode, ht, wt, bt, zt, zt_rows, HT, stride_ht, stride_wt, stride_zt); unused pointers get `like`.
    `teacher_rows`: the row of teacher.logits each (compacted) student row reads."""
    if teacher is None:
        return TEACHER_NONE, like, like, like, like, like, 0, 0, 0, 0
    if teacher.logits is not None:
        zt = teacher.logits.contiguous()
        if teacher_rows is None:
            return TEACHER_LOGITS, like, like, like, zt, like, 0, 0, 0, zt.stride(0)
        return TEACHER_LOGITS_AT_ROWS, like, like, like, zt, teacher_rows.contiguous(), 0, 0, 0, zt.stride(0)
    ht, wt = teacher.hidden.contiguous(), teacher.weight.contiguous()
    bt = like if teacher.bias is None else teacher.bias.contiguous()
    return TEACHER_HIDDEN, ht, wt, bt, like, like, ht.shape[1], ht.stride(0), wt.stride(0), 0


WAVE_EFFICIENCY = 0.9  # the fewest vocabulary slices whose programs fill their last wave at least this much


def wave_efficiency(programs: int, wave: int) -> float:
    """Share of the launched waves' slots the programs use (the last wave may run part empty)."""
    return programs / (triton.cdiv(programs, wave) * wave)


def _auto_splits(n_blocks: int, V: int, block_v: int, target: Target, ctas_per_sm: int = 1) -> int:
    """Vocabulary slices per row block: the fewest whose n_blocks x splits programs fill whole waves (a wave: every
    SM running `ctas_per_sm` programs; every sm_80/sm_90 config fits one per SM as compiled, docs/fused_ops.md) to
    at least WAVE_EFFICIENCY, else the best filled; at most 4 waves and >= 8 tiles a slice (Liger's
    `_resolve_split` reasons the same way). 1 on the interpreter, and with no row block: no counted token, no
    launch."""
    if target.arch is None or n_blocks == 0:
        return 1
    wave = target.sms * ctas_per_sm
    most = max(1, min(triton.cdiv(V, 8 * block_v), triton.cdiv(4 * wave, n_blocks)))
    # the slice counts whole tiles allow (asking for s slices of whole tiles may give fewer)
    options = sorted({whole_tile_splits(V, s, block_v) for s in range(1, most + 1)})
    good = [s for s in options if wave_efficiency(n_blocks * s, wave) >= WAVE_EFFICIENCY]
    return good[0] if good else max(options, key=lambda s: (wave_efficiency(n_blocks * s, wave), -s))


def whole_tile_splits(V: int, splits: int, block_v: int) -> int:
    """The vocabulary slices a request for `splits` gives when every slice is whole tiles."""
    return triton.cdiv(V, triton.cdiv(triton.cdiv(V, splits), block_v) * block_v)


def _variant_and_config(pass_: str, hidden, weight, teacher, where: Target) -> tuple[str, Config]:
    """The kernel variant these inputs run and its tiles: TMA needs every tensor a descriptor reads (as the
    kernel gets it; a logits teacher is read with plain loads) 16-byte aligned."""
    mode, ht, wt = _teacher_args(teacher, hidden)[:3]
    variant = kernel_variant(where, *((hidden, weight, ht, wt) if mode == TEACHER_HIDDEN else (hidden, weight)))
    return variant, pick_config(pass_, hidden.dtype, mode, where, variant)


def forward_launch(hidden, weight, bias, target, part, zy, *, teacher=None, teacher_rows=None, temperature=1.0,
                   where: Target) -> Launch:
    """The forward kernel's launch over contiguous inputs into the [NUM_STATS, splits, N] buffer `part`
    (see `forward_splits`) and zy [N]; teacher logits read at `teacher_rows` when given."""
    N, H = hidden.shape
    V = weight.shape[0]
    mode, ht, wt, bt, zt, zt_rows, HT, s_ht, s_wt, s_zt = _teacher_args(teacher, hidden, teacher_rows)
    variant, cfg = _variant_and_config("fwd", hidden, weight, teacher, where)
    v_per_split = triton.cdiv(triton.cdiv(V, part.shape[1]), cfg.block_v) * cfg.block_v
    return Launch(
        _kernel("fwd", variant), (triton.cdiv(N, cfg.block_n), part.shape[1]),
        (hidden, weight, hidden if bias is None else bias, target, ht, wt, bt, zt, zt_rows, part, zy,
         N, V, H, HT, 1.0 / temperature, v_per_split,
         hidden.stride(0), weight.stride(0), s_ht, s_wt, s_zt),
        dict(HAS_BIAS=bias is not None, TEACHER=mode,
             HAS_TEACHER_BIAS=teacher is not None and teacher.bias is not None,
             BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, IEEE=hidden.dtype == torch.float32),
        cfg)


def forward_splits(hidden, weight, teacher, where: Target, splits=None) -> int:
    """Vocabulary slices of the forward (whole tiles each; `splits` asks for a number, tests use it)."""
    N, V = hidden.shape[0], weight.shape[0]
    cfg = _variant_and_config("fwd", hidden, weight, teacher, where)[1]
    if splits is None:
        splits = _auto_splits(triton.cdiv(N, cfg.block_n), V, cfg.block_v, where)
    return whole_tile_splits(V, splits, cfg.block_v)


def token_stats_forward(hidden, weight, bias, target, *, teacher=None, teacher_rows=None, kl=None, temperature=1.0,
                        ignore_index=-100, splits=None):
    """Per-token fp32 statistics {lse, logp, entropy[, kl, lse_t]} of (hidden W^T + bias) / T.

    hidden [N, H], weight [V, H], bias [V] or None, target [N] int64; teacher logits are read at rows
    `teacher_rows` [N] when given (the counted tokens' rows), else row for row. `splits` forces the number
    of vocabulary slices (tests use it to exercise the merge on CPU).
    """
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    N = hidden.shape[0]
    where = device_target(hidden.device)
    splits = forward_splits(hidden, weight, teacher, where, splits)
    part = torch.zeros(NUM_STATS, splits, N, dtype=torch.float32, device=hidden.device)
    zy = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if N:
        forward_launch(hidden, weight, bias, target, part, zy, teacher=teacher, teacher_rows=teacher_rows,
                       temperature=temperature, where=where)()
    out = combine(part, zy, kl=kl, with_teacher=teacher is not None)
    valid = target != ignore_index
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def combine(part: torch.Tensor, zy: torch.Tensor, *, kl=None, with_teacher=False) -> dict:
    """Merge the partial statistics of the vocabulary slices into per-token outputs."""
    m = part[M].amax(0)
    w = torch.exp(part[M] - m)
    s0 = (w * part[S0]).sum(0)
    a = (w * (part[A] + (part[M] - m) * part[S0])).sum(0)
    log_s0 = torch.log(s0)
    lse = m + log_s0
    # clamp round-off so the invariants hold exactly: logp <= 0, entropy >= 0, KL >= 0
    out = {"lse": lse, "logp": (zy - lse).clamp_(max=0.0), "entropy": (log_s0 - a / s0).clamp_(min=0.0)}
    if with_teacher:
        mt = part[MT].amax(0)
        wt = torch.exp(part[MT] - mt)
        t0 = (wt * part[T0]).sum(0)
        log_t0 = torch.log(t0)
        out["lse_t"] = mt + log_t0
        if kl == "reverse":
            b = (w * (part[B] + (part[MT] - mt) * part[S0])).sum(0)
            out["kl"] = ((a - b) / s0 - log_s0 + log_t0).clamp_(min=0.0)
        else:
            at = (wt * (part[AT] + (part[MT] - mt) * part[T0])).sum(0)
            bt = (wt * (part[BT] + (part[M] - m) * part[T0])).sum(0)
            out["kl"] = ((at - bt) / t0 - log_t0 + log_s0).clamp_(min=0.0)
    return out


BWD_DZ_BYTES = int(os.environ.get("VLMFAST_DZ_BYTES", 2**30))  # the cap of a dz chunk / a one-pass band's logits
# a scratch buffer takes at most this share of the free memory: the call's own dh, fp32 dW and (one pass) the
# band's dz beside its logits come on top, and the caller's next tensors after
FREE_SHARE = 4


def scratch_bytes(where: Target) -> int:
    """Bytes of a dz chunk (token_stats' backward) or of a band's fp32 logits (token_loss' one pass): BWD_DZ_BYTES,
    or a 1/FREE_SHARE of the device's free memory when that is less."""
    if where.free_bytes is None:
        return BWD_DZ_BYTES
    return max(0, min(BWD_DZ_BYTES, where.free_bytes // FREE_SHARE))


def backward_chunk_rows(hidden, weight, teacher, where: Target) -> int:
    """Rows of dz per backward chunk: as many as scratch_bytes hold, whole row tiles (one tile at least)."""
    N, V = hidden.shape[0], weight.shape[0]
    cfg = _variant_and_config("bwd", hidden, weight, teacher, where)[1]
    rows = max(cfg.block_n, scratch_bytes(where) // (V * hidden.element_size()))
    return min(rows // cfg.block_n * cfg.block_n, max(N, 1))


def backward_launch(hidden, weight, bias, target, stats, g, dz, r0, *, teacher=None, teacher_rows=None,
                    kl_mode=KL_NONE, temperature=1.0, ignore_index=-100, where: Target) -> Launch:
    """The backward kernel's launch writing dz [n, V] for rows r0 .. r0 + n of contiguous inputs; `stats`
    holds lse, entropy, kl, lse_t and `g` the upstream logp, entropy, kl, lse gradients, all [N] fp32."""
    V, H = weight.shape
    n = dz.shape[0]
    mode, ht, wt, bt, zt, zt_rows, HT, s_ht, s_wt, s_zt = _teacher_args(teacher, hidden, teacher_rows)
    variant, cfg = _variant_and_config("bwd", hidden, weight, teacher, where)
    return Launch(
        _kernel("bwd", variant), (triton.cdiv(n, cfg.block_n), triton.cdiv(V, cfg.block_v)),
        (hidden, weight, hidden if bias is None else bias, target, ht, wt, bt, zt, zt_rows,
         stats["lse"], stats["entropy"], stats["kl"], stats["lse_t"], g["logp"], g["entropy"], g["kl"], g["lse"], dz,
         r0, n, V, H, HT, 1.0 / temperature, ignore_index,
         hidden.stride(0), weight.stride(0), s_ht, s_wt, s_zt, dz.stride(0)),
        dict(HAS_BIAS=bias is not None, TEACHER=mode,
             HAS_TEACHER_BIAS=teacher is not None and teacher.bias is not None, KL=kl_mode,
             BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, IEEE=hidden.dtype == torch.float32),
        cfg)


def token_stats_backward(hidden, weight, bias, target, stats, grads, *, teacher=None, teacher_rows=None, kl=None,
                         temperature=1.0, ignore_index=-100, need_dh=True, need_dw=True, need_db=False,
                         chunk_rows=None):
    """Gradients (dh, dW fp32, db fp32) of sum_o g_o · o for per-token upstream gradients g_o.

    `stats` holds the forward's lse, entropy (and kl, lse_t); `grads` maps logp, entropy, kl, lse
    to [N] fp32 tensors (missing: zero).
    """
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    where = device_target(dev)
    kl_mode = KL_NONE
    if teacher is not None and grads.get("kl") is not None:
        kl_mode = KL_REVERSE if kl == "reverse" else KL_FORWARD
    zero = torch.zeros(N, dtype=torch.float32, device=dev)
    g = {k: zero if grads.get(k) is None else grads[k].float().contiguous()
         for k in ("logp", "entropy", "kl", "lse")}
    saved = {"lse": stats["lse"], "entropy": stats["entropy"], "kl": stats.get("kl", zero).contiguous(),
             "lse_t": stats.get("lse_t", zero).contiguous()}
    if chunk_rows is None:
        chunk_rows = backward_chunk_rows(hidden, weight, teacher, where)
    chunk_rows = min(chunk_rows, max(N, 1))
    dz_buf = torch.empty(chunk_rows, V, dtype=hidden.dtype, device=dev)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    for r0 in range(0, N, chunk_rows):
        n = min(chunk_rows, N - r0)
        dz = dz_buf[:n]
        backward_launch(hidden, weight, bias, target, saved, g, dz, r0, teacher=teacher, teacher_rows=teacher_rows,
                        kl_mode=kl_mode,
                        temperature=temperature, ignore_index=ignore_index, where=where)()
        accumulate_dz(dz, hidden[r0:r0 + n], weight, None if dh is None else dh[r0:r0 + n], dw, db)
    return dh, dw, db


def accumulate_dz(dz, h, weight, dh_rows, dw, db) -> None:
    """dh_rows = dz W, dW += dz^T h (fp32), db += Σ dz for a chunk of rows' dz [n, V]; None: not wanted."""
    if dh_rows is not None:
        if dz.is_cuda:
            torch.mm(dz, weight, out=dh_rows)
        else:  # the interpreter's CPU tensors: no fast fp16 GEMM there
            dh_rows.copy_(dz.float() @ weight.float())
    if dw is not None:  # accumulated in place: no [V, H] temporary per chunk (2.2 GB fp32 at the 7B head)
        if dz.is_cuda and dz.dtype != torch.float32:
            torch.addmm(dw, dz.T, h, out_dtype=torch.float32, out=dw)
        else:
            dw.addmm_(dz.T.float(), h.float())
    if db is not None:
        db += dz.sum(0, dtype=torch.float32)
