"""Matmuls whose result is at least fp32 whatever the input dtype: logits and dW must not be
rounded to bf16."""

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 (fp64 for fp64 inputs) result.

    On CUDA, bf16/fp16 inputs stay on tensor cores with fp32 accumulation and an fp32 output
    (`torch.mm(..., out_dtype=)`). Elsewhere the inputs are upcast (exact): torch has no CPU
    out_dtype. The chunked backend's native path does not come here for 16-bit CPU inputs: it runs
    16-bit GEMMs with fp32 results through the native library (native.mm_wide_).
    """
    if a.is_cuda and a.dtype in _LOW_PRECISION and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    wide = wide_dtype(a.dtype)
    return torch.mm(a.to(wide), b.to(wide))
