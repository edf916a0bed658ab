"""Fused token statistics over large vocabularies: log-prob of the target, entropy, KL to a
teacher, log-partition, per token and per sequence, fused with the lm_head matmul.

Per token, with z = (h W^T + b) / T (never stored whole), p = softmax(z), q = softmax(zt):

    lse     = log Σ_v exp(z_v)
    logp    = z_y - lse                                  (<= 0)
    entropy = lse - Σ_v p_v z_v                          (0 <= H <= log V)
    kl      = KL(p || q) = Σ_v p_v (log p_v - log q_v)   kl="reverse" (on-policy distillation)
            = KL(q || p) = Σ_v q_v (log q_v - log p_v)   kl="forward"

Gradients flow to hidden, weight and bias for any per-token upstream gradient on any outputs;
the teacher gets none. Tokens whose target is `ignore_index` output 0 and get zero gradient.

Backends, one contract: "triton" (fused kernels, CUDA; CPU under TRITON_INTERPRET=1), "chunked"
(blocks of logits from a BLAS matmul, any device; on the CPU its per-block work runs in the native
C++ kernels of native.py when they are built), "reference" (materialised fp32 logits, tests only).
"auto" picks triton for CUDA tensors and chunked otherwise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields

import torch

from . import one_pass
from ._inputs import BACKENDS, Teacher, check_from_logits, check_token_stats
from .function import FusedLinearTokenStats, LogitsTokenStats
from .one_pass import FusedLinearTokenLoss
from .reference import reference_token_stats

__all__ = [
    "Teacher",
    "TokenStats",
    "token_stats",
    "token_loss",
    "token_stats_from_logits",
    "sequence_mean",
]


@dataclass
class TokenStats:
    """Per-token fp32 outputs, shaped like the target ([N] or [B, T]); None where not requested.

    Per-sequence outputs (per_sequence=True or cu_seqlens): sums over the non-ignored tokens of
    each sequence, and their token counts.
    """

    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    seq_logp: torch.Tensor | None = None
    seq_entropy: torch.Tensor | None = None
    seq_count: torch.Tensor | None = None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


_CHECK_INPUTS: bool | None = None  # the default a trainer sets for the calls it makes (inputs_checked)


def _check_inputs_default(check_inputs: bool | None) -> bool:
    if check_inputs is None:
        if _CHECK_INPUTS is not None:
            return _CHECK_INPUTS
        return os.environ.get("VLMFAST_CHECK_INPUTS", "1") != "0"
    return bool(check_inputs)


@contextlib.contextmanager
def inputs_checked(flag: bool):
    """Inside: calls that leave `check_inputs` unset check values (target ranges, NaN/inf: 2 host syncs and a
    pass over the inputs) when `flag`, and skip it otherwise. A trainer checks the first step of a stage and
    then runs the hot path with the op's one host sync (the count of counted tokens that sizes the GEMMs)."""
    global _CHECK_INPUTS
    before, _CHECK_INPUTS = _CHECK_INPUTS, bool(flag)
    try:
        yield
    finally:
        _CHECK_INPUTS = before


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "chunked"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); on the CPU use backend='chunked' "
                "or set TRITON_INTERPRET=1 before importing vlmfast"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float32, bfloat16 or float16 inputs, not float64")
    return backend


def _compact_rows(c, ignore_index):
    """Indices of the tokens that count, or None when all do: ignored tokens (a VLM's prompt and image
    tokens, often most of a sequence) are dropped before any GEMM, forward and backward. Sizing the
    compacted GEMMs takes the op's one host sync on a GPU (the count); computing the ignored rows instead
    would cost their share of 8·N·H·V FLOP. Given teacher logits are not copied: the kernels read them at
    the kept rows."""
    rows = (c.target != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == c.target.numel() else rows


def _take(t, rows):
    return t if (rows is None or t is None) else t.index_select(0, rows)


def _finish(c, per_token: dict, outputs, rows) -> TokenStats:
    N = c.target.numel()
    result = {}
    for name, value in per_token.items():
        if rows is not None:  # scatter the compacted rows back (differentiable)
            value = value.new_zeros(N).index_copy(0, rows, value)
        result[name] = value
    out = TokenStats(**{k: result[k].reshape(c.batch_shape) for k in outputs})
    if c.segment is not None:
        # segment reduction in the epilogue: O(N), no second pass over the vocabulary
        zeros = result["logp"].new_zeros(c.num_segments)
        out.seq_logp = zeros.index_add(0, c.segment, result["logp"])
        out.seq_entropy = zeros.index_add(0, c.segment, result["entropy"])
        out.seq_count = zeros.index_add(0, c.segment, c.valid.to(zeros.dtype))
    return out


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    teacher=None,
    kl: str | None = None,
    outputs=("logp", "entropy"),
    ignore_index: int = -100,
    per_sequence: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> TokenStats:
    """Fused lm_head + per-token statistics; the [N, V] logits are never materialised.

    Args:
        hidden: last hidden states [N, H] or [B, T, H] (fp32, bf16 or fp16).
        weight: lm_head weight [V, H], same dtype as hidden. bias: optional [V].
        target: token ids [N] or [B, T]; `ignore_index` marks tokens that contribute nothing.
        temperature: T > 0; student and teacher logits are both divided by it.
        teacher: `(hidden_t, weight_t[, bias_t])` (fused) or teacher logits [..., V], with `kl`.
        kl: None, "reverse" (KL(student || teacher)) or "forward" (KL(teacher || student)).
        outputs: which of "logp", "entropy", "kl", "lse" to return.
        per_sequence: with [B, T] inputs, also return per-row sums and token counts.
        cu_seqlens: packed sequences [S + 1] over flat [N] inputs: per-sequence sums and counts.
        backend: "auto", "triton", "chunked" or "reference".
        check_inputs: check target ranges and NaN/inf before any compute (host syncs; pass False or
            set VLMFAST_CHECK_INPUTS=0 on a hot GPU path). Shapes, dtypes and devices are always
            checked (no sync). The op's one other sync is the count of non-ignored tokens, which sizes
            the GEMMs: ignored tokens are dropped before any compute.
    """
    check_inputs = _check_inputs_default(check_inputs)
    c = check_token_stats(
        hidden, weight, target, bias=bias, temperature=temperature, teacher=teacher, kl=kl,
        outputs=outputs, ignore_index=ignore_index, per_sequence=per_sequence,
        cu_seqlens=cu_seqlens, check_values=check_inputs,
    )
    backend = _resolve_backend(backend, hidden.device, hidden.dtype)
    c.valid = c.target != ignore_index
    if backend == "reference":
        rows = None
        per_token = reference_token_stats(
            c.hidden, c.weight, c.bias, c.target, temperature=c.temperature, teacher=c.teacher,
            kl=c.kl, ignore_index=ignore_index,
        )
    else:
        rows = _compact_rows(c, ignore_index)
        t, teacher_rows = c.teacher, None
        if rows is not None and t is not None:  # given teacher logits stay where they are: a block gathers its rows
            t = Teacher(hidden=_take(t.hidden, rows), weight=t.weight, bias=t.bias, logits=t.logits)
            teacher_rows = rows if t.logits is not None else None
        logp, entropy, kl_out, lse = FusedLinearTokenStats.apply(
            _take(c.hidden, rows), c.weight, c.bias, _take(c.target, rows), t, teacher_rows, c.kl,
            c.temperature, ignore_index, backend,
        )
        per_token = {"logp": logp, "entropy": entropy, "lse": lse}
        if c.teacher is not None:
            per_token["kl"] = kl_out
    return _finish(c, per_token, outputs, rows)


def token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    per_token_loss,
    *,
    groups: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    teacher=None,
    kl: str | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> tuple[torch.Tensor, TokenStats]:
    """A loss summed over tokens, L = Σ_t ℓ_t(stats of token t), or over groups of tokens, fused with the lm_head
    in one pass.

    `per_token_loss(stats, index)` gets the statistics of some counted tokens (a dict of [n] fp32 tensors:
    "logp", "entropy", "lse", and "kl" with a teacher) and their positions `index` [n] in the flattened target,
    and returns each token's loss [n]; it must be differentiable in the statistics only (anything else it reads,
    such as advantages or 1 / token count, is a constant) and must not mix tokens.

    `groups` (integers shaped like target): the loss is a sum over groups of tokens instead, L = Σ_g L_g(stats of
    g's tokens) (DPO's pairs of sequences, a negative's hinge); per_token_loss then returns [G], every group's loss
    computed from the tokens it is given alone (a group given none of its tokens: from empty sums), and is always
    given all counted tokens of a group together. The group ids of counted tokens lie in [0, G).

    per_token_loss is called once on no tokens (n = 0) before any work, to check the shape it returns, then once
    per band (how many depends on the data: it must hold no collective, which ranks would call unequally). On the
    chunked backend (and Triton's from one_pass.TRITON_MIN_HIDDEN) the forward computes the gradient as it goes
    (one_pass.py: 3 GEMMs instead of token_stats' 4), a group's tokens in one band; elsewhere, or when a group is
    larger than a band may stretch to (one_pass.GROUP_STRETCH), the whole call is token_stats' statistics fed to
    the same function (same value and gradient, 4 GEMMs).

    Arguments as `token_stats`. Returns (loss, stats): the scalar loss (fp32; fp64 for fp64 inputs), and
    TokenStats logp, entropy, lse (+ kl), detached, shaped like target, 0 on ignored tokens.
    """
    check_inputs = _check_inputs_default(check_inputs)
    outputs = ("logp", "entropy", "lse") + (("kl",) if teacher is not None else ())
    c = check_token_stats(
        hidden, weight, target, bias=bias, temperature=temperature, teacher=teacher, kl=kl, outputs=outputs,
        ignore_index=ignore_index, per_sequence=False, cu_seqlens=None, check_values=check_inputs,
    )
    backend = _resolve_backend(backend, hidden.device, hidden.dtype)
    c.valid = c.target != ignore_index
    rows = c.valid.nonzero().squeeze(1)
    stat_dtype = torch.float64 if c.hidden.dtype == torch.float64 else torch.float32
    absent = _loss_on_no_tokens(per_token_loss, outputs, stat_dtype, c.target.device, groups is not None)
    group_ids, group_sizes = None, None
    if groups is not None:
        group_of_row = _check_groups(groups, target, c.valid, absent.numel()).index_select(0, rows)
        group_of_row, order = torch.sort(group_of_row, stable=True)  # each group's rows side by side
        rows = rows.index_select(0, order)
        group_ids, group_sizes = torch.unique_consecutive(group_of_row, return_counts=True)
        group_sizes = group_sizes.tolist()
    band_loss = one_pass.BandLoss(per_token_loss, rows, group_ids, group_sizes, absent)
    bands = None
    if backend == "chunked" or (backend == "triton" and one_pass.triton_one_pass(c.weight.shape[1])):
        n = rows.numel()
        bands = one_pass.plan_bands(n, one_pass.budget_rows(backend, n, c.hidden, c.weight), group_sizes)
    if bands is None:
        # token_stats' statistics (its kernels recompute the logits), the same function
        r = token_stats(hidden, weight, target, bias=bias, temperature=temperature, teacher=teacher, kl=kl,
                        outputs=outputs, ignore_index=ignore_index, backend=backend, check_inputs=False)
        stats = {k: getattr(r, k).reshape(-1).index_select(0, rows) for k in outputs}
        loss = band_loss(stats, 0, rows.numel()) + band_loss.absent_groups(stats["logp"].dtype)
        return loss, TokenStats(**{k: getattr(r, k).detach() for k in outputs})
    t = c.teacher
    if t is not None:  # teacher logits stay where they are: a band gathers its rows (no compacted [n, V] copy)
        t = Teacher(hidden=_take(t.hidden, rows), weight=t.weight, bias=t.bias, logits=t.logits)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and x is not None and x.requires_grad for x in (c.hidden, c.weight, c.bias))
    loss, *per_token = FusedLinearTokenLoss.apply(
        _take(c.hidden, rows), c.weight, c.bias, _take(c.target, rows), t, rows, c.kl, c.temperature, ignore_index,
        band_loss, bands, needs, backend,
    )
    per_token = dict(zip(("logp", "entropy", "kl", "lse"), per_token))
    return loss, _finish(c, {k: per_token[k] for k in outputs}, outputs, rows)


def _loss_on_no_tokens(per_token_loss, outputs, dtype, device, grouped: bool) -> torch.Tensor:
    """per_token_loss on no tokens, before any work: a wrong shape is named now, not after a GEMM; with groups,
    the losses of groups without counted tokens."""
    empty = {k: torch.zeros(0, dtype=dtype, device=device) for k in outputs}
    with torch.no_grad():
        out = per_token_loss(empty, torch.zeros(0, dtype=torch.long, device=device))
    if not (isinstance(out, torch.Tensor) and out.dim() == 1 and (grouped or out.numel() == 0)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = "one loss per group, [G]" if grouped else "one loss per token, [n] (called on n = 0 tokens: (0,))"
        raise ValueError(f"per_token_loss must return {want}; got {got}")
    return out.detach()


def _check_groups(groups, target: torch.Tensor, valid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """groups as [N] int64 after checking it: integers shaped like target, in [0, G) on counted tokens."""
    if not isinstance(groups, torch.Tensor) or groups.is_floating_point() or groups.is_complex() \
            or groups.dtype == torch.bool:
        got = groups.dtype if isinstance(groups, torch.Tensor) else type(groups).__name__
        raise ValueError(f"groups must be an integer tensor shaped like target, got {got}")
    if tuple(groups.shape) != tuple(target.shape):
        raise ValueError(f"groups has shape {tuple(groups.shape)}; expected target's {tuple(target.shape)}")
    g = groups.reshape(-1).to(device=valid.device, dtype=torch.long)
    bad = valid & ((g < 0) | (g >= n_groups))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"groups[{i}] (flattened) = {int(g[i])} is outside [0, {n_groups}): per_token_loss "
                         f"returned {n_groups} group losses")
    return g


def token_stats_from_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher: torch.Tensor | None = None,
    kl: str | None = None,
    outputs=("logp", "entropy"),
    ignore_index: int = -100,
    per_sequence: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_inputs: bool | None = None,
) -> TokenStats:
    """`token_stats` for callers that already hold the logits [N, V] or [B, T, V].

    Row-chunked (the logits exist already, so there is no matmul to fuse); `teacher` is teacher
    logits of the same shape. Differentiable w.r.t. `logits`.
    """
    check_inputs = _check_inputs_default(check_inputs)
    c = check_from_logits(
        logits, target, temperature=temperature, teacher=teacher, kl=kl, outputs=outputs,
        ignore_index=ignore_index, per_sequence=per_sequence, cu_seqlens=cu_seqlens,
        check_values=check_inputs,
    )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "triton":
        raise ValueError("token_stats_from_logits has no triton kernel (the logits exist already); "
                         "use backend='chunked'")
    c.valid = c.target != ignore_index
    if backend == "reference":
        per_token = reference_token_stats(
            None, None, None, c.target, logits=c.hidden, temperature=c.temperature, teacher=c.teacher,
            kl=c.kl, ignore_index=ignore_index,
        )
    else:
        logp, entropy, kl_out, lse = LogitsTokenStats.apply(
            c.hidden, c.target, c.teacher, c.kl, c.temperature, ignore_index,
        )
        per_token = {"logp": logp, "entropy": entropy, "lse": lse}
        if c.teacher is not None:
            per_token["kl"] = kl_out
    return _finish(c, per_token, outputs, None)


def sequence_mean(seq_sum: torch.Tensor, seq_count: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean from per-sequence sums and token counts; 0 for an empty sequence."""
    return seq_sum / seq_count.clamp(min=1)
