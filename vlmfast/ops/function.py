"""The autograd Functions of the fused ops: forward through a backend, backward that takes ANY
per-token upstream gradient on every output (whatever a caller computes from the statistics; vlmfast's own
losses know theirs in the forward and take one_pass.py instead)."""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from . import chunked
from .precision import ieee_fp32

GRAD_NAMES = ("logp", "entropy", "kl", "lse")


def _triton():
    from vlmfast.kernels import token_stats as kernel  # imported lazily: triton is optional on CPU

    return kernel


def first_order_only(backward):
    """A backward that refuses backward(create_graph=True): its gradients are computed, not traced, so a second
    derivative (a gradient penalty, a Hessian-vector product) would come back silently without this op's part."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only under create_graph=True
            raise RuntimeError("vlmfast's fused ops have no second derivative (backward with create_graph=True): "
                               "compute a gradient penalty through the unfused head (vlmfast.losses.reference)")
        return backward(ctx, *grads)

    return wrapper


def _saved_stats(ctx):
    lse, entropy, kl, lse_t = ctx.saved_tensors[-4:]
    stats = {"lse": lse, "entropy": entropy}
    if ctx.teacher is not None:
        stats.update(kl=kl, lse_t=lse_t)
    return stats


def _finish_forward(ctx, stats: dict, inputs: tuple, teacher):
    """Save the inputs and the O(N) statistics for the recomputing backward; return the outputs
    (logp, entropy, kl, lse). Without a teacher, kl is a zero tensor that takes no gradient."""
    empty = torch.zeros_like(stats["lse"])
    kl, lse_t = stats.get("kl", empty), stats.get("lse_t", empty)
    ctx.save_for_backward(*inputs, stats["lse"], stats["entropy"], kl, lse_t)
    ctx.teacher = teacher
    ctx.set_materialize_grads(False)
    if teacher is None:
        ctx.mark_non_differentiable(kl)
    return stats["logp"], stats["entropy"], kl, stats["lse"]


class FusedLinearTokenStats(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, target [N]) -> logp, entropy, kl, lse [N]. Given teacher
    logits are read at rows `teacher_rows` (the counted tokens; None: row for row)."""

    @staticmethod
    @ieee_fp32
    def forward(ctx, hidden, weight, bias, target, teacher, teacher_rows, kl, temperature, ignore_index, backend):
        kw = dict(teacher=teacher, kl=kl, temperature=temperature, ignore_index=ignore_index)
        if backend == "triton":
            stats = _triton().token_stats_forward(hidden, weight, bias, target, teacher_rows=teacher_rows, **kw)
        else:
            kw["teacher"] = chunked.teacher_head(teacher, teacher_rows)
            head = chunked.LinearHead(hidden, weight, bias, native_epilogue=chunked.native_beside(kw["teacher"]))
            stats = chunked.forward(head, target, **kw)
        ctx.kl, ctx.temperature, ctx.ignore_index, ctx.backend = kl, temperature, ignore_index, backend
        ctx.teacher_rows = teacher_rows
        return _finish_forward(ctx, stats, (hidden, weight, bias, target), teacher)

    @staticmethod
    @first_order_only
    @once_differentiable
    @ieee_fp32
    def backward(ctx, *grad_outputs):
        hidden, weight, bias, target = ctx.saved_tensors[:4]
        grads = dict(zip(GRAD_NAMES, grad_outputs))
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        kw = dict(teacher=ctx.teacher, kl=ctx.kl, temperature=ctx.temperature, ignore_index=ctx.ignore_index)
        stats = _saved_stats(ctx)
        if all(g is None for g in grads.values()):
            return (None,) * 10
        if ctx.backend == "triton":
            dh, dw, db = _triton().token_stats_backward(
                hidden, weight, bias, target, stats, grads, teacher_rows=ctx.teacher_rows,
                need_dh=need_dh, need_dw=need_dw, need_db=need_db, **kw,
            )
        else:
            kw["teacher"] = chunked.teacher_head(ctx.teacher, ctx.teacher_rows)
            head = chunked.LinearHead(hidden, weight, bias, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
                                      native_epilogue=chunked.native_beside(kw["teacher"]))
            chunked.backward(head, target, stats, grads, **kw)
            dh, dw, db = head.dh, head.dw, head.db
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None, None


class LogitsTokenStats(torch.autograd.Function):
    """(logits [N, V], target [N]) -> logp, entropy, kl, lse [N]; chunked over rows."""

    @staticmethod
    def forward(ctx, logits, target, teacher, kl, temperature, ignore_index):
        kw = dict(kl=kl, temperature=temperature, ignore_index=ignore_index)
        stats = chunked.forward(chunked.LogitsHead(logits), target, teacher=chunked.teacher_head(teacher), **kw)
        ctx.kw = kw
        return _finish_forward(ctx, stats, (logits, target), teacher)

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx, *grad_outputs):
        logits, target = ctx.saved_tensors[:2]
        grads = dict(zip(GRAD_NAMES, grad_outputs))
        if all(g is None for g in grads.values()) or not ctx.needs_input_grad[0]:
            return (None,) * 6
        head = chunked.LogitsHead(logits, need_grad=True)
        chunked.backward(head, target, _saved_stats(ctx), grads, teacher=chunked.teacher_head(ctx.teacher),
                         **ctx.kw)
        return head.dx, None, None, None, None, None
