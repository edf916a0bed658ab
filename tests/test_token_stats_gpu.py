"""The triton backend in bf16 on a real GPU (bf16 arithmetic is wrong in the CPU interpreter, so
these run only where CUDA is available; on CPU machines bf16 is covered on the chunked backend by
test_token_stats.py). Same criterion: no worse than the naive same-dtype computation."""

import pytest
import torch
from test_token_stats import SHAPES, TEACHERS, _max_err, _scale, make_problem, run_naive, run_vlmfast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to_cuda(p):
    out = dict(p)
    for k in ("h", "W", "b", "y"):
        out[k] = p[k].cuda()
    out["grads"] = {k: v.cuda() for k, v in p["grads"].items()}
    t = p["teacher"]
    out["teacher"] = None if t is None else (t.cuda() if isinstance(t, torch.Tensor) else tuple(x.cuda() for x in t))
    return out


@pytest.mark.parametrize("kl,teacher_kind", TEACHERS)
@pytest.mark.parametrize("N,H,V", SHAPES + [pytest.param(4096, 896, 151936, id="qwen2-head")])
def test_triton_bf16_no_worse_than_naive(N, H, V, kl, teacher_kind):
    p = _to_cuda(make_problem(N, H, V, kl, teacher_kind, Ht=H))
    out, grads = run_vlmfast(p, "triton", torch.bfloat16)
    naive_out, naive_grads = run_naive(p, torch.bfloat16, torch.bfloat16)
    truth_out, truth_grads = run_naive(p, torch.bfloat16, torch.float32)
    for k, t in truth_out.items():
        assert _max_err(out[k], t) <= _max_err(naive_out[k], t) + 1e-3 * _scale(t), k
    for name, g, ng, tg in zip(("hidden", "weight", "bias"), grads, naive_grads, truth_grads):
        assert _max_err(g, tg) <= _max_err(ng, tg) + 2 * torch.finfo(torch.bfloat16).eps * _scale(tg), name


def test_hopper_runs_the_tma_kernels_and_others_the_portable_ones():
    from vlmfast.kernels.token_stats import device_target, kernel_variant

    h = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(1000, 896, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert kernel_variant(device_target(h.device), h, W) == ("tma" if hopper else "portable")
