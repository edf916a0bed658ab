"""Naive implementations written independently of vlmfast: materialised logits in a chosen dtype,
plain log_softmax / gather / sums. `naive_stats(..., dtype=float32)` on upcast inputs is the fp32
ground truth; with dtype=bfloat16 it is the "naive same-dtype" baseline a fused op must beat."""

import torch


def naive_stats(h, W, b, y, *, T=1.0, teacher=None, kl=None, ignore_index=-100, dtype=torch.float32):
    """Per-token logp, entropy, lse, kl computed entirely in `dtype` (autograd-differentiable)."""
    z = h.to(dtype) @ W.to(dtype).T
    if b is not None:
        z = z + b.to(dtype)
    z = z / T
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    out = {
        "logp": logp_all.gather(-1, ys[:, None])[:, 0],
        "entropy": -(p * logp_all).sum(-1),
        "lse": torch.logsumexp(z, -1),
    }
    if teacher is not None:
        if isinstance(teacher, torch.Tensor):
            zt = teacher.to(dtype)
        else:
            zt = teacher[0].to(dtype) @ teacher[1].to(dtype).T
        logq_all = torch.log_softmax(zt.detach() / T, -1)
        if kl == "reverse":
            out["kl"] = (p * (logp_all - logq_all)).sum(-1)
        else:
            out["kl"] = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}
