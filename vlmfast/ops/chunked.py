"""Chunked backend: pure PyTorch over blocks of token rows. Any device; the CPU path.

Per block of rows, the fp32 logits [rows, V] are computed (h W^T + b, or sliced from given
logits), reduced to the per-token statistics, and dropped. Peak memory is O(N·H + V·H) plus a few
[rows, V] fp32 blocks; `chunk_rows` bounds the block (default: about 64 MB per block).

Backward recomputes each block from the saved O(N) statistics and applies, per token,

    dz_j = ( g_logp (onehot_j - p_j)
           - g_H    p_j (log p_j + H)
           + g_KL   p_j (log p_j - log q_j - KL)     (reverse KL)
           + g_KL   (p_j - q_j)                      (forward KL)
           + g_lse  p_j ) / T

then dh = dz W, dW += dz^T h (fp32), db += sum dz.

On the CPU, the per-block epilogue (logits block -> statistics, logits block -> dz) runs in the
native kernels of `native.py` when they are built (one pass per block, dz written over the logits
block in place); `VLMFAST_NATIVE=0` or a build without a compiler keeps it in PyTorch below.
"""

from __future__ import annotations

import os

import torch

from . import native
from ._inputs import Teacher
from ._matmul import mm_wide, wide_dtype

BLOCK_BYTES = int(os.environ.get("VLMFAST_CHUNK_BYTES", 64 * 2**20))


def default_chunk_rows(vocab: int) -> int:
    return max(16, BLOCK_BYTES // (4 * vocab))


class LinearHead:
    """Logits h W^T + b of a block of rows, computed on demand, with gradient accumulation."""

    def __init__(self, hidden, weight, bias=None, *, need_dh=False, need_dw=False, need_db=False):
        self.hidden, self.bias = hidden, bias
        # On the CPU, one fp32 copy of W serves every block (no fast bf16 GEMM there); on CUDA
        # bf16 stays on tensor cores with fp32 output.
        self.dtype = wide_dtype(weight.dtype)  # fp32 (fp64 for gradcheck)
        self.weight = weight if weight.is_cuda else weight.to(self.dtype)
        self.vocab = weight.shape[0]
        self.need_dh, self.need_dw, self.need_db = need_dh, need_dw, need_db
        self.dh = torch.empty_like(hidden) if need_dh else None
        self.dw = torch.zeros(weight.shape, dtype=self.dtype, device=weight.device) if need_dw else None
        self.db = torch.zeros(self.vocab, dtype=self.dtype, device=weight.device) if need_db else None

    def logits(self, r0: int, r1: int) -> torch.Tensor:
        """A fresh fp32 block h W^T + b (the caller may overwrite it)."""
        h = self.hidden[r0:r1]
        if self.bias is not None and not h.is_cuda:  # the bias rides in the GEMM: no extra pass
            return torch.addmm(self.bias.to(self.dtype), h.to(self.dtype), self.weight.T)
        z = mm_wide(h, self.weight.T)
        return z if self.bias is None else z.add_(self.bias.to(z.dtype))

    raw_logits = logits  # what the native epilogue reads: the fresh block, its gradient goes over it

    def grad_out(self, r0: int, r1: int, z: torch.Tensor) -> torch.Tensor:
        return z

    def accumulate(self, r0: int, r1: int, dz: torch.Tensor) -> None:
        h = self.hidden[r0:r1]
        if self.need_dh:
            dz_op = dz if not self.weight.is_cuda else dz.to(self.weight.dtype)
            self.dh[r0:r1] = mm_wide(dz_op, self.weight).to(self.dh.dtype)
        if self.need_dw:
            if h.is_cuda:
                self.dw += mm_wide(dz.to(h.dtype).T, h)
            else:  # in place: no [V, H] temporary per block
                self.dw.addmm_(dz.T, h.to(self.dw.dtype))
        if self.need_db:
            self.db += dz.sum(0)


class LogitsHead:
    """Rows of logits given directly; the gradient w.r.t. them is dz itself."""

    def __init__(self, logits, *, need_grad=False):
        self.x = logits
        self.dtype = wide_dtype(logits.dtype)
        self.vocab = logits.shape[-1]
        self.dx = torch.empty_like(logits) if need_grad else None

    def logits(self, r0: int, r1: int) -> torch.Tensor:
        return self.x[r0:r1].to(self.dtype, copy=True)  # _block scales it in place

    def raw_logits(self, r0: int, r1: int) -> torch.Tensor:
        return self.x[r0:r1]  # the native epilogue reads the input as it is (no fp32 copy)

    def grad_out(self, r0: int, r1: int, z: torch.Tensor) -> torch.Tensor:
        return self.dx[r0:r1]  # the native epilogue writes dz straight into the gradient

    def accumulate(self, r0: int, r1: int, dz: torch.Tensor) -> None:
        if self.dx is not None and dz.data_ptr() != self.dx[r0:r1].data_ptr():
            self.dx[r0:r1] = dz.to(self.dx.dtype)


def teacher_head(teacher: Teacher | None):
    if teacher is None:
        return None
    if teacher.logits is not None:
        return LogitsHead(teacher.logits)
    return LinearHead(teacher.hidden, teacher.weight, teacher.bias)


def _block(head, r0, r1, inv_t):
    """Scaled logits z of rows [r0, r1), their lse, and log-softmax (in place over z)."""
    z = head.logits(r0, r1).mul_(inv_t)
    lse = torch.logsumexp(z, dim=-1)
    return lse, z.sub_(lse[:, None])


def forward(student, target, *, temperature, teacher=None, kl=None, ignore_index=-100, chunk_rows=None):
    """Per-token fp32 statistics: dict with lse, logp, entropy (+ kl, lse_t with a teacher)."""
    N = target.numel()
    dev = target.device
    chunk_rows = chunk_rows or default_chunk_rows(student.vocab)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    names = ["lse", "logp", "entropy"] + (["kl", "lse_t"] if teacher is not None else [])
    out = {k: torch.zeros(N, dtype=student.dtype, device=dev) for k in names}
    inv_t = 1.0 / temperature
    use_native = _native_ok(student, teacher)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        if use_native:
            zt = teacher.raw_logits(r0, r1) if teacher is not None else None
            block = native.block_stats(student.raw_logits(r0, r1), target[r0:r1], zt, inv_t=inv_t, kl=kl,
                                       ignore_index=ignore_index)
            for k, v in block.items():
                out[k][r0:r1] = v
            continue
        lse, logp_all = _block(student, r0, r1, inv_t)
        p = logp_all.exp()
        out["lse"][r0:r1] = lse
        out["logp"][r0:r1] = logp_all.gather(1, safe[r0:r1, None])[:, 0]
        out["entropy"][r0:r1] = -(p * logp_all).sum(-1)
        if teacher is not None:
            lse_t, logq_all = _block(teacher, r0, r1, inv_t)
            out["lse_t"][r0:r1] = lse_t
            if kl == "reverse":
                out["kl"][r0:r1] = (p * (logp_all - logq_all)).sum(-1)
            else:
                out["kl"][r0:r1] = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
    for k, v in out.items():
        out[k] = torch.where(valid, v, torch.zeros_like(v))
    return finish(out)


def _native_ok(student, teacher) -> bool:
    """The native epilogue takes fp32/bf16/fp16 CPU blocks (fp64, for gradcheck, stays in PyTorch)."""
    def ok(head):
        if isinstance(head, LogitsHead):
            return native.usable(head.x)
        return head.dtype == torch.float32 and not head.weight.is_cuda

    return native.enabled() and ok(student) and (teacher is None or ok(teacher))


def finish(out: dict) -> dict:
    """Clamp round-off so the invariants hold exactly: logp <= 0, entropy >= 0, KL >= 0."""
    out["logp"] = out["logp"].clamp_(max=0.0)
    out["entropy"] = out["entropy"].clamp_(min=0.0)
    if "kl" in out:
        out["kl"] = out["kl"].clamp_(min=0.0)
    return out


def backward(student, target, stats, grads, *, temperature, teacher=None, kl=None, ignore_index=-100,
             chunk_rows=None):
    """Accumulate into `student` the gradient of sum(g_o * o) over outputs o, for per-token g_o.

    `grads` maps "logp", "entropy", "kl", "lse" to [N] fp32 upstream gradients or None.
    """
    N = target.numel()
    chunk_rows = chunk_rows or default_chunk_rows(student.vocab)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    zero = torch.zeros(N, dtype=student.dtype, device=target.device)
    g = {k: zero if grads.get(k) is None else torch.where(valid, grads[k].to(zero.dtype), zero)
         for k in ("logp", "entropy", "kl", "lse")}
    use_kl = teacher is not None and grads.get("kl") is not None
    inv_t = 1.0 / temperature
    use_native = _native_ok(student, teacher)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        rows = slice(r0, r1)
        if use_native:
            z = student.raw_logits(r0, r1)
            zt = teacher.raw_logits(r0, r1) if use_kl else None
            out = student.grad_out(r0, r1, z)
            native.block_grad_(z, target[rows], zt, {k: v[rows] for k, v in stats.items()},
                               {k: v[rows] for k, v in g.items()}, out, inv_t=inv_t,
                               kl=kl if use_kl else None, ignore_index=ignore_index)
            student.accumulate(r0, r1, out)
            continue
        _, logp_all = _block(student, r0, r1, inv_t)
        p = logp_all.exp()
        # coefficient of p_j, per token and column
        c = (logp_all + stats["entropy"][rows, None]).mul_(-g["entropy"][rows, None])
        c += (g["lse"][rows] - g["logp"][rows])[:, None]
        if use_kl:
            _, logq_all = _block(teacher, r0, r1, inv_t)
            gk = g["kl"][rows, None]
            if kl == "reverse":
                c += gk * (logp_all - logq_all - stats["kl"][rows, None])
                dz = p.mul_(c)
            else:
                dz = p.mul_(c + gk) - gk * logq_all.exp_()
        else:
            dz = p.mul_(c)
        # onehot term added in fp32 after the p-terms: no cancellation as p_y -> 1
        dz.scatter_add_(1, safe[rows, None], g["logp"][rows, None])
        student.accumulate(r0, r1, dz.mul_(inv_t))
    return student

