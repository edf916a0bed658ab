"""The triton backend compiled on a real GPU (`make gpu-check`; skipped without CUDA): bf16 (wrong in the CPU
interpreter, so covered here only), fp16 and fp32 (fp32 with torch's TF32 flag on: the kernels and GEMMs of a call
still run IEEE fp32), no bias, a teacher of another hidden size, unaligned shapes (the portable kernels on Hopper),
a batch with no counted token, and inputs on a second GPU. Criterion as on the CPU: fp32 close to the fp64 truth,
16-bit no worse than the naive same-dtype computation."""

import pytest
import torch
from test_token_stats import SHAPES, TEACHERS, _max_err, _scale, make_problem, run_naive, run_vlmfast

import vlmfast
from vlmfast.ops.reference import reference_token_stats

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
    _no_worse_than_naive(_to_cuda(make_problem(N, H, V, kl, teacher_kind, Ht=H)), torch.bfloat16)


def _no_worse_than_naive(p, dtype):
    """Every output and gradient of the Triton backend in `dtype` no further from the fp32 truth than the naive
    computation in `dtype` (plus a rounding of the gradient to the dtype)."""
    out, grads = run_vlmfast(p, "triton", dtype)
    naive_out, naive_grads = run_naive(p, dtype, dtype)
    truth_out, truth_grads = run_naive(p, dtype, torch.float32)
    for k, t in truth_out.items():
        assert _max_err(out[k], t) <= _max_err(naive_out[k], t) + 1e-3 * _scale(t), k
    for name, g, ng, tg in zip(("hidden", "weight", "bias"), grads, naive_grads, truth_grads):
        assert _max_err(g, tg) <= _max_err(ng, tg) + 2 * torch.finfo(dtype).eps * _scale(tg), name


def test_hopper_runs_the_tma_kernels_and_others_the_portable_ones():
    from vlmfast.kernels.token_stats import device_target, kernel_variant

    h = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(1000, 896, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert kernel_variant(device_target(h.device), h, W) == ("tma" if hopper else "portable")


@pytest.mark.parametrize("teacher", [False, True])
def test_token_loss_one_pass_bf16_no_worse_than_naive(teacher):
    """token_loss on the Triton backend at H >= 2048 (the one pass: logits by a GEMM,
    vlmfast/kernels/logits_epilogue.py)
    in bf16, against the naive bf16 loss through materialised logits, both against fp32."""
    import vlmfast

    N, H, V, Ht = 1024, 2048, 32000, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=g)
    W = torch.randn(V, H, device="cuda", generator=g) * H**-0.5
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[::7] = -100
    zt = torch.randn(N, Ht, device="cuda", generator=g) @ torch.randn(Ht, V, device="cuda", generator=g) * 0.1
    n = (y != -100).sum()

    def per_token(s, index):
        return (0.7 * s["kl"] if teacher else 0) - s["logp"] / n + 0.01 * s["entropy"]

    def naive(h, W):
        lp = torch.log_softmax((h @ W.T).float(), -1)
        keep = y != -100
        s = {"logp": lp[keep, y[keep]], "entropy": -(lp.exp() * lp).sum(-1)[keep]}
        if teacher:
            s["kl"] = (lp.exp() * (lp - torch.log_softmax(zt.float(), -1))).sum(-1)[keep]
        return per_token(s, None).sum()

    def run(fn, dtype):
        a, b = h.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
        loss = fn(a, b)
        return [loss.float()] + [t.float() for t in torch.autograd.grad(loss, (a, b))]

    fused = run(lambda a, b: vlmfast.token_loss(a, b, y, per_token, teacher=zt.to(a.dtype) if teacher else None,
                                                kl="reverse" if teacher else None, backend="triton")[0],
                torch.bfloat16)
    base, truth = run(naive, torch.bfloat16), run(naive, torch.float32)
    for what, f, b, t in zip(("loss", "d hidden", "d weight"), fused, base, truth):
        assert _max_err(f, t) <= _max_err(b, t) + 2 * torch.finfo(torch.bfloat16).eps * _scale(t), what


@pytest.mark.parametrize("l_floor", [None, -10.0])
def test_preference_pairs_one_pass_bf16_no_worse_than_naive(l_floor, monkeypatch):
    """dpo_loss and cw_dpo_loss (l_floor a number, as the trainer runs it) on the Triton backend at H >= 2048: a
    group per preference pair, whole in a band (one_pass.plan_bands; bands of 400 rows, a pair 384: four), in bf16,
    against the naive bf16 loss through materialised logits (vlmfast/losses/reference.py), both against fp32."""
    import vlmfast
    from vlmfast.kernels import token_stats as kernels
    from vlmfast.losses import reference as naive

    monkeypatch.setattr(kernels, "BWD_DZ_BYTES", 400 * 4 * 32000)

    B, T, H, V = 8, 256, 2048, 32000
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(B, T, H, device="cuda", generator=g)
    W = torch.randn(V, H, device="cuda", generator=g) * H**-0.5
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    y[:, :64] = -100
    ref_c, ref_r = -torch.rand(B // 2, device="cuda") * 30 - 1900, -torch.rand(B // 2, device="cuda") * 30 - 1900
    cw = dict(tau_c=0.5, l_floor=l_floor) if l_floor is not None else {}

    def fused(a, b):
        fn = vlmfast.cw_dpo_loss if cw else vlmfast.dpo_loss
        return fn(a, b, y, ref_c, ref_r, beta=0.1, backend="triton", **cw)[0]

    def run(fn, dtype):
        a, b = h.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
        loss = fn(a, b)
        return [loss.float()] + [t.float() for t in torch.autograd.grad(loss, (a, b))]

    got = run(fused, torch.bfloat16)
    base = run(lambda a, b: naive.dpo(a, b, y, ref_c, ref_r, beta=0.1, dtype=torch.bfloat16, **cw), torch.bfloat16)
    truth = run(lambda a, b: naive.dpo(a, b, y, ref_c, ref_r, beta=0.1, dtype=torch.float32, **cw), torch.float32)
    for what, f, b, t in zip(("loss", "d hidden", "d weight"), got, base, truth):
        assert _max_err(f, t) <= _max_err(b, t) + 2 * torch.finfo(torch.bfloat16).eps * _scale(t), what


@pytest.fixture
def tf32_on():
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize("kl,teacher_kind", TEACHERS)
@pytest.mark.parametrize("N,H,V", SHAPES + [pytest.param(37, 50, 1000, id="N37-H50-V1000-unaligned")])
def test_triton_fp32_is_ieee_with_tf32_on(N, H, V, kl, teacher_kind, tf32_on):
    """fp32 with torch's TF32 flag on: IEEE fp32 in every kernel and GEMM of the call (ops/precision.py), so
    within 2e-5 of the fp64 truth; a teacher of another hidden size (24); H = 50: rows not 16-byte aligned."""
    p = _to_cuda(make_problem(N, H, V, kl, teacher_kind, Ht=24))
    out, grads = run_vlmfast(p, "triton", torch.float32)
    ref_out, ref_grads = run_naive(p, torch.float32, torch.float64)
    for k, v in ref_out.items():
        assert _max_err(out[k], v) <= 2e-5 * _scale(v), k
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert _max_err(g, rg) <= 2e-5 * _scale(rg), name
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # put back


@pytest.mark.parametrize("kl,teacher_kind", TEACHERS)
@pytest.mark.parametrize("N,H,V", SHAPES + [pytest.param(37, 52, 1000, id="N37-H52-V1000-unaligned")])
def test_triton_fp16_no_worse_than_naive(N, H, V, kl, teacher_kind):
    _no_worse_than_naive(_to_cuda(make_problem(N, H, V, kl, teacher_kind, Ht=24)), torch.float16)


def test_unaligned_rows_run_the_portable_kernels_on_hopper():
    from vlmfast.kernels.token_stats import device_target, kernel_variant

    h = torch.randn(64, 900, device="cuda", dtype=torch.bfloat16)[:, :897]  # row stride 1800 bytes, 897 columns
    W = torch.randn(1000, 897, device="cuda", dtype=torch.bfloat16)
    assert kernel_variant(device_target(h.device), h.contiguous(), W) == "portable"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_without_bias(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    N, H, V = 300, 256, 4099
    h = torch.randn(N, H, device="cuda", generator=g)
    W = torch.randn(V, H, device="cuda", generator=g) * H**-0.5
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[::3] = -100
    gl, ge = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)

    def run(stats_fn, compute):
        a, b = h.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
        out = stats_fn(a, b, compute)
        loss = (out["logp"].float() * gl).sum() + (out["entropy"].float() * ge).sum()
        return [out["logp"].float(), out["entropy"].float()] + [x.float() for x in torch.autograd.grad(loss, (a, b))]

    def fused(a, b, _):
        r = vlmfast.token_stats(a, b, y, outputs=("logp", "entropy"), backend="triton")
        return {"logp": r.logp, "entropy": r.entropy}

    def naive(a, b, compute):
        out = reference_token_stats(a, b, None, y, dtype=compute)
        return {k: torch.where(y != -100, out[k], 0) for k in ("logp", "entropy")}

    got, base, truth = run(fused, None), run(naive, dtype), run(naive, torch.float64)
    for what, f, n, t in zip(("logp", "entropy", "d hidden", "d weight"), got, base, truth):
        t = t.float()
        if dtype == torch.float32:
            assert _max_err(f, t) <= 2e-5 * _scale(t), what
        else:
            assert _max_err(f, t) <= _max_err(n, t) + 2 * torch.finfo(dtype).eps * _scale(t), what


def test_a_batch_with_no_counted_token_on_the_gpu():
    """Prompt-only micro-batch: zeros, zero gradients, no launch, no crash (it divided by zero row blocks here)."""
    h = torch.randn(64, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(1000, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.full((64,), -100, device="cuda")
    s = vlmfast.token_stats(h, W, y, outputs=("logp", "entropy"), backend="triton")
    loss, _ = vlmfast.token_loss(h, W, y, lambda st, i: -st["logp"], backend="triton")
    (s.logp.sum() + s.entropy.sum() + loss).backward()
    assert not s.logp.any() and not s.entropy.any() and loss.item() == 0
    assert not h.grad.any() and not W.grad.any()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_inputs_on_the_second_gpu_while_the_current_is_the_first():
    p = make_problem(130, 64, 4099, "reverse", "hidden")
    torch.cuda.set_device(0)
    on = {d: run_vlmfast(_to_cuda_at(p, d), "triton", torch.bfloat16) for d in (0, 1)}
    for a, b in zip([*on[0][0].values(), *on[0][1]], [*on[1][0].values(), *on[1][1]]):
        assert torch.equal(a.cpu(), b.cpu())


def _to_cuda_at(p, index):
    with torch.cuda.device(index):
        return _to_cuda(p)
