"""token_stats against an independent naive implementation: every backend, every output, every
gradient (hidden, weight, bias), with random per-token upstream gradients on odd shapes.

fp32: close to the fp32 ground truth. bf16/fp16: no worse than the naive same-dtype computation,
measured against the fp32 ground truth on the same (rounded) inputs. The triton backend runs under
TRITON_INTERPRET=1 (fp32 and fp16: bf16 arithmetic is wrong in the interpreter)."""

import contextlib
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlmfast
from vlmfast import Teacher, token_stats
from vlmfast.ops.reference import reference_token_stats

OUTPUTS = ("logp", "entropy", "lse")
SHAPES = [pytest.param(37, 48, 1000, id="N37-H48-V1000"), pytest.param(130, 64, 4099, id="N130-H64-V4099")]
TEACHERS = [
    pytest.param(None, None, id="no-teacher"),
    pytest.param("reverse", "hidden", id="rkl-hidden"),
    pytest.param("forward", "hidden", id="fkl-hidden"),
    pytest.param("reverse", "logits", id="rkl-logits"),
    pytest.param("forward", "logits", id="fkl-logits"),
]
TEMPERATURE = 0.7


def make_problem(N, H, V, kl=None, teacher_kind=None, Ht=40, n_ignored=5):
    h = torch.randn(N, H)
    W = torch.randn(V, H) * (2.0 / math.sqrt(H))  # logits of O(several): a peaked, realistic softmax
    b = torch.randn(V) * 0.5
    y = torch.randint(0, V, (N,))
    y[torch.randperm(N)[:n_ignored]] = -100
    teacher = None
    if teacher_kind == "hidden":
        teacher = (torch.randn(N, Ht), torch.randn(V, Ht) * (2.0 / math.sqrt(Ht)))
    elif teacher_kind == "logits":
        teacher = torch.randn(N, V) * 2.0
    grads = {k: torch.randn(N) for k in ("logp", "entropy", "lse", "kl")}
    return dict(h=h, W=W, b=b, y=y, teacher=teacher, kl=kl, grads=grads)


def _cast_teacher(teacher, dtype):
    if teacher is None:
        return None
    if isinstance(teacher, torch.Tensor):
        return teacher.to(dtype)
    return tuple(t.to(dtype) for t in teacher)


def _loss_and_grads(outputs: dict, g: dict, leaves):
    loss = sum((outputs[k].float() * g[k]).sum() for k in outputs)
    grads = torch.autograd.grad(loss, leaves)
    return {k: v.detach().float() for k, v in outputs.items()}, [x.float() for x in grads]


@contextlib.contextmanager
def kernel_variant(backend: str):
    """"triton-tma": the triton backend with the Hopper (TMA) kernels, which the interpreter runs when
    VLMFAST_TRITON_TMA=1; yields the backend name token_stats takes."""
    if backend != "triton-tma":
        yield backend
        return
    old = os.environ.get("VLMFAST_TRITON_TMA")
    os.environ["VLMFAST_TRITON_TMA"] = "1"
    try:
        yield "triton"
    finally:
        os.environ.pop("VLMFAST_TRITON_TMA") if old is None else os.environ.__setitem__("VLMFAST_TRITON_TMA", old)


def run_vlmfast(p, backend, dtype):
    h, W, b = (p[k].to(dtype).requires_grad_() for k in ("h", "W", "b"))
    outs = OUTPUTS + (("kl",) if p["kl"] else ())
    with kernel_variant(backend) as name:
        r = token_stats(h, W, p["y"], bias=b, temperature=TEMPERATURE, teacher=_cast_teacher(p["teacher"], dtype),
                        kl=p["kl"], outputs=outs, backend=name)
        return _loss_and_grads({k: getattr(r, k) for k in outs}, p["grads"], (h, W, b))


def run_naive(p, dtype, compute_dtype):
    """Inputs rounded to `dtype`, then everything computed in `compute_dtype`."""
    h, W, b = (p[k].to(dtype).to(compute_dtype).requires_grad_() for k in ("h", "W", "b"))
    teacher = _cast_teacher(_cast_teacher(p["teacher"], dtype), compute_dtype)
    out = reference_token_stats(h, W, b, p["y"], temperature=TEMPERATURE, teacher=teacher, kl=p["kl"],
                                dtype=compute_dtype)
    return _loss_and_grads(out, p["grads"], (h, W, b))


def _max_err(a, b):
    return (a - b).abs().max().item()


def _scale(t):
    return max(1.0, t.abs().max().item())


def _backend_params():
    return [pytest.param("chunked", id="chunked"), pytest.param("triton", id="triton"),
            pytest.param("triton-tma", id="triton-tma")]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("kl,teacher_kind", TEACHERS)
@pytest.mark.parametrize("N,H,V", SHAPES)
def test_fp32_matches_ground_truth(backend, N, H, V, kl, teacher_kind):
    p = make_problem(N, H, V, kl, teacher_kind)
    out, grads = run_vlmfast(p, backend, torch.float32)
    ref_out, ref_grads = run_naive(p, torch.float32, torch.float64)
    for k, v in ref_out.items():
        assert _max_err(out[k], v) <= 2e-5 * _scale(v), k
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert _max_err(g, rg) <= 2e-5 * _scale(rg), name


LOW_PRECISION = [
    pytest.param("chunked", torch.bfloat16, id="chunked-bf16"),
    pytest.param("chunked", torch.float16, id="chunked-fp16"),
    pytest.param("triton", torch.float16, id="triton-fp16"),
    pytest.param("triton-tma", torch.float16, id="triton-tma-fp16"),
]


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
@pytest.mark.parametrize("kl,teacher_kind", TEACHERS)
@pytest.mark.parametrize("N,H,V", SHAPES)
def test_low_precision_no_worse_than_naive(backend, dtype, N, H, V, kl, teacher_kind):
    """|fused - fp32 truth| <= |naive same-dtype - fp32 truth| + tol, for every output and gradient."""
    p = make_problem(N, H, V, kl, teacher_kind)
    out, grads = run_vlmfast(p, backend, dtype)
    naive_out, naive_grads = run_naive(p, dtype, dtype)
    truth_out, truth_grads = run_naive(p, dtype, torch.float64)
    for k, t in truth_out.items():
        tol = 1e-3 * _scale(t)
        assert _max_err(out[k], t) <= _max_err(naive_out[k], t) + tol, k
    for name, g, ng, tg in zip(("hidden", "weight", "bias"), grads, naive_grads, truth_grads):
        # the fused op rounds its gradients to the input dtype once; allow that rounding
        tol = 2 * torch.finfo(dtype).eps * _scale(tg)
        assert _max_err(g, tg) <= _max_err(ng, tg) + tol, name


@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_batch_time_inputs_with_padding_and_sequence_sums(backend):
    """[B, T, H] hidden with right padding: per-token outputs shaped [B, T], per-row sums."""
    B, T, H, V = 3, 13, 48, 1000
    h = torch.randn(B, T, H, requires_grad=True)
    W = (torch.randn(V, H) * 0.3).requires_grad_()
    y = torch.randint(0, V, (B, T))
    lengths = [13, 7, 1]
    for i, n in enumerate(lengths):
        y[i, n:] = -100
    r = token_stats(h, W, y, outputs=("logp", "entropy"), per_sequence=True, backend=backend)
    assert r.logp.shape == (B, T) and r.entropy.shape == (B, T)
    assert r.seq_count.tolist() == lengths
    truth = reference_token_stats(h.detach().reshape(-1, H), W.detach(), None, y.reshape(-1))
    torch.testing.assert_close(r.logp, truth["logp"].reshape(B, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.seq_logp, truth["logp"].reshape(B, T).sum(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(r.seq_entropy, truth["entropy"].reshape(B, T).sum(1), atol=1e-4, rtol=0)
    assert (r.logp[y == -100] == 0).all() and (r.entropy[y == -100] == 0).all()
    # the sequence sums are differentiable: d seq_logp[i] / d h touches only row i's valid tokens
    g = torch.autograd.grad(r.seq_logp[1], h)[0]
    assert g[1, :7].abs().sum() > 0
    assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0 and g[1, 7:].abs().sum() == 0


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_packed_sequences_with_cu_seqlens(backend):
    N, H, V = 40, 32, 700
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H) * 0.3
    y = torch.randint(0, V, (N,))
    y[[0, 17, 18]] = -100
    cu = torch.tensor([0, 10, 25, 25, 40])  # one empty sequence
    r = token_stats(h, W, y, cu_seqlens=cu, backend=backend)
    per_tok = reference_token_stats(h.detach(), W, None, y)["logp"]
    expect = torch.stack([per_tok[a:b].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(r.seq_logp, expect, atol=1e-4, rtol=0)
    assert r.seq_count.tolist() == [9, 13, 0, 15]
    # gradient through a weighted combination of sequence sums == through the per-token outputs
    w = torch.tensor([0.5, -2.0, 3.0, 1.0])
    g_seq = torch.autograd.grad((r.seq_logp * w).sum(), h)[0]
    r2 = token_stats(h, W, y, backend=backend)
    g_tok = torch.autograd.grad((r2.logp * w[torch.repeat_interleave(torch.arange(4), cu.diff())]).sum(), h)[0]
    torch.testing.assert_close(g_seq, g_tok, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "triton", "triton-tma"])
def test_multiple_row_chunks_match_single_chunk(backend, monkeypatch):
    """Chunk boundaries (chunked: row blocks; triton backward: dz chunks) change nothing."""
    p = make_problem(150, 32, 600, "reverse", "hidden")
    out_one, grads_one = run_vlmfast(p, backend, torch.float32)
    if backend == "chunked":
        monkeypatch.setattr("vlmfast.ops.chunked.BLOCK_BYTES", 16 * 600 * 4)  # 16-row blocks
    else:
        monkeypatch.setattr("vlmfast.kernels.token_stats.BWD_DZ_BYTES", 64 * 600 * 4)  # 64-row chunks
    out_many, grads_many = run_vlmfast(p, backend, torch.float32)
    for k in out_one:
        torch.testing.assert_close(out_many[k], out_one[k], atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(grads_one, grads_many):
        torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["triton", "triton-tma"])
@pytest.mark.parametrize("kl", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_directly_vocab_splits_and_ignored_rows(kl, dtype, variant):
    """The launchers as a GPU calls them: several vocabulary slices merged, ignored rows inside the
    kernel (token_stats drops them before launching), the kernel variant asked for really launched."""
    from vlmfast.kernels import token_stats as ts

    p = make_problem(70, 48, 1000, kl, "hidden", n_ignored=9)
    h, W, b = (p[k].to(dtype) for k in ("h", "W", "b"))
    teacher = Teacher(*_cast_teacher(p["teacher"], dtype))
    kw = dict(teacher=teacher, kl=kl, temperature=TEMPERATURE, ignore_index=-100)
    truth_out, truth_grads = run_naive(p, dtype, torch.float64)
    with kernel_variant(variant):
        assert ts.kernel_variant(ts.device_target(h.device), h, W) == ("tma" if variant == "triton-tma" else "portable")
        for splits in (1, 3, 8):
            stats = ts.token_stats_forward(h, W, b, p["y"], splits=splits, **kw)
            for k, t in truth_out.items():
                assert _max_err(stats[k], t) <= 2e-4 * _scale(t), (splits, k)
        dh, dw, db = ts.token_stats_backward(h, W, b, p["y"], stats, p["grads"], need_db=True, **kw)
    for name, g, tg in zip(("hidden", "weight", "bias"), (dh, dw, db), truth_grads):
        assert torch.isfinite(g).all(), name
        assert _max_err(g.float(), tg) <= 5e-3 * _scale(tg), name
    ignored = p["y"] == -100
    assert (dh[ignored] == 0).all()


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_invariants_and_kl_zero_for_identical_teacher(backend):
    N, H, V = 64, 32, 1000
    h = torch.randn(N, H) * 3
    W = torch.randn(V, H)
    y = torch.randint(0, V, (N,))
    for teacher in [(h, W), (h @ W.T)]:
        for kl in ("reverse", "forward"):
            r = token_stats(h, W, y, teacher=teacher, kl=kl, outputs=("logp", "entropy", "kl"), backend=backend)
            assert (r.logp <= 0).all()
            assert (r.entropy >= 0).all() and (r.entropy <= math.log(V) + 1e-5).all()
            assert (r.kl >= 0).all()
            assert r.kl.abs().max() <= 1e-5, (kl, r.kl.abs().max())
    # and KL > 0 for a different teacher
    r = token_stats(h, W, y, teacher=(h.flip(0), W), kl="reverse", outputs=("kl",), backend=backend)
    assert (r.kl >= 0).all() and r.kl.mean() > 0.1


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_kl_gradient_is_zero_when_teacher_equals_student(backend):
    N, H, V = 32, 32, 500
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H).requires_grad_()
    y = torch.randint(0, V, (N,))
    for kl in ("reverse", "forward"):
        r = token_stats(h, W, y, teacher=(h.detach(), W.detach()), kl=kl, outputs=("kl",), backend=backend)
        gh, gw = torch.autograd.grad(r.kl.sum(), (h, W))
        assert gh.abs().max() < 1e-5 and gw.abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_ignored_tokens_output_zero_and_get_zero_gradient(backend):
    N, H, V = 24, 32, 300
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::3] = -100
    r = token_stats(h, W, y, outputs=("logp", "entropy", "lse"), backend=backend)
    ign = y == -100
    for t in (r.logp, r.entropy, r.lse):
        assert (t[ign] == 0).all() and (t[~ign] != 0).all()
    gh = torch.autograd.grad((r.logp + r.entropy + r.lse).sum(), h)[0]
    assert (gh[ign] == 0).all() and (gh[~ign].abs().sum(1) > 0).all()


@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_all_ignored_batch_gives_zeros_not_nan(backend):
    h = torch.randn(10, 32, requires_grad=True)
    W = torch.randn(200, 32, requires_grad=True)
    b = torch.randn(200, requires_grad=True)
    y = torch.full((10,), -100)
    r = token_stats(h, W, y, bias=b, teacher=(torch.randn(10, 16), torch.randn(200, 16)), kl="reverse",
                    outputs=("logp", "entropy", "kl", "lse"), per_sequence=False, backend=backend)
    for t in (r.logp, r.entropy, r.kl, r.lse):
        assert (t == 0).all()
    grads = torch.autograd.grad((r.logp + r.entropy + r.kl).sum(), (h, W, b), allow_unused=True)
    for g in grads:
        assert g is None or ((g == 0).all() and torch.isfinite(g).all())


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_extreme_logits_stay_finite_and_accurate(backend):
    """Logits around ±1e4: no NaN/inf in outputs or gradients, and still equal to the fp64 truth."""
    N, H, V = 40, 32, 800
    h = torch.randn(N, H)
    W = torch.randn(V, H)
    W = W / (h @ W.T).abs().max() * 1e4  # max |logit| = 1e4
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    y = torch.randint(0, V, (N,))
    r = token_stats(hh, WW, y, teacher=(h * 0.5, W), kl="reverse", outputs=("logp", "entropy", "kl"),
                    backend=backend)
    for t in (r.logp, r.entropy, r.kl):
        assert torch.isfinite(t).all()
    truth = reference_token_stats(h.double(), W.double(), None, y, teacher=(h.double() * 0.5, W.double()),
                                  kl="reverse", dtype=torch.float64)
    torch.testing.assert_close(r.logp.double(), truth["logp"], atol=0.05, rtol=1e-6)
    torch.testing.assert_close(r.entropy.double(), truth["entropy"], atol=1e-3, rtol=0)
    torch.testing.assert_close(r.kl.double(), truth["kl"], atol=0.05, rtol=1e-6)
    grads = torch.autograd.grad((r.logp + r.entropy + r.kl).sum(), (hh, WW))
    assert all(torch.isfinite(g).all() for g in grads)


def test_backends_agree_on_temperature_and_lse_gradient():
    """T != 1 on the lse output too: d lse / dz = p / T."""
    p = make_problem(50, 32, 900)
    for T in (0.3, 2.5):
        res = {}
        for backend in ("reference", "chunked", "triton"):
            h = p["h"].clone().requires_grad_()
            r = token_stats(h, p["W"], p["y"], temperature=T, outputs=("lse",), backend=backend)
            res[backend] = (r.lse, torch.autograd.grad((r.lse * p["grads"]["lse"]).sum(), h)[0])
        for backend in ("chunked", "triton"):
            torch.testing.assert_close(res[backend][0], res["reference"][0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(res[backend][1], res["reference"][1], atol=2e-5, rtol=1e-4)


def test_unaligned_inputs_fall_back_to_the_portable_kernels():
    """TMA needs 16-byte aligned base addresses and row strides: an fp16 hidden size of 37 (74-byte rows),
    or a view one element into its storage, runs the portable kernels on sm_90."""
    from vlmfast.kernels.token_stats import Target, kernel_variant

    hopper = Target(90, 132, tma=True)
    h, W = torch.randn(8, 64, dtype=torch.float16), torch.randn(100, 64, dtype=torch.float16)
    assert kernel_variant(hopper, h, W) == "tma"
    assert kernel_variant(Target(80, 108), h, W) == "portable"
    assert kernel_variant(hopper, torch.randn(8, 37, dtype=torch.float16), torch.randn(100, 37).half()) == "portable"
    assert kernel_variant(hopper, h.view(-1)[1:].view(-1)[:448].view(7, 64), W) == "portable"


@pytest.mark.parametrize("kl,teacher_kind", TEACHERS)
@pytest.mark.parametrize("block_v", [128, 64], ids=["sliced-epilogue", "whole-tile-epilogue"])
def test_tma_forward_both_epilogues(block_v, kl, teacher_kind, monkeypatch):
    """The Hopper forward folds tiles of >= 128 columns in four column slices (student and teacher alike) and
    takes the target logit from its own pass (`_target_logit`); narrower tiles fold whole. Both against
    naive fp32, over several vocabulary slices."""
    from vlmfast.kernels import token_stats as ts

    monkeypatch.setattr(ts, "INTERPRET_CONFIG", ts.Config(64, block_v, 32, 4, 1))
    p = make_problem(37, 48, 1000, kl, teacher_kind)
    truth_out, _ = run_naive(p, torch.float32, torch.float64)
    teacher = None if p["teacher"] is None else Teacher.coerce(p["teacher"])
    with kernel_variant("triton-tma"):
        for splits in (1, 3):
            stats = ts.token_stats_forward(p["h"], p["W"], p["b"], p["y"], splits=splits, temperature=TEMPERATURE,
                                           teacher=teacher, kl=kl)
            for k, t in truth_out.items():
                assert _max_err(stats[k], t) <= 2e-5 * _scale(t), (splits, k)


@pytest.mark.parametrize("teacher_kind", [None, "head", "logits"])
@pytest.mark.parametrize("backend", ["chunked", "triton", "reference"])
def test_minus_inf_logits_are_masked_columns(backend, teacher_kind):
    """A bias of -inf masks vocabulary (a constrained decoder's or a tokenizer's unused ids): the masked columns
    contribute nothing, so every statistic, the KL in both directions and every gradient are finite and equal to
    the same head without those columns; the masked rows of W get no gradient."""
    N, H, V = 37, 32, 1000
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[torch.randperm(V, generator=g)[:150]] = True
    b[masked] = float("-inf")
    y = torch.randint(0, V, (N,), generator=g)
    y[masked[y]] = int((~masked).nonzero()[0])  # targets are real tokens
    y[:3] = -100
    ht = torch.randn(N, H, generator=g)
    for kl in (("reverse", "forward") if teacher_kind else (None,)):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        teacher = {None: None, "head": (ht, W, b), "logits": ht @ W.T + b}[teacher_kind]
        outs = ("logp", "entropy", "lse") + (("kl",) if kl else ())
        r = token_stats(hh, WW, y, bias=b, teacher=teacher, kl=kl, outputs=outs, backend=backend)
        keep = ~masked
        remap = torch.cumsum(keep, 0) - 1
        y_kept = torch.where(y == -100, y, remap[y.clamp(min=0)])
        teacher_kept = None if teacher_kind is None else (ht.double() @ W[keep].double().T + b[keep].double())
        truth = reference_token_stats(h.double(), W[keep].double(), b[keep].double(), y_kept, teacher=teacher_kept,
                                      kl=kl, dtype=torch.float64)
        for k in outs:
            got = getattr(r, k)
            assert torch.isfinite(got).all(), k
            torch.testing.assert_close(got.double(), truth[k], atol=2e-5, rtol=2e-5)
        total = sum(getattr(r, k).sum() for k in outs)
        gh, gW = torch.autograd.grad(total, (hh, WW))
        assert torch.isfinite(gh).all() and torch.isfinite(gW).all()
        assert (gW[masked] == 0).all()
        if backend != "reference":  # the one pass (token_loss) over the same head: the same gradients
            hh2, WW2 = h.clone().requires_grad_(), W.clone().requires_grad_()
            loss, _ = vlmfast.token_loss(hh2, WW2, y, lambda st, index, outs=outs: sum(st[k] for k in outs), bias=b,
                                         teacher=teacher, kl=kl, backend=backend)
            torch.testing.assert_close(torch.autograd.grad(loss, (hh2, WW2)), (gh, gW), atol=1e-5, rtol=1e-4)


class CopiesOf(TorchDispatchMode):
    """Ops that read `source`'s memory and write new memory of at least `numel` elements."""

    def __init__(self, source: torch.Tensor, numel: int):
        super().__init__()
        self.storage, self.numel, self.copies = source.untyped_storage().data_ptr(), numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(a.untyped_storage().data_ptr() == self.storage for a in leaves):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= self.numel \
                        and t.untyped_storage().data_ptr() != self.storage:
                    self.copies.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", ["triton", "triton-tma"])
def test_triton_compacts_ignored_rows_with_given_teacher_logits(backend, monkeypatch):
    """A VLM batch is mostly prompt and image tokens: with teacher logits given, the Triton kernels still run on the
    counted rows only, reading the teacher's [N, V] logits where they are (a row map, no copy of their rows),
    forward and backward, and match the naive computation on the whole batch."""
    from vlmfast.kernels import token_stats as kernels

    N, H, V, counted = 130, 48, 1000, 23
    p = make_problem(N, H, V, "forward", "logits", n_ignored=N - counted)
    launches = []
    call = kernels.Launch.__call__

    def record(self):
        launches.append((self.grid, self.constexprs["TEACHER"], self.config.block_n))
        return call(self)

    monkeypatch.setattr(kernels.Launch, "__call__", record)
    with vlmfast.ops.inputs_checked(False), CopiesOf(p["teacher"], V) as seen:  # (the check reads it in slices)
        out, grads = run_vlmfast(p, backend, torch.float32)
    assert seen.copies == []
    truth_out, truth_grads = run_naive(p, torch.float32, torch.float64)
    for k, t in truth_out.items():
        torch.testing.assert_close(out[k], t.float(), atol=2e-4, rtol=2e-4)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g, t.float(), atol=2e-4, rtol=2e-4)
    assert len(launches) == 2  # forward, and the backward's one chunk
    for grid, mode, block_n in launches:
        assert mode == kernels.TEACHER_LOGITS_AT_ROWS and grid[0] == -(-counted // block_n)
