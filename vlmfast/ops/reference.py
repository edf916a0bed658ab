"""Reference backend: materialises the full fp32 logits [N, V] and lets autograd differentiate.

For tests and benchmarks only (5 GB of logits at N=8192, V=152064). It shares no formula with the
fused backends: log_softmax, gather and plain sums over the vocabulary.
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
) -> dict[str, torch.Tensor]:
    """Per-token logp, entropy, lse (and kl, lse_t with a teacher) from materialised logits.

    Pass `hidden, weight[, bias]`, or `logits` directly. Computes in fp32 (fp64 for fp64 inputs).
    """
    src = logits if logits is not None else hidden
    dtype = torch.promote_types(src.dtype, torch.float32)
    z = (logits.to(dtype) if logits is not None else _logits(hidden, weight, bias, dtype)) / temperature
    z = z.clamp(min=LOGIT_FLOOR)  # masked (-inf) columns: the floor every backend applies (ops/floor.py)
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
        zt = (zt.detach() / temperature).clamp(min=LOGIT_FLOOR)
        logq_all = torch.log_softmax(zt, dim=-1)
        out["lse_t"] = torch.where(valid, torch.logsumexp(zt, dim=-1), zero)
        if kl == "reverse":  # KL(p || q)
            k = (p * (logp_all - logq_all)).sum(-1)
        else:  # KL(q || p)
            k = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
        out["kl"] = torch.where(valid, k, zero)
    return out
