"""Property tests (hypothesis) and fp64 gradcheck on the chunked backend; from-logits variant;
cooling weight."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmfast import cooling_weight, sequence_mean, token_stats, token_stats_from_logits
from vlmfast.ops import chunked
from vlmfast.ops.reference import reference_token_stats


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 40),
    H=st.integers(1, 24),
    V=st.integers(2, 300),
    T=st.floats(0.2, 4.0),
    scale=st.floats(0.01, 30.0),
    chunk=st.integers(1, 64),
    kl=st.sampled_from([None, "reverse", "forward"]),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_naive_on_random_shapes(N, H, V, T, scale, chunk, kl, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / math.sqrt(H)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -100
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * scale if kl else None
    head = chunked.LinearHead(h, W, need_dh=True, need_dw=True)
    kw = dict(temperature=T, teacher=chunked.LogitsHead(teacher) if kl else None, kl=kl, chunk_rows=chunk)
    stats = chunked.forward(head, y, **kw)
    truth = reference_token_stats(h.requires_grad_(), W.requires_grad_(), None, y, temperature=T, teacher=teacher,
                                  kl=kl, dtype=torch.float64)
    for k, v in truth.items():
        torch.testing.assert_close(stats[k], v.detach(), atol=1e-9, rtol=1e-9)
    assert (stats["logp"] <= 0).all() and (stats["entropy"] >= 0).all()
    assert (stats["entropy"] <= math.log(V) + 1e-9).all()
    gr = {k: torch.randn(N, generator=g, dtype=torch.float64) for k in truth}
    chunked.backward(head, y, stats, gr, **kw)
    dh, dw = torch.autograd.grad(sum((truth[k] * gr[k]).sum() for k in truth), (h, W))
    torch.testing.assert_close(head.dh, dh, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(head.dw, dw, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kl", [None, "reverse", "forward"])
def test_gradcheck_fp64_chunked(kl):
    N, H, V = 5, 4, 11
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 10, 0, 3])
    teacher = (torch.randn(N, 3, dtype=torch.float64), torch.randn(V, 3, dtype=torch.float64)) if kl else None
    outs = ("logp", "entropy", "lse") + (("kl",) if kl else ())

    def f(h, W, b):
        r = token_stats(h, W, y, bias=b, temperature=0.8, teacher=teacher, kl=kl, outputs=outs,
                        backend="chunked")
        return tuple(getattr(r, k) for k in outs)

    assert torch.autograd.gradcheck(f, (h, W, b), eps=1e-6, atol=1e-7)


def test_from_logits_matches_fused_and_leaves_inputs_untouched():
    N, H, V = 30, 16, 257
    h, W = torch.randn(N, H), torch.randn(V, H)
    y = torch.randint(0, V, (N,))
    y[4] = -100
    logits = (h @ W.T).requires_grad_()
    t_logits = torch.randn(N, V)
    before, t_before = logits.detach().clone(), t_logits.clone()
    r = token_stats_from_logits(logits, y, temperature=1.5, teacher=t_logits, kl="reverse",
                                outputs=("logp", "entropy", "kl", "lse"))
    assert torch.equal(logits.detach(), before) and torch.equal(t_logits, t_before)
    truth = reference_token_stats(h, W, None, y, temperature=1.5, teacher=t_logits, kl="reverse")
    for k in ("logp", "entropy", "kl", "lse"):
        torch.testing.assert_close(getattr(r, k), truth[k], atol=1e-5, rtol=1e-5)
    g = torch.randn(N)
    (dl,) = torch.autograd.grad(((r.logp + r.kl) * g).sum(), logits)
    ref = logits.detach().clone().requires_grad_()
    rt = reference_token_stats(ref, torch.eye(V), None, y, temperature=1.5, teacher=t_logits, kl="reverse")
    (dr,) = torch.autograd.grad(((rt["logp"] + rt["kl"]) * g).sum(), ref)
    torch.testing.assert_close(dl, dr, atol=1e-5, rtol=1e-4)


def test_cooling_weight_values_and_stop_gradient():
    lbar = torch.tensor([-10.0, -2.0, -1.0, 0.0], requires_grad=True)
    w = cooling_weight(lbar, l_floor=-2.0, tau=0.5)
    torch.testing.assert_close(w, torch.sigmoid((lbar.detach() + 2.0) / 0.5))
    assert w[0] < 1e-6 and abs(w[1].item() - 0.5) < 1e-7 and w[3] > 0.98
    assert not w.requires_grad
    with pytest.raises(ValueError, match="tau"):
        cooling_weight(lbar, -2.0, 0.0)


def test_sequence_mean_handles_empty_sequences():
    s = torch.tensor([-4.0, 0.0, -3.0])
    c = torch.tensor([2.0, 0.0, 3.0])
    torch.testing.assert_close(sequence_mean(s, c), torch.tensor([-2.0, 0.0, -1.0]))
