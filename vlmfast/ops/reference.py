"""The naive token statistics: materialise the logits [N, V], then log_softmax, gather and plain sums over the
vocabulary, differentiated by autograd. It shares no formula with the fused backends.

The one naive reference of token_stats: `backend="reference"` runs it (5 GB of fp32 logits at N=8192, V=152064),
and the tests compare every backend and kernel against it (in fp64 for the ground truth, in a 16-bit dtype for the
"naive same-dtype" baseline a fused result must be no worse than). The losses' naive reference, which the
benchmarks time as "naive", is losses/reference.py.
"""

from __future__ import annotations

import torch

from ._inputs import Teacher
from .floor import LOGIT_FLOOR


def _logits(hidden, weight, bias, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def reference_token_stats(
    hidden: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher: Teacher | None = None,
    kl: str | None = None,
    ignore_index: int = -100,
    logits: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    teacher_lse: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token logp, entropy, lse (and kl with a teacher; its lse_t too with teacher_lse) from materialised
    logits; 0 where ignored.

    Pass `hidden, weight[, bias]`, or `logits` directly; `teacher` a Teacher, a logits tensor or (hidden, weight[,
    bias]); kl "forward" (KL(q || p), the default with a teacher) or "reverse". Everything is computed in `dtype`:
    by default fp32 (fp64 for fp64 inputs); a 16-bit dtype gives the naive same-dtype computation.
    """
    src = logits if logits is not None else hidden
    dtype = dtype or torch.promote_types(src.dtype, torch.float32)
    teacher = Teacher.coerce(teacher)
    floor = max(LOGIT_FLOOR, torch.finfo(dtype).min)  # fp16's range ends at -65504
    z = (logits.to(dtype) if logits is not None else _logits(hidden, weight, bias, dtype)) / temperature
    z = z.clamp(min=floor)  # masked (-inf) columns: the floor every backend applies (ops/floor.py)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    zero = torch.zeros((), dtype=dtype, device=z.device)
    out = {
        "lse": torch.where(valid, torch.logsumexp(z, dim=-1), zero),
        "logp": torch.where(valid, logp_all.gather(-1, safe_target[:, None])[:, 0], zero),
        "entropy": torch.where(valid, -(p * logp_all).sum(-1), zero),
    }
    if teacher is not None:
        if teacher.logits is not None:
            zt = teacher.logits.to(dtype)
        else:
            zt = _logits(teacher.hidden, teacher.weight, teacher.bias, dtype)
        zt = (zt.detach() / temperature).clamp(min=floor)
        logq_all = torch.log_softmax(zt, dim=-1)
        if teacher_lse:  # what the native kernels also return (tests/test_native.py)
            out["lse_t"] = torch.where(valid, torch.logsumexp(zt, dim=-1), zero)
        if kl == "reverse":  # KL(p || q)
            k = (p * (logp_all - logq_all)).sum(-1)
        else:  # KL(q || p)
            k = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
        out["kl"] = torch.where(valid, k, zero)
    return out
