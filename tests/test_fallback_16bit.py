"""The PyTorch fallback's 16-bit CPU GEMMs (chunked.LinearHead.torch_keeps_16bit): with the native kernels off or not
built, bf16/fp16 inputs run torch's 16-bit GEMMs (oneDNN's where the CPU has them) with the logits rounded to the
dtype as naive's materialised ones are, never a copy of W in fp32. Forced on or off here whatever this CPU is (torch's
16-bit GEMMs are right everywhere, fast only where oneDNN has kernels for the dtype) and checked by what it runs: the
GEMMs' operands are 16-bit, W is the caller's tensor, and every output and gradient of token_stats' recompute (in one
chunk of rows or several; dW by one GEMM over every row's 16-bit dz kept, or, past 2H rows, 16-bit partials summed in
fp32) is no worse than the naive same-dtype computation against the fp64 truth. token_loss's one pass is checked on
this path too (test_token_loss.py, the cpu_16bit_path fixture)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlmfast import token_loss, token_stats
from vlmfast.ops import chunked
from vlmfast.ops.reference import reference_token_stats

DTYPES = [torch.bfloat16, torch.float16]
N, H, V, T = 37, 48, 1000, 0.7


@pytest.fixture(params=[True, False], ids=["16-bit GEMMs", "W in fp32"])
def torch_16bit(request, monkeypatch):
    monkeypatch.setenv("VLMFAST_NATIVE", "0")
    monkeypatch.setattr(chunked, "onednn_supports", lambda dtype: request.param)
    return request.param


class GemmDtypes(TorchDispatchMode):
    """The operand dtypes of every GEMM dispatched (mm, addmm, addmm_)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2)}.get(func.overloadpacket.__name__)
        if operands is not None:
            self.seen.append(tuple(args[i].dtype for i in operands))
        return func(*args, **(kwargs or {}))


def problem(dtype, H=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * (2 / math.sqrt(H))  # logits of O(several): a peaked softmax
    b = torch.randn(V, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[::6] = -100
    teacher = (torch.randn(N, 16, generator=g), torch.randn(V, 16, generator=g) * 0.5)
    grads = {k: torch.randn(N, generator=g) for k in ("logp", "entropy", "lse", "kl")}
    return h.to(dtype), W.to(dtype), b.to(dtype), y, tuple(t.to(dtype) for t in teacher), grads


def outputs_and_grads(fn, h, W, b, grads):
    leaves = [t.detach().clone().requires_grad_() for t in (h, W, b)]
    out = fn(*leaves)
    loss = sum((out[k].double() * grads[k].double()).sum() for k in out)
    return [out[k].detach().double() for k in sorted(out)], [g.double() for g in torch.autograd.grad(loss, leaves)]


def fused(y, teacher):
    def fn(h, W, b):
        r = token_stats(h, W, y, bias=b, temperature=T, teacher=teacher, kl="reverse",
                        outputs=("logp", "entropy", "lse", "kl"), backend="chunked")
        return {k: getattr(r, k) for k in ("logp", "entropy", "lse", "kl")}
    return fn


def naive(y, teacher, dtype):
    """Materialised in `dtype` throughout (the baseline), or in fp64 on the same rounded inputs (the truth)."""
    def fn(h, W, b):
        return reference_token_stats(h.to(dtype), W.to(dtype), b.to(dtype), y, temperature=T, kl="reverse",
                                     dtype=dtype, teacher=tuple(t.to(dtype) for t in teacher))
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemms_run_in_the_inputs_dtype_and_w_is_not_copied(torch_16bit, dtype):
    h, W, b, y, teacher, grads = problem(dtype)
    head = chunked.LinearHead(h, W)
    assert head.torch_16bit is torch_16bit
    assert (head.weight is W) is torch_16bit  # otherwise one fp32 copy of W serves every block
    with GemmDtypes() as gemms:
        outputs_and_grads(fused(y, teacher), h, W, b, grads)
        token_loss(h.requires_grad_(), W, y, lambda s, i: -s["logp"], backend="chunked")[0].backward()
    # forward: student and teacher logits; backward: their recompute, dh and dW; token_loss: logits, dh
    assert len(gemms.seen) >= 8
    want = (dtype, dtype) if torch_16bit else (torch.float32, torch.float32)
    assert set(gemms.seen) == {want}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows", [None, 16], ids=["one chunk", "chunks of 16 rows"])
@pytest.mark.parametrize("hidden", [H, 16], ids=["N <= 2H", "N > 2H"])
def test_token_stats_no_worse_than_naive_same_dtype(torch_16bit, dtype, chunk_rows, hidden, monkeypatch):
    """Every output and gradient within the naive same-dtype error against the fp64 truth (plus the tolerances of
    tests/test_token_stats.py: 1e-3 of the largest output, 2 ulp of the largest gradient)."""
    h, W, b, y, teacher, grads = problem(dtype, hidden)
    if chunk_rows is not None:
        monkeypatch.setattr(chunked, "BLOCK_BYTES", 4 * V * chunk_rows)
    head = chunked.LinearHead(h, W, need_dw=True)
    keeps_dz = torch_16bit and N <= 2 * hidden  # 2NV bytes of 16-bit dz, no more than an fp32 dW's 4VH
    assert (head.dz16_rows is not None) is keeps_dz
    assert head.dw.dtype == (dtype if keeps_dz else torch.float32)
    got = outputs_and_grads(fused(y, teacher), h, W, b, grads)
    base = outputs_and_grads(naive(y, teacher, dtype), h, W, b, grads)
    truth = outputs_and_grads(naive(y, teacher, torch.float64), h, W, b, grads)
    for what, a, n, t in zip(("outputs", "gradients"), got, base, truth):
        for name, x, xn, xt in zip(("logp entropy kl lse" if what == "outputs" else "h W b").split(), a, n, t):
            scale = max(1.0, xt.abs().max().item())
            tol = 1e-3 * scale if what == "outputs" else 2 * torch.finfo(dtype).eps * scale
            assert (x - xt).abs().max() <= (xn - xt).abs().max() + tol, name
