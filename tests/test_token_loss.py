"""token_loss, the one-pass path (vlmfast/ops/one_pass.py): a per-token loss over every statistic against autograd
through materialised fp64 logits (value, d hidden, d weight, d bias), on odd shapes, one band and several, the
native epilogue and the PyTorch one, fp32 and 16-bit; then the mechanism itself, counted: the losses that
qualify run 3 GEMMs (6nHV) where token_stats runs 4 (8nHV)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlmfast
from vlmfast.ops import _inputs, chunked, native, one_pass
from vlmfast.ops.reference import reference_token_stats

N, H, V, HT = 37, 24, 1000, 16
NATIVE = [True, False] if native.available() else [False]


class GemmFlops(TorchDispatchMode):
    """FLOPs of every GEMM dispatched (mm, addmm, addmm_ and the native mm_wide_), by the shapes it is given."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        a, b = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "mm_wide_": (1, 2)}.get(name, (None, None))
        if a is not None:
            self.flops += 2 * args[a].shape[0] * args[a].shape[1] * args[b].shape[1]
        return func(*args, **(kwargs or {}))


def inputs(dtype, teacher_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * (2 / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[::6] = -100
    teacher = None
    if teacher_kind == "head":
        teacher = (torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.5)
    elif teacher_kind == "logits":
        teacher = torch.randn(N, V, generator=g) * 2
    cast = (lambda t: t.to(dtype)) if dtype != torch.float64 else (lambda t: t.double())
    if teacher is not None:
        teacher = cast(teacher) if isinstance(teacher, torch.Tensor) else tuple(cast(t) for t in teacher)
    return cast(h), cast(W), cast(b), y, teacher


ADV = torch.linspace(-1.0, 1.5, N, dtype=torch.float64)


def per_token(s, index, kl=True):
    """Every statistic, nonlinearly, with a per-token constant: a gradient wrong for any one of them shows."""
    a = ADV.to(s["logp"].dtype)[index]
    out = a * torch.exp(s["logp"]) + 0.3 * s["entropy"] ** 2 - 0.1 * s["lse"] - 0.5 * s["logp"]
    return out + 0.7 * s["kl"] if kl and "kl" in s else out


def naive_stats(h, W, b, y, teacher, kl, temperature):
    """The counted tokens' statistics from materialised fp64 logits (the naive reference, differentiable), and
    their positions."""
    keep = (y != -100).nonzero().squeeze(1)
    s = reference_token_stats(h, W, b, y, teacher=teacher, kl=kl, temperature=temperature, dtype=torch.float64)
    return {k: v[keep] for k, v in s.items()}, keep


def naive(h, W, b, y, teacher, kl, temperature):
    """The same per-token loss on statistics from materialised fp64 logits, differentiated by autograd."""
    s, keep = naive_stats(h, W, b, y, teacher, kl, temperature)
    return per_token(s, keep).sum()


def value_and_grads(fn, h, W, b, compute_dtype=None):
    leaves = [t.detach().to(compute_dtype or t.dtype).requires_grad_() for t in (h, W, b)]
    loss = fn(*leaves)
    return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(2.5 * loss, leaves)]


def fused(y, teacher, kl, temperature, backend="chunked"):
    def fn(h, W, b):
        return vlmfast.token_loss(h, W, y, per_token, bias=b, temperature=temperature, teacher=teacher, kl=kl,
                                  backend=backend)[0]
    return fn


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("teacher_kind,kl", [(None, None), ("head", "reverse"), ("logits", "forward")])
def test_fp32_matches_autograd_through_materialised_logits(bands, use_native, teacher_kind, kl, monkeypatch):
    monkeypatch.setenv("VLMFAST_NATIVE", "1" if use_native else "0")
    h, W, b, y, teacher = inputs(torch.float32, teacher_kind)
    got = value_and_grads(fused(y, teacher, kl, 1.3), h, W, b)
    want = value_and_grads(lambda *t: naive(*t, y, teacher, kl, 1.3), h, W, b, torch.float64)
    for what, a, w in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        assert (a - w).abs().max() <= 2e-5 * max(1.0, w.abs().max().item()), what
    assert want[1].abs().max() > 0.1  # the gradient is not trivially zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive_same_dtype(bands, cpu_16bit_path, dtype):
    """Against the fp64 truth, the fused 16-bit result is within the naive 16-bit computation's error (logits
    rounded to the dtype, as a trainer's materialised logits are) plus 2 ulp of the largest value, on every CPU
    path (one band: dW rounded straight into W's dtype; several: summed in fp32)."""
    h, W, b, y, teacher = inputs(dtype, "head")
    got = value_and_grads(fused(y, teacher, "reverse", 1.0), h, W, b)
    truth = value_and_grads(lambda *t: naive(*t, y, teacher, "reverse", 1.0), h, W, b, torch.float64)

    def naive_low(h, W, b):  # the materialised computation in the dtype: logits rounded to it
        z = (h @ W.T + b).float()
        zt = (teacher[0] @ teacher[1].T).float()
        return naive(z, torch.eye(V), torch.zeros(V), y, zt, "reverse", 1.0)

    base = value_and_grads(naive_low, h, W, b)
    for what, a, n, t in zip(("loss", "d hidden", "d weight", "d bias"), got, base, truth):
        tol = 2 * torch.finfo(dtype).eps * max(1.0, t.abs().max().item())
        assert (a - t).abs().max() <= (n - t).abs().max() + tol, what


def test_statistics_returned_match_token_stats():
    h, W, b, y, teacher = inputs(torch.float32, "head")
    _, got = vlmfast.token_loss(h, W, y, per_token, bias=b, teacher=teacher, kl="reverse")
    want = vlmfast.token_stats(h, W, y, bias=b, teacher=teacher, kl="reverse", outputs=("logp", "entropy", "lse", "kl"))
    for k in ("logp", "entropy", "lse", "kl"):
        torch.testing.assert_close(getattr(got, k), getattr(want, k), rtol=1e-5, atol=1e-5)
        assert not getattr(got, k).requires_grad
    assert (got.logp[y == -100] == 0).all() and (got.logp <= 0).all() and (got.kl >= 0).all()


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if vlmfast.ops.os.environ.get("TRITON_INTERPRET") == "1"
                                                      else []))
def test_other_backends_feed_token_stats_to_the_same_function(backend):
    h, W, b, y, teacher = inputs(torch.float32, "head")

    def fn(backend):
        return lambda h, W, b: vlmfast.token_loss(h, W, y, per_token, bias=b, teacher=teacher, kl="reverse",
                                                  backend=backend)[0]

    for a, w in zip(value_and_grads(fn(backend), h, W, b), value_and_grads(fn("chunked"), h, W, b)):
        assert (a - w).abs().max() <= 2e-5 * max(1.0, w.abs().max().item())


# --- the mechanism: 3 GEMMs for the losses that qualify, 4 for token_stats ---------------------------------


def _flops(fn, *leaves):
    with GemmFlops() as count:
        loss = fn()
        if leaves:
            torch.autograd.grad(loss, leaves)
    return count.flops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_that_qualify_run_three_gemms(dtype, monkeypatch):
    B, T = 3, 13
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.2).to(dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :4] = -100
    n = int((y != -100).sum())
    ht, Wt = torch.randn(B, T, HT, generator=g).to(dtype), torch.randn(V, HT, generator=g).to(dtype)
    adv = torch.randn(B, generator=g)
    neg_h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    neg_y = torch.where(y == -100, y, (y + 1) % V)  # every response token its own
    hp, yp = torch.cat([h, neg_h]), torch.cat([y, neg_y])  # 3 preference pairs
    npair, ref = 2 * n, torch.zeros(B)
    one_pass_losses = {
        "sft": (lambda: vlmfast.sft_loss(h, W, y)[0], 6 * n * H * V),
        "sft, gentle extend": (lambda: vlmfast.sft_gentle_negatives_loss(h, W, y, neg_h, neg_y, variant="extend")[0],
                               2 * 6 * n * H * V),
        "opd, fused teacher": (lambda: vlmfast.opd_loss(h, W, y, teacher=(ht, Wt))[0], 6 * n * H * V + 2 * n * HT * V),
        "grpo": (lambda: vlmfast.grpo_loss(h, W, y, None, adv, aggregation="seq-mean-token-mean")[0], 6 * n * H * V),
        "grpo, cispo": (lambda: vlmfast.grpo_loss(h, W, y, None, adv, loss_type="cispo")[0], 6 * n * H * V),
        "grpo, dr_grpo": (lambda: vlmfast.grpo_loss(h, W, y, None, adv, loss_type="dr_grpo", max_new_tokens=T)[0],
                          6 * n * H * V),
        # a group per sequence: GSPO's sequence ratio, a sequence's IS weight from the pass's own log-probs
        "grpo, gspo": (lambda: vlmfast.grpo_loss(h, W, y, None, adv, loss_type="gspo")[0], 6 * n * H * V),
        "grpo, sequence IS": (lambda: vlmfast.grpo_loss(h, W, y, None, adv, sampler_logp=torch.zeros(B, T),
                                                        tis_cap=2.0, is_level="sequence")[0], 6 * n * H * V),
        # groups of tokens: each negative's hinge, each preference pair (rows b and b + B // 2)
        "sft, gentle hinge": (lambda: vlmfast.sft_gentle_negatives_loss(h, W, y, neg_h, neg_y, variant="hinge")[0],
                              2 * 6 * n * H * V),
        "dpo": (lambda: vlmfast.dpo_loss(hp, W, yp, ref, ref)[0], 6 * npair * H * V),
        "cw_dpo, l_floor a number": (lambda: vlmfast.cw_dpo_loss(hp, W, yp, ref, ref, l_floor=-7.0)[0],
                                     6 * npair * H * V),
        "cw_dpo, batch floor in one band": (lambda: vlmfast.cw_dpo_loss(hp, W, yp, ref, ref)[0], 6 * npair * H * V),
    }
    for name, (fn, want) in one_pass_losses.items():
        assert _flops(fn, h, W) == want, name
    # token_stats takes any upstream gradient: it recomputes the logits in its backward
    stats = lambda: vlmfast.token_stats(h, W, y).logp.sum()  # noqa: E731
    assert _flops(stats, h, W) == 8 * n * H * V
    # the gentle hinge reads each negative's sequence sum: its negatives stay on token_stats
    hinge = lambda: vlmfast.sft_gentle_negatives_loss(h, W, y, neg_h, neg_y, variant="hinge")[0]  # noqa: E731
    assert _flops(hinge, h, W) == 2 * 6 * n * H * V
    # CW-DPO's batch floor: every pair reads the whole batch, one group; larger than a band may stretch to, the
    # recompute
    monkeypatch.setattr(one_pass, "MIN_BAND_ROWS", npair // (2 * one_pass.GROUP_STRETCH))
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 4 * V)
    monkeypatch.setattr(one_pass, "band_rows", lambda n_rows, *a: min(n_rows, one_pass.MIN_BAND_ROWS))
    assert _flops(lambda: vlmfast.cw_dpo_loss(hp, W, yp, ref, ref)[0], h, W) == 8 * npair * H * V
    assert _flops(lambda: vlmfast.dpo_loss(hp, W, yp, ref, ref)[0], h, W) == 6 * npair * H * V
    # without gradients, one GEMM
    with torch.no_grad():
        assert _flops(lambda: vlmfast.sft_loss(h, W, y)[0]) == 2 * n * H * V


def test_frozen_head_gets_no_weight_gradient_work():
    h, W, b, y, _ = inputs(torch.float32, None)
    h.requires_grad_()
    n = int((y != -100).sum())
    flops = _flops(lambda: vlmfast.token_loss(h, W, y, per_token)[0], h)
    assert flops == 4 * n * H * V  # logits and dh; no dW
    loss, _ = vlmfast.token_loss(h, W, y, per_token)
    (gh,) = torch.autograd.grad(loss, h)
    assert gh.abs().max() > 0


def test_per_token_loss_of_the_wrong_shape_is_named_before_any_gemm():
    h, W, b, y, _ = inputs(torch.float32, None)
    with GemmFlops() as count, pytest.raises(ValueError, match=r"one loss per token, \[n\].*; got \(\)"):
        vlmfast.token_loss(h, W, y, lambda s, index: s["logp"].sum())
    assert count.flops == 0


def test_backward_scales_the_forward_gradients_once():
    h, W, b, y, _ = inputs(torch.float32, None)
    h.requires_grad_()
    loss, _ = vlmfast.token_loss(h, W, y, per_token)
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    loss2, _ = vlmfast.token_loss(h, W, y, per_token)
    (g3,) = torch.autograd.grad(3 * loss2, h)
    torch.testing.assert_close(g3, 3 * g1)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(loss, h)


class LargestFloat32(TorchDispatchMode):
    """The fp32 tensors ops produce in new memory (numel each, in `sizes`; views of their inputs and out= writes
    aside), and the largest."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


@pytest.mark.skipif(not native.wide_gemm(torch.bfloat16), reason="needs the native 16-bit GEMM (built library)")
def test_bf16_needs_an_fp32_dw_only_with_several_bands_past_2h_rows(monkeypatch):
    """One band rounds dW straight into bf16, so a band takes all rows while its buffers cost no more than an fp32
    [V, H] accumulator (band_rows). Several bands keep every row's bf16 dz for one dW GEMM at the end while that
    costs no more either (N <= 2H); past that they sum dW in fp32 ([V, H], twice W's bytes). GEMMs in slices of 256
    columns, as of 16384 on a real vocabulary: a slice's fp32 dW block is not [V, H]."""
    monkeypatch.setattr(chunked, "NATIVE_MAX_COLS", 256)
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 4 * V * 8)  # as on a real vocabulary: bands of MIN_BAND_ROWS
    Hb = 512
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(V, Hb, generator=g) * 0.2).bfloat16().requires_grad_()
    # 300 > MIN_BAND_ROWS: one band by the memory rule; 600 <= 2H: dz kept; 1200: the fp32 accumulator
    for n, several, fp32_dw in ((300, False, False), (600, True, False), (1200, True, True)):
        h = torch.randn(n, Hb, generator=g).bfloat16().requires_grad_()
        y = torch.randint(0, V, (n,), generator=g)
        assert (one_pass.band_rows(n, V, Hb, True) < n) == several
        with LargestFloat32() as seen:
            loss, _ = vlmfast.token_loss(h, W, y, lambda s, index, n=n: -s["logp"] / n)
            loss.backward()
        assert (seen.largest >= V * Hb) == fp32_dw, (n, seen.largest)
        W.grad = None


# --- the Triton backend's one pass (vlmfast/kernels/logits_epilogue.py), under the interpreter on the CPU ---------

INTERPRETER = vlmfast.ops.os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def triton_one_pass(monkeypatch):
    """Every hidden size takes the Triton one pass (by default only H >= 2048 does), in bands of 8 rows."""
    from vlmfast.kernels import token_stats as kernels

    monkeypatch.setattr(one_pass, "TRITON_MIN_HIDDEN", 0)
    monkeypatch.setattr(kernels, "BWD_DZ_BYTES", 8 * 4 * V)


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("teacher_kind,kl", [(None, None), ("head", "reverse"), ("logits", "forward")])
def test_triton_one_pass_fp32_matches_autograd_through_materialised_logits(triton_one_pass, teacher_kind, kl):
    h, W, b, y, teacher = inputs(torch.float32, teacher_kind)
    got = value_and_grads(fused(y, teacher, kl, 1.3, backend="triton"), h, W, b)
    want = value_and_grads(lambda *t: naive(*t, y, teacher, kl, 1.3), h, W, b, torch.float64)
    for what, a, w in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        assert (a - w).abs().max() <= 2e-5 * max(1.0, w.abs().max().item()), what


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
def test_triton_one_pass_fp16_no_worse_than_naive_fp16(triton_one_pass):
    h, W, b, y, teacher = inputs(torch.float16, "head")
    got = value_and_grads(fused(y, teacher, "reverse", 1.0, backend="triton"), h, W, b)
    truth = value_and_grads(lambda *t: naive(*t, y, teacher, "reverse", 1.0), h, W, b, torch.float64)

    def naive_low(h, W, b):
        return naive((h @ W.T + b).float(), torch.eye(V), torch.zeros(V), y, (teacher[0] @ teacher[1].T).float(),
                     "reverse", 1.0)

    base = value_and_grads(naive_low, h, W, b)
    for what, a, n, t in zip(("loss", "d hidden", "d weight", "d bias"), got, base, truth):
        tol = 2 * torch.finfo(torch.float16).eps * max(1.0, t.abs().max().item())
        assert (a - t).abs().max() <= (n - t).abs().max() + tol, what


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
def test_triton_one_pass_runs_three_gemms(triton_one_pass):
    """Logits, dh and dW are torch GEMMs here (the epilogue kernels do none): 6nHV in all, the teacher's once."""
    h, W, b, y, teacher = inputs(torch.float32, "head")
    h.requires_grad_(), W.requires_grad_()
    n = int((y != -100).sum())
    flops = _flops(lambda: vlmfast.token_loss(h, W, y, per_token, teacher=teacher, kl="reverse",
                                              backend="triton")[0], h, W)
    assert flops == 6 * n * H * V + 2 * n * HT * V


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 3])
def test_logits_epilogue_statistics_over_vocabulary_slices(splits):
    """The statistics kernel's vocabulary slices (a GPU splits V to fill its SMs) merge to the fp64 truth."""
    from vlmfast.kernels.logits_epilogue import logits_stats

    g = torch.Generator().manual_seed(3)
    z, zt = torch.randn(N, V, generator=g) * 4, torch.randn(N, V, generator=g) * 4
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    got = logits_stats(z, y, zt, kl="reverse", temperature=1.3, splits=splits)
    lp, lq = torch.log_softmax(z.double() / 1.3, -1), torch.log_softmax(zt.double() / 1.3, -1)
    keep = y != -100
    want = {"logp": lp[keep, y[keep]], "entropy": -(lp.exp() * lp).sum(-1)[keep],
            "kl": (lp.exp() * (lp - lq)).sum(-1)[keep], "lse": torch.logsumexp(z.double() / 1.3, -1)[keep]}
    for k, w in want.items():
        torch.testing.assert_close(got[k][keep].double(), w, rtol=1e-5, atol=1e-5)
        assert (got[k][~keep] == 0).all()


# --- groups: a loss over sums of groups of tokens (preference pairs, a negative's hinge), whole groups per band ----

GROUP_OF_ROW = torch.arange(N) * 7 % 3  # 3 groups of ~10 counted tokens, interleaved in row order
COEF = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)


def per_group_loss(group_of_row, groups=4):
    """A nonlinear function of each group's sums of every statistic (a gradient routed to the wrong group shows);
    group 3 has no token: its loss is the function's on empty sums."""
    def fn(s, index):
        g = group_of_row[index]

        def total(x):
            return x.new_zeros(groups).index_add(0, g, x)

        count = total(torch.ones_like(s["logp"]))
        c = COEF[:groups].to(s["logp"].dtype)
        out = torch.nn.functional.softplus(c * total(s["logp"]) / (count + 1)) + 0.05 * total(s["entropy"]) ** 2
        out = out - 0.1 * c * total(s["lse"])
        return out + 0.7 * total(s["kl"]) if "kl" in s else out
    return fn


def grouped(y, teacher, kl, group_of_row=GROUP_OF_ROW, groups=4, backend="chunked"):
    def fn(h, W, b):
        return vlmfast.token_loss(h, W, y, per_group_loss(group_of_row, groups), groups=group_of_row, bias=b,
                                  temperature=1.3, teacher=teacher, kl=kl, backend=backend)[0]
    return fn


def naive_grouped(h, W, b, y, teacher, kl, group_of_row=GROUP_OF_ROW, groups=4):
    s, keep = naive_stats(h, W, b, y, teacher, kl, 1.3)
    return per_group_loss(group_of_row, groups)(s, keep).sum()


def assert_matches(got, want, tol=2e-5):
    for what, a, w in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        assert (a - w).abs().max() <= tol * max(1.0, w.abs().max().item()), what
    assert want[1].abs().max() > 0.1  # the gradient is not trivially zero


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("teacher_kind,kl", [(None, None), ("head", "reverse")])
def test_groups_fp32_match_autograd_through_materialised_logits(bands, use_native, teacher_kind, kl, monkeypatch):
    """In bands of 8 rows every group (~10 rows) stretches a band to itself (one_pass.GROUP_STRETCH)."""
    monkeypatch.setenv("VLMFAST_NATIVE", "1" if use_native else "0")
    h, W, b, y, teacher = inputs(torch.float32, teacher_kind)
    got = value_and_grads(grouped(y, teacher, kl), h, W, b)
    assert_matches(got, value_and_grads(lambda *t: naive_grouped(*t, y, teacher, kl), h, W, b, torch.float64))


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on the CPU under TRITON_INTERPRET=1")
def test_groups_triton_one_pass_fp32_matches_autograd(triton_one_pass):
    h, W, b, y, teacher = inputs(torch.float32, "head")
    got = value_and_grads(grouped(y, teacher, "reverse", backend="triton"), h, W, b)
    assert_matches(got, value_and_grads(lambda *t: naive_grouped(*t, y, teacher, "reverse"), h, W, b,
                                        torch.float64))


def test_bands_hold_whole_groups_and_stretch_to_one_group_at_most():
    assert one_pass.plan_bands(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert one_pass.plan_bands(12, 4, [3, 1, 2, 5, 1]) == [(0, 4), (4, 6), (6, 11), (11, 12)]
    assert one_pass.plan_bands(9, 4, [1, 8]) == [(0, 1), (1, 9)]  # 8 = GROUP_STRETCH * 4
    assert one_pass.plan_bands(10, 4, [1, 9]) is None
    assert one_pass.plan_bands(0, 4, []) == []


def test_a_group_larger_than_a_band_may_stretch_to_runs_the_recompute(monkeypatch):
    """One group of every token (31 rows) against bands of 8 rows (16 stretched): token_stats' recompute, the same
    loss and gradients, 8nHV; groups of ~10 rows the same size of band: one pass, 6nHV."""
    monkeypatch.setattr(one_pass, "MIN_BAND_ROWS", 8)
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 8 * 4 * V)
    h, W, b, y, _ = inputs(torch.float32, None)
    one = torch.zeros(N, dtype=torch.long)
    got = value_and_grads(grouped(y, None, None, one, 1), h, W, b)
    assert_matches(got, value_and_grads(lambda *t: naive_grouped(*t, y, None, None, one, 1), h, W, b, torch.float64))
    n = int((y != -100).sum())
    h.requires_grad_(), W.requires_grad_()
    assert _flops(lambda: grouped(y, None, None, one, 1)(h, W, None), h, W) == 8 * n * H * V
    assert _flops(lambda: grouped(y, None, None)(h, W, None), h, W) == 6 * n * H * V


def test_bad_groups_are_named_before_any_gemm():
    h, W, b, y, _ = inputs(torch.float32, None)
    fn = per_group_loss(GROUP_OF_ROW)
    bad = {
        "integer tensor shaped like target": GROUP_OF_ROW.float(),
        r"groups has shape \(36,\); expected target's \(37,\)": GROUP_OF_ROW[:-1],
        r"groups\[1\] \(flattened\) = 5 is outside \[0, 4\)": GROUP_OF_ROW + (torch.arange(N) == 1) * 4,
    }
    for match, groups in bad.items():
        with GemmFlops() as count, pytest.raises(ValueError, match=match):
            vlmfast.token_loss(h, W, y, fn, groups=groups)
        assert count.flops == 0, match
    with GemmFlops() as count, pytest.raises(ValueError, match=r"one loss per group, \[G\]; got \(\)"):
        vlmfast.token_loss(h, W, y, lambda s, index: s["logp"].sum(), groups=GROUP_OF_ROW)
    assert count.flops == 0
    ignored = GROUP_OF_ROW.clone()
    ignored[y == -100] = -5  # an ignored token's group is never read
    torch.testing.assert_close(vlmfast.token_loss(h, W, y, fn, groups=ignored)[0],
                               vlmfast.token_loss(h, W, y, fn, groups=GROUP_OF_ROW)[0])


def test_teacher_logits_are_read_a_band_at_a_time(monkeypatch):
    """Given teacher logits [N, V], token_loss gathers each band's counted rows from them: no compacted [n, V] copy
    (n = 30 counted rows; bands of 8; dW is [V, H] = 24 V), and the input check reads them in slices."""
    from vlmfast.ops import _inputs

    monkeypatch.setattr(one_pass, "MIN_BAND_ROWS", 8)
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 8 * 4 * V)
    monkeypatch.setattr(_inputs, "FINITE_CHECK_ELEMS", 8 * V)
    h, W, b, y, teacher = inputs(torch.float32, "logits")
    n = int((y != -100).sum())
    for use_native in NATIVE:
        monkeypatch.setenv("VLMFAST_NATIVE", "1" if use_native else "0")
        h.requires_grad_(), W.requires_grad_()
        with LargestFloat32() as seen:
            loss, _ = vlmfast.token_loss(h, W, y, per_token, teacher=teacher, kl="forward")
            loss.backward()
        assert seen.largest < n * V, (use_native, seen.largest)


@pytest.mark.parametrize("teacher_kind,kl", [(None, None), ("head", "reverse"), ("head", "forward"),
                                             ("logits", "forward")])
def test_pytorch_epilogue_reuses_its_band_buffers(teacher_kind, kl, monkeypatch):
    """The PyTorch epilogue's [R, V] work lives in a few buffers per head, made once and reused band after band (the
    logits, over which p and then dz are written; log p; given teacher logits' counted rows gathered into one more):
    a fresh [R, V] tensor per band costs the CPU its page faults, more than the math (the fallback was slower than
    naive in 8 of 17 bench cases). Seven bands of 32 rows through token_loss's one pass and through token_stats'
    recompute (a head in its forward, another in its backward); dW [V, 16] is below a band's size."""
    monkeypatch.setenv("VLMFAST_NATIVE", "0")
    monkeypatch.setattr(one_pass, "MIN_BAND_ROWS", 32)
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 32 * 4 * V)
    monkeypatch.setattr(chunked, "ROW_DOT_COLS", 128)  # the row sums' products in slices, as on a real vocabulary
    monkeypatch.setattr(_inputs, "FINITE_CHECK_ELEMS", 16 * V)  # the input check's slices, below a band
    g = torch.Generator().manual_seed(0)
    n, hs = 200, 16
    h = torch.randn(n, hs, generator=g).requires_grad_()
    W = (torch.randn(V, hs, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, V, (n,), generator=g)
    y[::7] = -100  # token_loss gathers the counted rows of given teacher logits
    teacher = {None: None, "head": (torch.randn(n, 8, generator=g), torch.randn(V, 8, generator=g)),
               "logits": torch.randn(n, V, generator=g)}[teacher_kind]
    per_head = 2  # (logits, log p)
    buffers = {None: per_head, "head": 2 * per_head, "logits": 2 * per_head + 1}[teacher_kind]

    def every_statistic(s, index):  # each term's gradient its own pass over the band
        out = 0.3 * s["entropy"] ** 2 - 0.5 * s["logp"] - 0.1 * s["lse"]
        return out + 0.7 * s["kl"] if kl else out

    with LargestFloat32() as seen:
        loss, _ = vlmfast.token_loss(h, W, y, every_statistic, teacher=teacher, kl=kl)
        loss.backward()
    assert sum(size >= 32 * V for size in seen.sizes) == buffers, sorted(seen.sizes)[-12:]
    with LargestFloat32() as seen:  # the recompute: the same heads in its forward, again in its backward
        r = vlmfast.token_stats(h, W, y, teacher=teacher, kl=kl, outputs=("logp", "entropy", "lse")
                                + (("kl",) if kl else ()))
        (r.logp.sum() + r.entropy.sum() + r.lse.sum() + (r.kl.sum() if kl else 0)).backward()
    assert sum(size >= 32 * V for size in seen.sizes) == 2 * buffers, sorted(seen.sizes)[-12:]
