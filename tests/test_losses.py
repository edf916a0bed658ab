"""Every loss against an independent naive implementation from materialised logits (value and
gradients w.r.t. hidden and weight; fp32, and bf16 no worse than naive bf16), then semantics,
masks and bad input."""

import math

import pytest
import torch

from vlmfast import (
    CWDPOLoss,
    GRPOLoss,
    SFTLoss,
    cw_dpo_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    opd_loss,
    sft_gentle_negatives_loss,
    sft_loss,
)
from vlmfast.losses import reference as naive

B, T, H, V = 4, 11, 48, 1000


def labels_with_prompt(b=B, t=T, v=V, prompt=(3, 5, 2, 7), pad=(0, 2, 1, 0)):
    y = torch.randint(0, v, (b, t))
    for i in range(b):
        y[i, : prompt[i % len(prompt)]] = -100
        p = pad[i % len(pad)]
        if p:
            y[i, t - p :] = -100
    return y


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * (2 / math.sqrt(H))
    return h, W


def _case_sft():
    y = labels_with_prompt()
    return (lambda h, W, dt: sft_loss(h, W, y, label_smoothing=0.1)[0],
            lambda h, W, dt: naive.sft(h, W, y, label_smoothing=0.1, dtype=dt))


def _case_sft_temperature():
    y = labels_with_prompt()
    return (lambda h, W, dt: sft_loss(h, W, y, temperature=1.7)[0],
            lambda h, W, dt: naive.sft(h, W, y, T=1.7, dtype=dt))


def _gentle_pairs():
    """Negatives that share a prefix of their positive's response (the same reasoning, another answer), with
    another prompt length (so another response start); row 3's negative equals its positive."""
    y = labels_with_prompt()
    yn = torch.full_like(y, -100)
    for i, (start, keep) in enumerate(((2, 3), (4, 1), (1, 0), (2, None))):
        resp = y[i][y[i] != -100].clone()
        if keep is not None:
            resp[keep:] = (resp[keep:] + 1) % V
        n = min(len(resp), T - start)
        yn[i, start : start + n] = resp[:n]
    return y, yn


def _case_gentle(variant):
    y, yn = _gentle_pairs()
    hn = torch.randn(B, T, H)
    kw = dict(variant=variant, lam=0.5, margin=50.0, alpha=0.1)  # margin: hinge active
    return (lambda h, W, dt: sft_gentle_negatives_loss(h, W, y, hn.to(h.dtype), yn, **kw)[0],
            lambda h, W, dt: naive.gentle(h, W, y, hn, yn, dtype=dt, **kw))


def _case_opd_full():
    y = labels_with_prompt()
    ht, Wt = torch.randn(B, T, 32), torch.randn(V, 32) * 0.3
    return (lambda h, W, dt: opd_loss(h, W, y, teacher=(ht.to(h.dtype), Wt.to(h.dtype)))[0],
            lambda h, W, dt: naive.opd_full(h, W, y, ht, Wt, dtype=dt))


def _case_opd_sampled():
    y = labels_with_prompt()
    tl = -torch.rand(B, T) * 5
    return (lambda h, W, dt: opd_loss(h, W, y, teacher_logp=tl)[0],
            lambda h, W, dt: naive.opd_sampled(h, W, y, tl, dtype=dt))


def _case_grpo(**kw):
    y = labels_with_prompt()
    h0, W0 = problem()
    with torch.no_grad():
        lp, _, _ = naive.token_logp(h0, W0, y)
    old = lp + torch.randn(B, T) * 0.3  # ratios spread across both clip bounds
    ref = lp + torch.randn(B, T) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return (lambda h, W, dt: grpo_loss(h, W, y, old, adv, ref_logp=ref, **kw)[0],
            lambda h, W, dt: naive.grpo(h, W, y, old, adv, ref, dtype=dt, **kw))


def _case_grpo_on_policy_tis(**kw):
    """One update per rollout (old = the update's own log-probs) with a sampler that is off by up to ~0.5
    nats, truncated importance sampling at a cap some tokens exceed."""
    y = labels_with_prompt()
    h0, W0 = problem()
    with torch.no_grad():
        lp, _, _ = naive.token_logp(h0, W0, y)
    sampler = lp + torch.randn(B, T) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return (lambda h, W, dt: grpo_loss(h, W, y, None, adv, sampler_logp=sampler, tis_cap=1.2, **kw)[0],
            lambda h, W, dt: naive.grpo(h, W, y, None, adv, sampler=sampler, tis_cap=1.2, dtype=dt, **kw))


def _case_dpo(cw=False, l_floor="batch"):
    y = labels_with_prompt()
    ref_c, ref_r = -torch.rand(B // 2) * 30, -torch.rand(B // 2) * 30
    if cw and l_floor != "batch":  # a number (the trainer's l_floor: auto): w_c about 0.2 and 0.7 here
        return (lambda h, W, dt: cw_dpo_loss(h, W, y, ref_c, ref_r, beta=0.1, tau_c=0.5, l_floor=l_floor)[0],
                lambda h, W, dt: naive.dpo(h, W, y, ref_c, ref_r, beta=0.1, tau_c=0.5, l_floor=l_floor, dtype=dt))
    if cw:
        return (lambda h, W, dt: cw_dpo_loss(h, W, y, ref_c, ref_r, beta=0.1, tau_c=2.0, l_floor="batch")[0],
                lambda h, W, dt: naive.dpo(h, W, y, ref_c, ref_r, beta=0.1, tau_c=2.0, l_floor="batch", dtype=dt))
    return (lambda h, W, dt: dpo_loss(h, W, y, ref_c, ref_r, beta=0.1)[0],
            lambda h, W, dt: naive.dpo(h, W, y, ref_c, ref_r, beta=0.1, dtype=dt))


CASES = {
    "sft-smoothing": _case_sft,
    "sft-temperature": _case_sft_temperature,
    "sft-gentle-hinge": lambda: _case_gentle("hinge"),
    "sft-gentle-extend": lambda: _case_gentle("extend"),
    "opd-full": _case_opd_full,
    "opd-sampled": _case_opd_sampled,
    "grpo-kl-entropy": lambda: _case_grpo(kl_coef=0.05, entropy_coef=0.01, clip_high=0.28),
    "grpo-dual-clip-seq-mean": lambda: _case_grpo(dual_clip=2.0, aggregation="seq-mean-token-mean"),
    "grpo-seq-sum": lambda: _case_grpo(aggregation="seq-mean-token-sum"),
    "grpo-on-policy-tis": _case_grpo_on_policy_tis,
    "dpo": _case_dpo,
    "cw-dpo": lambda: _case_dpo(cw=True),
    "cw-dpo-floor": lambda: _case_dpo(cw=True, l_floor=-8.4),
}


# in bands of 8 rows: the losses over groups of tokens run one pass in several bands, CW-DPO's batch floor recomputes
GROUPED = {"dpo": "one pass", "cw-dpo-floor": "one pass", "sft-gentle-hinge": "one pass", "cw-dpo": "recompute"}


def _value_and_grads(fn, h, W, in_dtype, compute_dtype):
    h = h.to(in_dtype).to(compute_dtype if compute_dtype == torch.float64 else in_dtype).requires_grad_()
    W = W.to(in_dtype).to(compute_dtype if compute_dtype == torch.float64 else in_dtype).requires_grad_()
    loss = fn(h, W, compute_dtype)
    gh, gw = torch.autograd.grad(loss, (h, W))
    return loss.detach().double(), gh.double(), gw.double()


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_naive(name, bands):
    torch.manual_seed(1)
    fused_fn, naive_fn = CASES[name]()
    h, W = problem()
    got = _value_and_grads(fused_fn, h, W, torch.float32, torch.float32)
    want = _value_and_grads(naive_fn, h, W, torch.float32, torch.float64)
    for what, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), (name, what)
    assert got[0].abs() > 0
    kind, plans = bands
    if kind != "one band" and name in GROUPED:  # the mechanism these inputs are meant to exercise
        assert plans, name
        if GROUPED[name] == "recompute":
            assert plans[-1] is None, name
        else:
            assert all(p is not None for p in plans) and max(len(p) for p in plans) > 1, (name, plans)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_no_worse_than_naive_bf16(name):
    torch.manual_seed(1)
    fused_fn, naive_fn = CASES[name]()
    h, W = problem()
    got = _value_and_grads(fused_fn, h, W, torch.bfloat16, torch.bfloat16)
    base = _value_and_grads(naive_fn, h, W, torch.bfloat16, torch.bfloat16)
    truth = _value_and_grads(naive_fn, h, W, torch.bfloat16, torch.float64)
    for what, a, n, t in zip(("loss", "d hidden", "d weight"), got, base, truth):
        tol = 2 * torch.finfo(torch.bfloat16).eps * max(1.0, t.abs().max().item())
        assert (a - t).abs().max() <= (n - t).abs().max() + tol, (name, what)


# --- semantics -------------------------------------------------------------------------------


def test_grpo_at_ratio_one_is_policy_gradient():
    h, W = problem()
    y = labels_with_prompt()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    old = naive.token_logp(h, W, y)[0]
    loss, m = grpo_loss(h1, W, y, old, adv)
    (g1,) = torch.autograd.grad(loss, h1)
    lp, _, mask = naive.token_logp(h2, W, y)
    (g2,) = torch.autograd.grad(-naive.mmean(adv[:, None] * lp, mask), h2)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    assert abs(m["ratio_mean"].item() - 1) < 1e-5 and m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0


def test_grpo_on_policy_needs_no_old_logp_and_measures_the_sampler():
    """old_logp=None (one update per rollout) is the update's own log-probs: the same loss and gradient as
    passing them recomputed; the sampler mismatch is mean |old - sampler| over response tokens only."""
    h, W = problem()
    y = labels_with_prompt()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    old, _, mask = naive.token_logp(h, W, y)
    sampler = torch.where(mask, old + 0.1 * torch.randn(B, T), torch.full((B, T), 7.0))  # junk off the response
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss1, m1 = grpo_loss(h1, W, y, None, adv, sampler_logp=sampler)
    loss2, m2 = grpo_loss(h2, W, y, old, adv)
    (g1,), (g2,) = torch.autograd.grad(loss1, h1), torch.autograd.grad(loss2, h2)
    torch.testing.assert_close(loss1, loss2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    want = ((old - sampler).abs() * mask).sum() / mask.sum()
    assert abs(m1["sampler_mismatch"].item() - want.item()) < 1e-5 and "sampler_mismatch" not in m2
    # a cap no token reaches changes nothing; tis_cap without the sampler's log-probs is an error
    loss3, m3 = grpo_loss(h, W, y, None, adv, sampler_logp=old, tis_cap=2.0)
    torch.testing.assert_close(loss3, loss2.detach(), atol=1e-6, rtol=1e-5)
    assert m3["is_clipped_frac"].item() == 0 and abs(m3["is_weight_mean"].item() - 1) < 1e-6
    with pytest.raises(ValueError, match="tis_cap needs sampler_logp"):
        grpo_loss(h, W, y, None, adv, tis_cap=2.0)
    with pytest.raises(ValueError, match="tis_cap"):
        grpo_loss(h, W, y, None, adv, sampler_logp=old, tis_cap=0.0)


def test_grpo_clipping_kicks_in_exactly_at_the_bounds():
    """One token per row; row i's ratio is set exactly. Clipped tokens get zero gradient."""
    n, eps_lo, eps_hi = 8, 0.2, 0.28
    h = torch.randn(n, 1, H)
    W = torch.randn(V, H) * 0.2
    y = torch.randint(0, V, (n, 1))
    lp = naive.token_logp(h, W, y)[0]
    ratios = torch.tensor([1 + eps_hi + 1e-3, 1 + eps_hi - 1e-3, 1 - eps_lo - 1e-3, 1 - eps_lo + 1e-3] * 2)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    old = lp - torch.log(ratios)[:, None]
    hh = h.clone().requires_grad_()
    loss, m = grpo_loss(hh, W, y, old, adv, clip_low=eps_lo, clip_high=eps_hi)
    (g,) = torch.autograd.grad(loss, hh)
    moved = g.abs().sum((1, 2)) > 0
    # clipped: A>0 above 1+eps_hi (row 0); A<0 below 1-eps_lo (row 2). Rows 4..7 flip the sign of A:
    # the clip does not bind on the side where it would increase the objective.
    assert moved.tolist() == [False, True, False, True, True, True, True, True]
    assert m["clip_frac_high"].item() == pytest.approx(1 / 8) and m["clip_frac_low"].item() == pytest.approx(1 / 8)


def test_cw_dpo_with_floor_far_below_equals_dpo():
    h, W = problem()
    y = labels_with_prompt()
    ref_c, ref_r = -torch.rand(2) * 30, -torch.rand(2) * 30
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    l1, _ = dpo_loss(h1, W, y, ref_c, ref_r, beta=0.2)
    l2, m = cw_dpo_loss(h2, W, y, ref_c, ref_r, beta=0.2, tau_c=1e-3, l_floor=-1e6)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(torch.autograd.grad(l1, h1)[0], torch.autograd.grad(l2, h2)[0])
    assert m["cooling_weight_mean"].item() == 1.0


def test_cw_dpo_cold_negatives_get_no_gradient():
    h, W = problem()
    y = labels_with_prompt()
    hh = h.clone().requires_grad_()
    loss, m = cw_dpo_loss(hh, W, y, torch.zeros(2), torch.zeros(2), beta=0.2, tau_c=1e-3, l_floor=1e6)
    (g,) = torch.autograd.grad(loss, hh)
    assert g[2:].abs().max() == 0 and g[:2].abs().max() > 0  # rows 2, 3 are the rejected ones
    assert m["cooling_weight_frac_below_0_1"].item() == 1.0


@pytest.mark.parametrize("fn", [dpo_loss, cw_dpo_loss])
def test_preference_losses_report_the_policys_entropy_over_response_tokens(fn):
    """The Stage-2 entropy signal for DPO runs too: the mean over chosen and rejected response tokens (prompt and
    padding out), from fp64 materialised logits."""
    h, W = problem()
    y = labels_with_prompt()
    _, m = fn(h, W, y, -torch.rand(2) * 30, -torch.rand(2) * 30, beta=0.1)
    _, lsm, mask = naive.token_logp(h, W, y, dtype=torch.float64)
    entropy = -(lsm.exp() * lsm).sum(-1)
    want = naive.mmean(entropy, mask)
    assert abs(m["entropy"].item() - want.item()) <= 1e-5 * want.item()
    assert abs(entropy.mean().item() - want.item()) > 1e-3  # the prompt's tokens would change it


def test_gentle_negatives_push_only_their_own_tokens_and_each_sequence_has_its_hinge():
    """Only a negative's tokens after the prefix it shares with its positive get a gradient (the shared
    reasoning is not pushed down with the wrong answer); a negative equal to its positive pushes nothing; the
    hinge gates each sequence: one past the margin stops while another still pushes."""
    from vlmfast.losses.sft import divergent_tokens

    h, W = problem()
    y, yn = _gentle_pairs()
    own = divergent_tokens(y, yn)
    assert own.sum(1).tolist() == [int((y[0] != -100).sum()) - 3, int((y[1] != -100).sum()) - 1,
                                   int((y[2] != -100).sum()), 0]
    hn = torch.randn(B, T, H, requires_grad=True)
    loss, m = sft_gentle_negatives_loss(h, W, y, hn, yn, lam=1.0, margin=100.0)
    (g,) = torch.autograd.grad(loss, hn)
    assert (g.abs().sum(-1) > 0).equal(own)  # exactly the negatives' own tokens
    assert m["shared_tokens"].item() == pytest.approx((3 + 1 + 0 + int((y[3] != -100).sum())) / 4)
    # per-sequence hinge: a margin between rows 0's and 1's NLL_i(y-) pushes one of them only
    lp = naive.token_logp(hn.detach(), W, torch.where(own, yn, -100))[0]
    seq = -(lp.sum(1) / own.sum(1).clamp(min=1))[:3]
    lo, hi = sorted(seq.tolist()[:2])
    loss, m = sft_gentle_negatives_loss(h, W, y, hn, yn, lam=1.0, margin=(lo + hi) / 2)
    (g,) = torch.autograd.grad(loss, hn)
    pushed = [bool(g[i].abs().sum() > 0) for i in range(2)]
    assert pushed == [bool(seq[0] < seq[1]), bool(seq[1] < seq[0])]  # the one past the margin stopped


def test_sft_gentle_with_inactive_hinge_equals_sft():
    h, W = problem()
    y, yn = labels_with_prompt(), labels_with_prompt()
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    l1, m = sft_gentle_negatives_loss(h1, W, y, torch.randn(B, T, H), yn, lam=1.0, margin=0.0)
    l2, _ = sft_loss(h2, W, y)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(torch.autograd.grad(l1, h1)[0], torch.autograd.grad(l2, h2)[0])
    assert m["hinge_active"].item() == 0.0


def test_opd_kl_and_gradient_zero_when_teacher_is_student():
    h, W = problem()
    y = labels_with_prompt()
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss, m = opd_loss(hh, WW, y, teacher=(h, W))
    gh, gw = torch.autograd.grad(loss, (hh, WW))
    assert loss.abs() < 1e-6 and gh.abs().max() < 1e-6 and gw.abs().max() < 1e-6
    loss_s, m_s = opd_loss(hh, WW, y, teacher_logp=naive.token_logp(h, W, y)[0])
    assert m_s["kl"].abs() < 1e-6 and torch.autograd.grad(loss_s, hh)[0].abs().max() < 1e-6


def test_group_advantages():
    """By the sample std, as TRL (nanstd: Bessel-corrected) and verl (torch.std) take it: [1, 0, 1, 0] has
    std sqrt(1/3), so +-0.5 / 0.577 = +-0.866 (the population std would give +-1)."""
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    a = group_advantages(r, 4)
    torch.testing.assert_close(a[:4], torch.tensor([0.8660, -0.8660, 0.8660, -0.8660]), atol=1e-4, rtol=0)
    assert (a[4:] == 0).all()  # a group with one reward carries no signal, and no NaN
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0]), 2), torch.tensor([0.7071, -0.7071]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(group_advantages(r, 4, scale="none")[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]))
    b = group_advantages(r, 4, scale="batch")  # the batch's sample std: sqrt(sum (r - 1.75)^2 / 7) = 1.389
    torch.testing.assert_close(b[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / 1.3887, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not divisible into groups of 3"):
        group_advantages(r, 3)


# --- masks ---------------------------------------------------------------------------------------

ALL_LOSSES = {
    "sft": lambda h, W, y: sft_loss(h, W, y),
    "gentle": lambda h, W, y: sft_gentle_negatives_loss(h, W, y, h, y, margin=100.0),
    "opd": lambda h, W, y: opd_loss(h, W, y, teacher=(h.detach() * 0.5, W.detach())),
    "grpo": lambda h, W, y: grpo_loss(h, W, y, torch.zeros(B, T) - 5, torch.tensor([1.0, -1.0, 0.5, 2.0]),
                                      ref_logp=torch.zeros(B, T) - 6, kl_coef=0.1, entropy_coef=0.01),
    "dpo": lambda h, W, y: dpo_loss(h, W, y, torch.zeros(2) - 30, torch.zeros(2) - 30),
    "cw_dpo": lambda h, W, y: cw_dpo_loss(h, W, y, torch.zeros(2) - 30, torch.zeros(2) - 30),
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_prompt_and_padding_never_contribute(name):
    h, W = problem()
    y = labels_with_prompt()
    masked = y == -100
    h2 = h.clone()
    h2[masked] = torch.randn(int(masked.sum()), H) * 10  # garbage where the loss must not look
    hh = h2.clone().requires_grad_()
    l1, _ = ALL_LOSSES[name](h, W, y)
    l2, _ = ALL_LOSSES[name](hh, W, y)
    torch.testing.assert_close(l1, l2.detach())
    (g,) = torch.autograd.grad(l2, hh)
    assert g[masked].abs().max() == 0 and g[~masked].abs().max() > 0


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_empty_response_row_gives_no_nan(name):
    h, W = problem()
    y = labels_with_prompt()
    y[1] = -100  # a row with no response at all
    hh = h.clone().requires_grad_()
    loss, metrics = ALL_LOSSES[name](hh, W, y)
    (g,) = torch.autograd.grad(loss, hh)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_metrics_are_detached_scalars():
    h, W = problem()
    hh = h.clone().requires_grad_()
    for name, fn in ALL_LOSSES.items():
        _, metrics = fn(hh, W, labels_with_prompt())
        for k, v in metrics.items():
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, (name, k)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    h, W = problem()
    y = labels_with_prompt()
    with pytest.raises(ValueError, match="same batch size"):
        dpo_loss(h[:3], W, y[:3], torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(3,\)"):
        dpo_loss(h, W, y, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="beta must be"):
        dpo_loss(h, W, y, torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="beta must be"):
        CWDPOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(h, W, y, torch.zeros(B, T), torch.zeros(B + 1))
    with pytest.raises(ValueError, match="old_logp has shape"):
        grpo_loss(h, W, y, torch.zeros(B, T + 1), torch.zeros(B))
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        grpo_loss(h, W, y, torch.zeros(B, T), torch.zeros(B), kl_coef=0.1)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        GRPOLoss(aggregation="mean")
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        SFTLoss(label_smothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(h, W, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="exactly one of teacher"):
        opd_loss(h, W, y)
    with pytest.raises(ValueError, match=r"labels for hidden must be \[B, T\]"):
        sft_loss(h, W, y[:, :-1])
    with pytest.raises(ValueError, match="l_floor"):
        cw_dpo_loss(h, W, y, torch.zeros(2), torch.zeros(2), l_floor="auto")


def test_modules_carry_hyperparameters():
    h, W = problem()
    y = labels_with_prompt()
    old, adv = torch.zeros(B, T) - 5, torch.tensor([1.0, -1.0, 0.5, 2.0])
    mod = GRPOLoss(clip_low=0.1, clip_high=0.3, aggregation="seq-mean-token-sum")
    torch.testing.assert_close(mod(h, W, y, old, adv)[0],
                               grpo_loss(h, W, y, old, adv, clip_low=0.1, clip_high=0.3,
                                         aggregation="seq-mean-token-sum")[0])
    assert "clip_low=0.1" in repr(mod)


# --- packed rows (cu_seqlens) --------------------------------------------------------------------


def _padded(packed, lengths, fill):
    """[N, ...] -> [B, T, ...] by a plain loop (independent of the library's layout code)."""
    T = max(lengths)
    out = torch.full((len(lengths), T, *packed.shape[1:]), fill, dtype=packed.dtype)
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = packed[start : start + n]
        start += n
    return out


@pytest.mark.parametrize("name", ["sft", "grpo", "opd", "dpo", "cw_dpo"])
def test_packed_rows_with_cu_seqlens_equal_the_padded_batch(name):
    """Sequences back to back ([N, H], offsets cu_seqlens) give the padded batch's loss, metrics and gradient
    (per-sequence means included: GRPO per sequence, DPO's sequence sums)."""
    torch.manual_seed(3)
    lengths, H, V = [5, 9, 3, 7], 32, 300
    N = sum(lengths)
    cu = torch.tensor([0, 5, 14, 17, 24])
    h = torch.randn(N, H)
    W = torch.randn(V, H) * 0.5
    y = torch.randint(0, V, (N,))
    y[[0, 1, 5, 14]] = -100  # prompt tokens
    per_token = {"old": -torch.rand(N) * 3, "sampler": -torch.rand(N) * 3, "teacher_h": torch.randn(N, 16)}
    Wt = torch.randn(V, 16)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    ref = -torch.rand(2) * 20

    def loss(hh, yy, old, sampler, th, **kw):
        if name == "sft":
            return sft_loss(hh, W, yy, **kw)
        if name == "grpo":
            return grpo_loss(hh, W, yy, old, adv, sampler_logp=sampler, aggregation="seq-mean-token-mean", **kw)
        if name == "opd":
            return opd_loss(hh, W, yy, teacher=(th, Wt), **kw)
        if name == "dpo":
            return dpo_loss(hh, W, yy, ref, ref - 1, beta=0.5, **kw)
        return cw_dpo_loss(hh, W, yy, ref, ref - 1, beta=0.5, tau_c=2.0, l_floor="batch", **kw)

    hp = h.clone().requires_grad_()
    got, got_m = loss(hp, y, per_token["old"], per_token["sampler"], per_token["teacher_h"], cu_seqlens=cu)
    (gp,) = torch.autograd.grad(got, hp)
    hb = _padded(h, lengths, 0.0).requires_grad_()
    want, want_m = loss(hb, _padded(y, lengths, -100), _padded(per_token["old"], lengths, 0.0),
                        _padded(per_token["sampler"], lengths, 0.0), _padded(per_token["teacher_h"], lengths, 0.0))
    (gb,) = torch.autograd.grad(want, hb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gp, torch.cat([gb[b, :n] for b, n in enumerate(lengths)]), atol=1e-6, rtol=1e-5)
    for k in want_m:
        torch.testing.assert_close(got_m[k], want_m[k], atol=1e-6, rtol=1e-5)


def test_packed_rows_errors_are_named():
    h, W, y = torch.randn(10, 8), torch.randn(50, 8), torch.randint(0, 50, (10,))
    with pytest.raises(ValueError, match="rise from 0 to N = 10"):
        sft_loss(h, W, y, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        sft_loss(h, W, y, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"packed rows \[N, H\]"):
        sft_loss(h[None], W, y, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \(10,\)"):
        sft_loss(h, W, y[:9], cu_seqlens=torch.tensor([0, 10]))
