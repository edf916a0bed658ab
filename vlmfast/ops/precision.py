"""One precision rule for fp32 inputs: IEEE fp32 in every kernel and GEMM of a fused call, whatever torch's flags.

The Triton kernels run fp32 dot products with `input_precision="ieee"` (kernels/token_stats.py) and the native CPU
kernels in plain fp32. torch's own GEMMs in the same call (the one pass's logits, dh = dz W, dW += dz^T h) follow
torch's global setting: TF32 on CUDA after `torch.set_float32_matmul_precision("high")` or
`torch.backends.cuda.matmul.allow_tf32 = True`, bf16 in oneDNN on the CPU after "medium". A call mixing the two
rounds its logits two ways, and `token_stats` (a GRPO rollout's old log-probs) and `token_loss` (its update) then
disagree by TF32's error: the first ratio is not 1. So inside each forward and backward of the fused ops, torch's
fp32 matmuls run IEEE, and torch's setting is put back after, through the API that reads it (torch refuses to
read `allow_tf32` once the legacy and the new flags disagree).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_BACKENDS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


@contextlib.contextmanager
def ieee_fp32_matmuls(dtype: torch.dtype):
    """torch's fp32 matmuls in IEEE fp32 (no TF32 / bf16 inputs) for the block when `dtype` is fp32."""
    if dtype != torch.float32:
        yield
        return
    before = [b.fp32_precision for b in _BACKENDS]
    try:
        for b in _BACKENDS:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(_BACKENDS, before):
            b.fp32_precision = value


def ieee_fp32(fn):
    """For an autograd Function's forward(ctx, first_input, ...) / backward(ctx, ...): the rule above, by the dtype
    of the forward's first input (saved on ctx for the backward)."""

    @functools.wraps(fn)
    def wrapped(ctx, *args):
        if fn.__name__ == "forward":
            ctx.input_dtype = args[0].dtype
        with ieee_fp32_matmuls(ctx.input_dtype):
            return fn(ctx, *args)

    return wrapped
